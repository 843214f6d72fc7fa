"""The documentation is tested: its examples run, its README commands work, its pages are linked.

- Every ```python block of README.md and docs/*.md runs, in page order, in one namespace per
  page, in a temporary folder (so a page's first block can train the tiny model its later
  blocks measure). A block that needs something slow or unavailable says so explicitly:
  ```python title="..." (the title says why) or an HTML comment ``<!-- no-test -->`` on the
  line before it; such blocks are listed by ``test_skipped_examples_say_why``.
- The README's shell blocks (```bash / ```console) run in order in a temporary folder, as a
  new user pastes them, except the quick-start ``make demo`` / ``make test`` / ``make docs``.
- ``mkdocs.yml``'s nav holds every page and only existing pages; ``make docs`` (``mkdocs build
  --strict``, run by .ci/run) checks links, anchors and the API reference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
NO_TEST = "<!-- no-test -->"
EXEMPT_COMMANDS = re.compile(r"^make (demo|test|docs)\b")


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    info: str  # the whole info string after the fence (``python title="..."``)
    code: str
    skip: str | None  # why the block does not run, or None


def fenced_blocks(path: Path) -> list[Block]:
    """Every top-level fenced block of ``path`` (``` fences), in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(`{3,})(.*)$", lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        prev = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
        lang = info.split()[0] if info else ""
        title = re.search(r'title="([^"]*)"', info)
        skip = None
        if prev == NO_TEST:
            skip = "marked <!-- no-test -->"
        elif title:
            skip = f"title: {title.group(1)}"
        blocks.append(Block(path, start + 1, lang, info, "\n".join(body) + "\n", skip))
    return blocks


def python_blocks(path: Path) -> list[Block]:
    return [b for b in fenced_blocks(path) if b.lang == "python"]


def shell_commands(path: Path) -> list[tuple[int, str]]:
    """The runnable shell text of ``path``'s ```bash / ```console blocks, one entry per block;
    ``console`` blocks keep only their ``$ `` lines; quick-start ``make`` lines are dropped."""
    out = []
    for block in fenced_blocks(path):
        if block.lang not in ("bash", "console") or block.skip:
            continue
        lines = block.code.splitlines()
        if block.lang == "console":
            lines = [s[2:] for s in lines if s.startswith("$ ")]
        kept = [s for s in lines if not EXEMPT_COMMANDS.match(s.strip())]
        if any(s.strip() and not s.strip().startswith("#") for s in kept):
            out.append((block.line, "\n".join(kept) + "\n"))
    return out


def _pages_with_examples() -> list[Path]:
    return [p for p in [README, *PAGES] if any(not b.skip for b in python_blocks(p))]


# ---------------------------------------------------------------------------------------------
# the extractor itself


def test_extractor_reads_fences_titles_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\ntext\n\n<!-- no-test -->\n```python\nslow()\n```\n\n"
        '```python title="needs a GPU"\ngpu()\n```\n\n````markdown\n```python\nnot_a_block()\n'
        "```\n````\n\n```bash\nmake demo\ninvariscope --help  # ok\n# a comment\n```\n\n"
        "```console\n$ invariscope models\nsimple-cnn ...\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (3, "x = 1\n", None),
        (10, "slow()\n", "marked <!-- no-test -->"),
        (14, "gpu()\n", "title: needs a GPU"),
    ]
    assert shell_commands(page) == [
        (24, "invariscope --help  # ok\n# a comment\n"),
        (30, "invariscope models\n"),
    ]


# ---------------------------------------------------------------------------------------------
# the Python examples


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INVARISCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for block in python_blocks(page):
        if block.skip:
            continue
        where = f"{page.relative_to(ROOT)}:{block.line}"
        try:
            exec(compile(block.code, where, "exec"), namespace)
        except Exception as exc:  # name the block, not this loop
            raise AssertionError(f"the example at {where} fails: {exc!r}") from exc


def test_skipped_examples_say_why():
    """Blocks that do not run are rare and each says why (its title, or the marker)."""
    skipped = [b for p in [README, *PAGES] for b in python_blocks(p) if b.skip]
    ran = [b for p in [README, *PAGES] for b in python_blocks(p) if not b.skip]
    assert ran, "no Python example found"
    for b in skipped:
        assert b.skip != "title: ", f"{b.path.name}:{b.line}: an empty title says nothing"
    assert len(skipped) < len(ran) / 4, [f"{b.path.name}:{b.line} {b.skip}" for b in skipped]


# ---------------------------------------------------------------------------------------------
# the README's commands


def test_readme_is_short_and_links_the_pages():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / target).exists(), f"README links to missing {target}"
    quick = fenced_blocks(README)[0]
    assert [s.split("#")[0].strip() for s in quick.code.splitlines()] == ["make demo", "make test"]


def test_readme_commands_have_no_placeholders():
    """What a user pastes runs as it stands: no ``[--opt ...]`` optional syntax."""
    for line, text in shell_commands(README):
        assert not re.search(r"\[--", text), f"README.md:{line}: optional syntax in a command"
        assert "..." not in text, f"README.md:{line}: an elided command"


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    """Every README shell block runs, in order, in a fresh folder, as a new user pastes it."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_", "INVARISCOPE"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["INVARISCOPE_CACHE"] = str(tmp_path / "cache")
    env["MPLBACKEND"] = "Agg"
    work = tmp_path / "work"
    work.mkdir()
    blocks = shell_commands(README)
    assert blocks, "the README has no command besides the quick start"
    for line, text in blocks:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", text],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (
            f"README.md:{line}: the block fails (exit {proc.returncode}):\n{text}\n"
            f"{proc.stderr[-2000:]}"
        )


# ---------------------------------------------------------------------------------------------
# the site


def _nav_files(nav) -> list[str]:
    files = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        files += _nav_files(value) if isinstance(value, list) else [value]
    return files


def test_nav_holds_every_page_once():
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)  # !!python tags
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)
    nav = _nav_files(config["nav"])
    assert len(nav) == len(set(nav))
    assert sorted(nav) == sorted(p.name for p in PAGES)


def test_pages_embed_only_existing_figures():
    for page in PAGES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text(encoding="utf-8")):
            assert (DOCS / target).is_file(), f"{page.name} embeds missing {target}"
