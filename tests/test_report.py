"""``invariscope report``: one offline HTML page over finished runs, from stored results only.

One real sweep run (the CLI, with a pair and the worst case) is shared by this module and
the browser test (``sweep_run_dir``); small hand-made runs cover an analysis this version
does not know, a registered analysis with its table and figure order, long tables with
array columns, and an unfinished run.
"""

from __future__ import annotations

import html
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import one_line_error

from invariscope import __version__
from invariscope.cli import run
from invariscope.errors import InvariscopeError
from invariscope.report import build_report
from invariscope.report.html import MAX_ROWS, _short, section_id
from invariscope.runs import RunStore

SWEEP_ARGS = [
    "--data",
    "digits",
    "--transforms",
    "rotation,gaussian_noise",
    "--range",
    "rotation=-90:90:45",
    "--range",
    "gaussian_noise=0:0.6:0.3",
    "--images",
    "40",
    "--pair",
    "translate_x,translate_y",
    "--range",
    "translate_x=-0.1:0.1:0.1",
    "--range",
    "translate_y=-0.1:0.1:0.1",
    "--worst-case",
    "--wc-grid",
    "3x3",
    "--wc-k",
    "3",
    "--no-progress",
]
WEIRD_NAME = "run <b>&'weird\" #2"
DOCUMENTED = "report-test-documented"
DOC_ABOUT = "Documented analyses say what they mean. Their tables come in the listed order."
DOC_PAPER = "Doe & Roe 2024, <i>A test of reports</i>"
SCRIPT = "<script>alert(1)</script>"

_CACHE: dict[str, Path] = {}


def sweep_run_dir(tmp_path_factory) -> Path:
    """A finished ``invariscope sweep`` run (made once per session); its checkpoint is deleted."""

    if "sweep" not in _CACHE:
        from invariscope.models import create_model, save_checkpoint

        base = tmp_path_factory.mktemp("report-sweep")
        ckpt = base / "model.pt"
        save_checkpoint(create_model("simple-cnn"), ckpt)
        out = base / "sweep"
        assert run(["sweep", "--model", str(ckpt), *SWEEP_ARGS, "--out", str(out)]) == 0
        ckpt.unlink()  # the report must not need the model
        _CACHE["sweep"], _CACHE["checkpoint"] = out, ckpt
    return _CACHE["sweep"]


def worst_case_run_dir(tmp_path_factory) -> Path:
    """A finished ``invariscope worst-case`` run (its own analysis), made once per session."""
    if "worst_case" not in _CACHE:
        from invariscope.models import create_model, save_checkpoint

        base = tmp_path_factory.mktemp("report-worst")
        ckpt = base / "model.pt"
        save_checkpoint(create_model("simple-cnn"), ckpt)
        out = base / "worst"
        argv = [
            "worst-case",
            "--model",
            str(ckpt),
            "--data",
            "digits",
            "--wc-grid",
            "3x3",
            "--wc-k",
            "3",
            "--images",
            "30",
            "--no-progress",
            "--out",
            str(out),
        ]
        assert run(argv) == 0
        ckpt.unlink()
        _CACHE["worst_case"] = out
    return _CACHE["worst_case"]


def write_png(path: Path, size=(240, 160), color=(40, 120, 200)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, dpi=(150, 150))


def make_run(
    path: Path,
    analysis: str | None,
    aggregates: dict[str, pd.DataFrame] | None = None,
    figures: tuple[str, ...] = (),
    summary: dict | None = None,
    complete: bool = True,
) -> Path:
    """A small run directory written through RunStore, as an analysis would."""
    config = {
        "model": {"class": "Tiny", "fingerprint": "f" * 64},
        "data": {"name": "toy", "fingerprint": "d" * 64, "size": 3},
        "note": SCRIPT,
    }
    if analysis is not None:
        config["analysis"] = analysis
    store = RunStore(path, config)
    store.update_meta({"invariscope": "9.8.7-test", "torch": "x", "device": "cpu"})
    for i, name in enumerate(figures):
        write_png(store.path("figures", f"{name}.png"), color=(30 * i, 100, 200))
    if complete:
        store.finalize(summary or {"score": 0.5}, aggregates=aggregates or {})
    return path


