"""The report in a real headless browser: Debian's chromium and chromedriver through Selenium.

Opens ``index.html`` from ``file://`` (nothing else is reachable) and checks that the
console has no errors, every image loaded, every run has its section, then saves a
full-page screenshot (kept under the test's tmp_path; also copied to $REPORT_SCREENSHOT
when set). Without chromium, chromedriver or selenium the test skips, unless
INVARISCOPE_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from test_report import alignment_run, mystery_run, sweep_run_dir, worst_case_run_dir

from invariscope.report import build_report
from invariscope.report.html import section_id

CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
WIDTH = 1280


def _unavailable(reason: str) -> None:
    if os.environ.get("INVARISCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"INVARISCOPE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(f"browser test skipped: {reason}")


def _find(*candidates: str) -> str | None:
    for name in candidates:
        path = shutil.which(name) or (name if os.path.isfile(name) else None)
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture
def driver(tmp_path, monkeypatch):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")
    chromium = _find("chromium", "/usr/bin/chromium", "chromium-browser")
    chromedriver = _find("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
    if chromium is None or chromedriver is None:
        missing = " and ".join(
            n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if p is None
        )
        _unavailable(f"{missing} not found (apt-get install chromium chromium-driver)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never download
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    options.add_argument(f"--window-size={WIDTH},1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def _screenshot(browser, path: Path) -> None:
    """A full-page PNG (Chrome DevTools), or the viewport grown to the page's height."""
    try:
        data = browser.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "fromSurface": True},
        )["data"]
        path.write_bytes(base64.b64decode(data))
    except Exception:  # noqa: BLE001 - any failure: fall back to a tall window
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(WIDTH, min(int(height) + 100, 20000))
        browser.save_screenshot(str(path))


def test_report_in_headless_chromium(driver, tmp_path, tmp_path_factory):
    from selenium.webdriver.support.ui import WebDriverWait

    sweep = sweep_run_dir(tmp_path_factory)
    worst = worst_case_run_dir(tmp_path_factory)
    other = mystery_run(tmp_path / "mystery run")
    align = alignment_run(tmp_path / "align")
    # given in any order, the sections follow the registry: sweep, worst case, alignment,
    # then the analysis nobody registered
    index = build_report([other, align, worst, sweep], tmp_path / "report")
    runs = [sweep, worst, align, other]

    driver.get(index.resolve().as_uri())
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && "
            "Array.from(document.images).every(i => i.complete)"
        )
    )
    assert driver.title.startswith("invariscope report")

    images = driver.execute_script(
        "return Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
        "complete: i.complete, width: i.naturalWidth, "
        "section: i.closest('section') ? i.closest('section').id : null}))"
    )
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert images and not broken, f"images that did not load: {broken}"

    for k, run_dir in enumerate(runs, start=1):
        sid = section_id(k, run_dir)
        found = driver.execute_script(
            "const s = document.getElementById(arguments[0]); "
            "return s ? {tag: s.tagName, visible: s.getBoundingClientRect().height > 0} : null",
            sid,
        )
        assert found == {"tag": "SECTION", "visible": True}, sid
        assert sum(i["section"] == sid for i in images) >= 1, f"no image in section {sid}"
    # the contents link to every section
    links = driver.execute_script(
        "return Array.from(document.querySelectorAll('nav.toc a')).map(a => a.hash)"
    )
    assert links == [f"#{section_id(k, d)}" for k, d in enumerate(runs, start=1)]

    # (a) registry order, distinct titles
    sections = driver.execute_script(
        "return Array.from(document.querySelectorAll('section.run')).map(s => ({id: s.id, "
        "analysis: s.dataset.analysis, title: s.querySelector('h2 .title').innerText}))"
    )
    assert [s["analysis"] for s in sections] == [
        "sweep",
        "worst_case",
        "alignment",
        "mystery-analysis",
    ]
    titles = [s["title"] for s in sections]
    assert len(set(titles)) == len(titles), titles

    # (b) the alignment section opens with its headline, then a layer x transformation table
    sid = section_id(3, align)
    opening = driver.execute_script(
        "const h = document.querySelector('#' + arguments[0] + ' h2').nextElementSibling; "
        "return {tag: h.tagName, cls: h.className, text: h.innerText, "
        "visible: h.getBoundingClientRect().height > 0}",
        sid,
    )
    assert opening["tag"] == "P" and opening["cls"] == "headline" and opening["visible"]
    assert "rotation 45 degree: up to 0.5 [0.49, 0.51] (conv1)" in opening["text"]
    table = driver.execute_script(
        "const t = document.querySelector('#' + arguments[0] + ' div.pivot table'); "
        "return {head: Array.from(t.querySelectorAll('thead th')).map(c => c.innerText), "
        "rows: Array.from(t.querySelectorAll('tbody tr')).map(r => "
        "Array.from(r.cells).map(c => c.innerText)), "
        "visible: t.getBoundingClientRect().height > 0}",
        sid,
    )
    assert table["visible"]
    assert table["head"] == ["layer", "translate_x 1 pixel", "rotation 45 degree"]
    assert table["rows"] == [["conv1", "0", "0.5"], ["pool1", "0.05", "0.3"]]

    # (c) every section's all-values block is collapsed: only its one-line summary shows
    blocks = driver.execute_script(
        "return Array.from(document.querySelectorAll('section.run')).map(s => {"
        "const d = s.querySelector('details.all-values'); "
        "const t = d.querySelector('table.kv'); "
        "return {open: d.open, visible: t.checkVisibility(), "
        "block: d.getBoundingClientRect().height, "
        "summary: d.querySelector('summary').getBoundingClientRect().height}})"
    )
    assert len(blocks) == 4
    for b in blocks:
        assert not b["open"] and not b["visible"], blocks
        assert 0 < b["summary"] and b["block"] < b["summary"] + 30, blocks  # padding, border

    # a figure wider than the text column is shown no wider than the window
    widths = driver.execute_script(
        "return Array.from(document.querySelectorAll('figure img')).map(i => "
        "i.getBoundingClientRect().width)"
    )
    assert widths and max(widths) <= driver.execute_script("return window.innerWidth")

    shot = tmp_path / "report.png"
    _screenshot(driver, shot)
    assert shot.stat().st_size > 50_000
    from PIL import Image

    with Image.open(shot) as image:
        assert image.width >= WIDTH * 0.9 and image.height > 3000  # the whole page
    if os.environ.get("REPORT_SCREENSHOT"):
        target = Path(os.environ["REPORT_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, f"console errors: {errors}"