def mystery_run(path: Path) -> Path:
    """A run of an analysis nobody registered, with a long table holding arrays and markup."""
    n = 150
    big = pd.DataFrame(
        {
            "i": np.arange(n),
            "value": np.arange(n) / 3,
            "vector": [np.arange(10, dtype=float) + i for i in range(n)],
            "text": [SCRIPT if i == 0 else f"row {i}" for i in range(n)],
        }
    )
    small = pd.DataFrame({"a": [1.0, float("nan")], "flag": [True, False]})
    return make_run(
        path,
        "mystery-analysis",
        {"big": big, "small": small},
        figures=("only",),
        summary={"nested": {"x": 1.23456789, "missing": None}, "markup": SCRIPT},
    )


def alignment_means() -> pd.DataFrame:
    """A hand-made ``alignment_mean`` table: two layers, two magnitudes per transformation.

    rotation 90 and translate_x 2 are exact on the pixel grid (floor 0 at every layer);
    rotation 90 has the largest error, yet 45 is the informative angle.
    """
    rows = []
    values = {  # (transform, magnitude, method): (conv1, pool1)
        ("translate_x", 1.0, "exact"): (0.0, 0.05),
        ("translate_x", 1.0, "floor"): (0.0, 0.1),
        ("translate_x", 2.0, "exact"): (0.0, 0.0),
        ("translate_x", 2.0, "floor"): (0.0, 0.0),
        ("rotation", 45.0, "exact"): (0.5, 0.3),
        ("rotation", 45.0, "floor"): (0.1, 0.2),
        ("rotation", 90.0, "exact"): (0.7, 0.6),
        ("rotation", 90.0, "floor"): (0.0, 0.0),
    }
    units = {"translate_x": "pixel", "rotation": "degree"}
    for (transform, magnitude, method), means in values.items():
        for order, (layer, mean) in enumerate(zip(("conv1", "pool1"), means, strict=True)):
            rows.append(
                {
                    "transform": transform,
                    "unit": units[transform],
                    "magnitude": magnitude,
                    "layer": layer,
                    "order": order,
                    "method": method,
                    "n": 4,
                    "mean": mean,
                    "low": mean - 0.01 * (order + 1) if mean else 0.0,
                    "high": mean + 0.01 * (order + 1) if mean else 0.0,
                }
            )
    return pd.DataFrame(rows)


def alignment_run(path: Path) -> Path:
    """A finished run of the registered ``alignment`` analysis, written by hand."""
    return make_run(
        path,
        "alignment",
        {"alignment_mean": alignment_means()},
        figures=("alignment_rotation",),
        summary={"num_images": 4, "rotation": {"magnitude": 45.0, "unit": "degree"}},
    )


ALIGNMENT_HEADLINE = (
    "Relative error of the inverse warp on the feature maps (4 images, mean with 95% "
    "interval, worst layer), at the magnitude where it fails most: translate_x 1 pixel: up "
    "to 0.05 [0.03, 0.07] (pool1) against an interpolation floor of at most 0.1; rotation 45 "
    "degree: up to 0.5 [0.49, 0.51] (conv1) against an interpolation floor of at most 0.2. "
    "Not headlined: translate_x 2 pixel; rotation 90 degree, exact on the pixel grid "
    "(nothing is interpolated: the floor is 0)."
)


def register_documented() -> None:
    from invariscope.engine.registry import AnalysisEntry, register_analysis

    class Documented:  # stands in for an Analysis subclass
        pass

    try:
        from invariscope.engine.registry import get_analysis

        get_analysis(DOCUMENTED)
    except InvariscopeError:
        register_analysis(
            AnalysisEntry(
                name=DOCUMENTED,
                analysis=Documented,
                title="Documented analysis",
                paper=DOC_PAPER,
                about=DOC_ABOUT,
                command="documented",
                report_tables=("second", "first", "absent"),
                figure_order=("zeta",),
            )
        )


class Page(HTMLParser):
    """Tags with their attributes, the section each lies in, and the text of each section."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict, str | None]] = []
        self.text: dict[str | None, list[str]] = {}
        self.section: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id")
        self.tags.append((tag, attrs, self.section))

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        self.text.setdefault(self.section, []).append(data)

    def find(self, tag: str, section: str | None = ..., attr: str | None = None) -> list[dict]:
        return [
            a
            for t, a, s in self.tags
            if t == tag and (section is ... or s == section) and (attr is None or attr in a)
        ]

    def section_text(self, section: str | None) -> str:
        return " ".join(" ".join(self.text.get(section, [])).split())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run directories of the report: sweep, its copy under a weird name, two hand-made."""
    register_documented()
    base = tmp_path_factory.mktemp("report-runs")
    sweep = sweep_run_dir(tmp_path_factory)
    weird = base / WEIRD_NAME
    shutil.copytree(sweep, weird)
    mystery = mystery_run(base / "mystery")
    documented = make_run(
        base / "documented",
        DOCUMENTED,
        {
            "first": pd.DataFrame({"x": [1, 2]}),
            "second": pd.DataFrame({"y": [3.0]}),
            "hidden": pd.DataFrame({"z": [0]}),
        },
        figures=("alpha", "zeta", "beta"),
    )
    return {"sweep": sweep, "weird": weird, "mystery": mystery, "documented": documented}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """``(index.html path, its text, parsed page, run dirs in section order)``.

    Built with model loading and ``torch.load`` made to fail, and checked to leave every
    run directory exactly as it was.
    """
    import torch

    import invariscope.models
    import invariscope.models.loading

    def boom(*args, **kwargs):
        raise AssertionError("the report loaded a model")

    # given out of order: the sections follow the registry (sweep first, a registered
    # analysis outside the built-ins next, an unknown one last), one analysis's runs in
    # the order given
    given = [runs["mystery"], runs["sweep"], runs["documented"], runs["weird"]]
    order = [runs["sweep"], runs["weird"], runs["documented"], runs["mystery"]]
    before = {str(d): _snapshot(d) for d in order}
    out = tmp_path_factory.mktemp("report") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", boom)
        mp.setattr(invariscope.models, "load_model", boom)
        mp.setattr(invariscope.models.loading, "load_model", boom)
        index = build_report(given, out)
    assert {str(d): _snapshot(d) for d in order} == before, "the report wrote to a run"
    text = index.read_text(encoding="utf-8")
    return index, text, Page(text), order


def test_index_written_beside_figures(report):
    index, text, page, order = report
    assert index.name == "index.html" and index.is_file()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not list(index.parent.glob(".*.tmp")) and not list(index.parent.glob(".index*"))
    assert not _CACHE["checkpoint"].exists()  # built without the model


def test_every_run_has_its_section_in_order_and_in_the_contents(report):
    _, _, page, order = report
    ids = [a["id"] for a in page.find("section") if "id" in a]
    assert ids == [section_id(k, d) for k, d in enumerate(order, start=1)]
    assert len(set(ids)) == 4
    contents = [a["href"] for a in page.find("a", section=None, attr="href")]
    assert [f"#{i}" for i in ids] == [h for h in contents if h.startswith("#run-")]


def test_figures_are_copied_beside_the_page_and_referenced_relatively(report):
    index, _, page, order = report
    for k, run_dir in enumerate(order, start=1):
        sid = section_id(k, run_dir)
        srcs = [a["src"] for a in page.find("img", section=sid)]
        pngs = sorted((run_dir / "figures").glob("*.png"))
        assert pngs and len(srcs) == len(pngs), sid
        for src in srcs:
            assert not src.startswith(("/", "file:")) and ":" not in src, src
            copied = index.parent / src
            assert copied.is_file(), src
            assert copied.read_bytes() == (run_dir / "figures" / copied.name).read_bytes()
        assert len({str(Path(s).parent) for s in srcs}) == 1  # one folder per run
    folders = {p.name for p in (index.parent / "runs").iterdir()}
    assert len(folders) == 4


def test_images_carry_their_display_size_from_the_png_dpi(report):
    _, _, page, order = report
    sid = section_id(3, order[2])
    img = page.find("img", section=sid)[0]
    # 240x160 pixels at 150 dpi -> 154x102 CSS pixels (96 per inch)
    assert (img["width"], img["height"]) == ("154", "102")


def test_figures_follow_the_registered_order_then_sorted(report):
    _, _, page, order = report
    srcs = [Path(a["src"]).stem for a in page.find("img", section=section_id(3, order[2]))]
    assert srcs == ["zeta", "alpha", "beta"]


def _tables(page: Page, sid: str) -> list[str]:
    return [a["data-table"] for a in page.find("details", section=sid, attr="data-table")]


def test_tables_of_a_registered_analysis_in_its_order(report):
    _, _, page, order = report
    sid = section_id(3, order[2])
    assert _tables(page, sid) == ["second", "first"]
    words = page.section_text(sid)
    assert "Not stored in this run: absent." in words
    assert "not shown: hidden." in words
    assert DOC_ABOUT in words and DOC_PAPER in words
    assert "Documented analysis" in words and "does not know" not in words


def test_sweep_section_shows_its_aggregate_tables(report):
    from invariscope.engine.registry import get_analysis

    _, _, page, order = report
    store = RunStore.open(order[0])
    try:
        entry = get_analysis("sweep")
    except InvariscopeError:  # not registered (yet): the generic section shows them all
        expected = store.aggregates()
    else:
        expected = [n for n in entry.report_tables if n in store.aggregates()]
        words = page.section_text(section_id(1, order[0]))
        assert entry.about in words and entry.title in words
    assert "accuracy" in expected and "thresholds" in expected
    for k in (1, 2):
        assert _tables(page, section_id(k, order[k - 1])) == expected


def test_unknown_analysis_gets_a_generic_section(report):
    _, text, page, order = report
    sid = section_id(4, order[3])
    words = page.section_text(sid)
    assert "does not know how to present this run" in words
    assert "unknown analysis 'mystery-analysis'" in words
    assert _tables(page, sid) == ["big", "small"]
    assert page.find("section", section=sid)[0]["data-analysis"] == "mystery-analysis"


def test_long_tables_are_cut_and_arrays_shortened(report):
    _, text, page, order = report
    sid = section_id(4, order[3])
    assert f"first {MAX_ROWS} of 150 rows" in page.section_text(sid)
    big = text.split('data-table="big"', 1)[1].split("</details>", 1)[0]
    assert big.count("<tr>") == MAX_ROWS + 1  # header + MAX_ROWS rows
    assert "row 59" in big and "row 60" not in big
    assert "[0, 1, 2, 3, …] (10 values)" in big
    assert "0.3333" in big and "0.33333" not in big  # floats with 4 significant digits
    assert "[0.0, 1.0" not in big
    small = text.split('data-table="small"', 1)[1].split("</details>", 1)[0]
    assert '<td class="num na">–</td>' in small and "true" in small


def test_summary_configuration_hash_fingerprints_and_versions(report):
    _, text, page, order = report
    for k, run_dir in enumerate(order, start=1):
        store = RunStore.open(run_dir)
        sid = section_id(k, run_dir)
        words = page.section_text(sid)
        assert store.config_hash in words, sid
        assert store.config["model"]["fingerprint"] in words
        assert store.config["data"]["fingerprint"] in words
        assert store.meta["invariscope"] in words
        for key in store.summary:
            assert key in words, (sid, key)
    words = page.section_text(section_id(1, order[0]))
    assert "identity_accuracy" in words and "worst_case.worst_of_k" in words
    config = RunStore.open(order[0]).config
    assert html.escape(json.dumps(config, indent=2, sort_keys=True)) in text
    mystery = page.section_text(section_id(4, order[3]))
    assert "nested.x 1.235" in mystery and "nested.missing –" in mystery
    footer = page.section_text(None)
    assert f"Generated by invariscope {__version__}" in footer


def test_everything_is_escaped(report):
    _, text, page, order = report
    assert "<b>" not in text and SCRIPT not in text and "<i>" not in text
    assert html.escape(SCRIPT) in text
    assert html.escape("run <b>&'weird\" #2") in text
    weird = page.find("section")[1]
    assert weird["data-run"] == WEIRD_NAME  # the attribute round-trips through escaping
    assert weird["id"] == "run-2-run-b-weird-2"


def test_offline_no_remote_resources_no_scripts(report):
    _, text, page, _ = report
    for tag, attrs, _ in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is not None:
                assert "://" not in value and not value.startswith("//"), (tag, value)
                assert value.startswith("#") or not value.startswith("/"), (tag, value)
    assert "http://" not in text and "https://" not in text
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    style = text.split("<style>", 1)[1].split("</style>", 1)[0]
    assert "@import" not in style and "url(" not in style


def test_cli_prints_the_page_and_rebuilds_in_place(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert run(["report", str(runs["mystery"]), str(runs["documented"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(out / "index.html")
    assert len(list((out / "runs").iterdir())) == 2
    keep = out / "runs" / "notes.txt"
    keep.write_text("mine")
    assert run(["report", str(runs["documented"]), "--out", str(out)]) == 0
    # the figures of the earlier report's sections are gone, other files are kept
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["1-documented", "notes.txt"]
    page = Page((out / "index.html").read_text())
    assert [a["id"] for a in page.find("section")] == ["run-1-documented"]


def test_incomplete_run_is_refused_with_one_line(tmp_path, runs, capsys):
    unfinished = make_run(tmp_path / "unfinished", DOCUMENTED, complete=False)
    out = tmp_path / "rep"
    with pytest.raises(InvariscopeError, match="same command again") as err:
        build_report([runs["documented"], unfinished], out)
    assert "unfinished" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()  # nothing written when a run is refused
    assert run(["report", str(unfinished), "--out", str(out)]) == 2
    assert "is not complete" in one_line_error(capsys)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("not-a-run", "not an invariscope run directory"),
        ("out-is-file", "is a file"),
        ("twice", "given twice"),
    ],
)
def test_cli_errors_exit_2(case, fragment, runs, tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["report", str(runs["documented"]), "--out", str(out)]
    if case == "not-a-run":
        argv[1] = str(tmp_path)
    elif case == "out-is-file":
        out.write_text("a file")
    else:
        argv.insert(2, str(runs["documented"]) + "/")
    assert run(argv) == 2
    assert fragment in one_line_error(capsys)
    assert out.is_file() if case == "out-is-file" else not out.exists()


def test_cli_needs_a_run_and_out(capsys):
    assert run(["report", "--out", "x"]) == 2
    assert "RUN_DIRS" in one_line_error(capsys)
    with pytest.raises(InvariscopeError, match="no run directories"):
        build_report([], "x")


def test_short_values():
    assert _short(float("nan")) == "–" and _short(None) == "–" and _short(pd.NA) == "–"
    assert _short(0.123456) == "0.1235" and _short(-90.0) == "-90" and _short(123456.7) == "123457"
    assert _short(np.arange(3)) == "[0, 1, 2]"
    assert _short(np.zeros((2, 3))) == "array 2×3"
    assert _short([[1, 2], [3]]) == "[[2 values], [1 value]]"
    assert _short(np.bool_(True)) == "true" and _short(b"abc") == "<3 bytes>"


# ------------------------------------------------------------- headlines and pivots


def test_alignment_headlines_the_informative_magnitude_not_the_on_grid_one():
    from invariscope.measure.alignment import AlignmentAnalysis, informative_magnitude

    table = alignment_means()
    rot = table[table["transform"] == "rotation"]
    # 90 deg has the largest error (0.65 mean over layers) but is exact on the pixel grid
    magnitude, why = informative_magnitude(rot)
    assert magnitude == 45.0 and "on the grid: 90" in why
    # every magnitude on the grid: the largest error among them
    grid_only = rot[rot["magnitude"] == 90.0]
    assert informative_magnitude(grid_only)[0] == 90.0
    summary = {"num_images": 4}
    assert AlignmentAnalysis.headline(summary, {"alignment_mean": table}, {}) == ALIGNMENT_HEADLINE


def test_alignment_pivot_is_layer_by_transformation():
    from invariscope.measure.alignment import AlignmentAnalysis

    pivots = AlignmentAnalysis.pivots({"alignment_mean": alignment_means()}, {})
    exact = next(v for k, v in pivots.items() if k.startswith("Relative alignment error, exact"))
    assert exact.index.name == "layer" and exact.index.tolist() == ["conv1", "pool1"]
    assert exact.columns.tolist() == ["translate_x 1 pixel", "rotation 45 degree"]
    assert exact.to_numpy().tolist() == [[0.0, 0.5], [0.05, 0.3]]
    floor = next(v for k, v in pivots.items() if k.startswith("Interpolation floor"))
    assert floor.to_numpy().tolist() == [[0.0, 0.1], [0.1, 0.2]]
    every = next(v for k, v in pivots.items() if k.endswith("every magnitude"))
    assert every.columns.tolist() == [
        "translate_x 1 pixel",
        "translate_x 2 pixel",
        "rotation 45 degree",
        "rotation 90 degree",
    ]
    assert every.loc["pool1"].tolist() == [0.05, 0.0, 0.3, 0.6]


def _worst_case_table() -> pd.DataFrame:
    settings = ["natural", "random", "worst_of_k", "grid"]
    rows = [
        {
            "label": -1,
            "setting": s,
            "n": 10,
            "accuracy": a,
            "accuracy_low": a - 0.1,
            "accuracy_high": min(1.0, a + 0.1),
        }
        for s, a in zip(settings, [0.9, 0.5, 0.2, 0.0], strict=True)
    ]
    rows += [
        {"label": c, "setting": s, "n": 5, "accuracy": a, "accuracy_low": 0.0, "accuracy_high": 1.0}
        for c, accs in ((0, [1.0, 0.6, 0.4, 0.0]), (1, [0.8, 0.4, 0.0, 0.0]))
        for s, a in zip(settings, accs, strict=True)
    ]
    return pd.DataFrame(rows)


def test_worst_case_headline_and_pivots_by_hand():
    from invariscope.measure.worst_case import WorstCaseAnalysis

    config = {
        "worst_case": {"max_angle": 30.0, "max_shift": 3.0, "angles": 7, "shifts": 3, "k": 10}
    }
    aggregates = {
        "worst_case_summary": _worst_case_table(),
        "classes": pd.DataFrame({"label": [0, 1], "name": ["zero", "one"]}),
    }
    text = WorstCaseAnalysis.headline({"num_images": 10}, aggregates, config)
    assert text == (
        "Top-1 accuracy on 10 images within +-30 deg, +-3 px: natural 0.9 [0.8, 1], "
        "random 0.5 [0.4, 0.6], worst-of-10 0.2 [0.1, 0.3], grid 0 [-0.1, 0.1] (95% "
        "intervals). The worst rotation and shift per image costs 0.9 of accuracy against "
        "the untransformed images."
    )
    title = WorstCaseAnalysis.section_title("Worst case", config)
    assert title == "Worst case (+-30 deg, +-3 px, grid 7x3x3, k=10)"
    pivots = WorstCaseAnalysis.pivots(aggregates, config)
    per_class = pivots["Accuracy per class and setting (fraction correct)"]
    assert per_class.index.tolist() == ["zero", "one"]
    assert per_class.columns.tolist() == [
        "natural accuracy",
        "random accuracy",
        "worst-of-k accuracy",
        "grid accuracy",
    ]
    assert per_class.to_numpy().tolist() == [[1.0, 0.6, 0.4, 0.0], [0.8, 0.4, 0.0, 0.0]]
    settings = pivots["Accuracy under the worst-case search"]
    assert settings["accuracy (fraction correct)"].tolist() == [0.9, 0.5, 0.2, 0.0]


def test_shift_pivot_is_model_by_protocol():
    from invariscope.measure.shift import ShiftAnalysis

    s = pd.DataFrame(
        {
            "model": ["model", "baseline", "model", "baseline"],
            "protocol": ["embed", "embed", "crop", "crop"],
            "n_images": [8, 8, 8, 8],
            "p_top1_change": [0.25, 0.5, 0.125, 0.375],
            "p_top1_change_low": [0.2, 0.4, 0.1, 0.3],
            "p_top1_change_high": [0.3, 0.6, 0.2, 0.4],
        }
    )
    models = pd.DataFrame({"model": ["model", "baseline"], "label": ["blur", "max"]})
    aggregates = {"shift_summary": s, "models": models}
    pivot = ShiftAnalysis.pivots(aggregates, {})[
        "P(top-1 change) between adjacent shifts (model x protocol)"
    ]
    assert pivot.index.tolist() == ["blur", "max"] and pivot.columns.tolist() == ["embed", "crop"]
    assert pivot.to_numpy().tolist() == [[0.25, 0.125], [0.5, 0.375]]
    text = ShiftAnalysis.headline({"num_images": 8}, aggregates, {})
    assert text == (
        "On 8 images, the top-1 prediction changes between adjacent shifts for blur 25.0% "
        "[20.0, 30.0] (embed), 12.5% [10.0, 20.0] (crop); max 50.0% [40.0, 60.0] (embed), "
        "37.5% [30.0, 40.0] (crop) (95% intervals)."
    )


def test_default_headline_lists_the_first_numbers():
    from invariscope.engine.analysis import Analysis

    summary = {"num_images": 40, "score": 0.123456, "flag": True, "name": "x", "loss": 2}
    assert Analysis.headline(summary, {}, {}) == "On 40 images: score 0.1235, loss 2."
    assert Analysis.headline({}, {}, {}) == ""
    assert Analysis.pivots({}, {}) == {}
    assert Analysis.section_title("T", {}) == "T"


def test_sweep_titles_tell_the_kinds_of_run_apart():
    from invariscope.measure.sweep import SweepAnalysis

    one = {"transforms": {"rotation": [0.0, 90.0]}, "pairs": [], "worst_case": None}
    two = {
        "transforms": {},
        "pairs": [["translate_x", [0.0], "translate_y", [0.0]]],
        "worst_case": {"max_angle": 30.0, "max_shift": 3.0, "angles": 7, "shifts": 3, "k": 10},
    }
    assert SweepAnalysis.section_title("Sweeps", one) == "Sweeps: rotation"
    assert SweepAnalysis.section_title("Sweeps", two) == (
        "Sweeps: translate_x x translate_y grid; worst case (+-30 deg, +-3 px)"
    )


def test_sections_have_distinct_titles_and_open_with_the_headline(report):
    _, text, page, order = report
    titles = [
        " ".join(chunk.split("</span>", 1)[0].split())
        for chunk in text.split('<span class="title">')[1:]
    ]
    assert len(titles) == 4 and len(set(titles)) == 4
    # the two sweeps share their configuration and what they measured: both carry their
    # run's name after "model on data"
    from invariscope.engine.registry import get_analysis

    entry = get_analysis("sweep")
    base = entry.analysis.section_title(entry.title, RunStore.open(order[0]).config)
    assert base.startswith(f"{entry.title}: gaussian_noise, rotation;")
    measured = f"{base}: {Path(RunStore.open(order[0]).meta['model_spec']).name} on digits"
    assert titles[0] == html.escape(f"{measured} (sweep)", quote=True)
    assert titles[1] == html.escape(f"{measured} ({WEIRD_NAME})", quote=True)
    sweep = text.split(f'id="{section_id(1, order[0])}"', 1)[1].split("</section>", 1)[0]
    marks = ['class="headline"', 'class="pivot"', "<figure", 'class="all-values"']
    where = [sweep.index(m) for m in marks]
    assert where == sorted(where)  # headline, pivoted tables, figures, then all values
    assert sweep.split("</h2>", 1)[1].lstrip().startswith('<p class="headline">')
    assert "identity accuracy is" in sweep
    # the all-values block is collapsed and holds the summary and the stored tables
    block = sweep.split('<details class="all-values"', 1)[1]
    assert block.startswith(">") and "identity_accuracy" in block and 'data-table="' in block


def test_report_of_a_hand_made_alignment_run(tmp_path):
    run_dir = alignment_run(tmp_path / "align")
    index = build_report([run_dir], tmp_path / "out")
    text = index.read_text(encoding="utf-8")
    page = Page(text)
    sid = section_id(1, run_dir)
    words = page.section_text(sid)
    assert " ".join(html.escape(ALIGNMENT_HEADLINE, quote=True).split()) in " ".join(text.split())
    assert "Feature-map alignment" in words
    pivot = text.split('class="pivot"', 1)[1].split("</table>", 1)[0]
    assert pivot.count("<tr>") == 3  # header + conv1 + pool1
    assert "<th>layer</th>" in pivot and "translate_x 1 pixel" in pivot
    assert "rotation 45 degree" in pivot and "rotation 90 degree" not in pivot


def test_coinciding_titles_are_told_apart_by_data_then_path_then_number(tmp_path):
    """Two runs of one analysis on different data get "on <data>"; on the same data, the
    shortest tail of their run paths that differs; the same path twice, their number."""
    from types import SimpleNamespace

    from invariscope.report.html import _distinct_titles

    def run(k, path, data, model=None):
        meta = {"model_spec": model} if model else {}
        store = SimpleNamespace(meta=meta, config={"data": {"name": data}})
        return SimpleNamespace(k=k, run_dir=tmp_path / path, store=store, title="Shift")

    runs = [run(1, "a/shift", "digits"), run(2, "b/shift", "photos", "resnet18")]
    _distinct_titles(runs)
    assert [r.title for r in runs] == ["Shift: on digits", "Shift: resnet18 on photos"]

    runs = [run(1, "a/shift", "digits"), run(2, "b/shift", "digits"), run(3, "x", "photos")]
    _distinct_titles(runs)
    assert [r.title for r in runs] == [
        "Shift: on digits (a/shift)",
        "Shift: on digits (b/shift)",
        "Shift: on photos",
    ]

    runs = [run(1, "a/shift", "digits"), run(2, "a/shift", "digits")]
    _distinct_titles(runs)
    assert [r.title for r in runs] == ["Shift: on digits (run 1)", "Shift: on digits (run 2)"]
