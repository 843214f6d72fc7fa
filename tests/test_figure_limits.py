"""Every figure keeps its data inside its axes and fits the page.

Each registered analysis runs its small conformance configuration (an untrained
simple-cnn, the arguments it registers for the conformance test) and draws its figures;
synthetic tables add the cases a tiny run does not reach (two models, many panels). Every
plotted value - line and marker data, scatter offsets, bars, error bars and bands - must
lie within its axes' limits, and no saved PNG may be wider than ``MAX_WIDTH_PX``.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PathCollection, PolyCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.patches import Rectangle

from invariscope.cli import run
from invariscope.engine.registry import list_analyses

#: The widest a saved figure may be: a page-width image in the report at full resolution.
MAX_WIDTH_PX = 1600


@pytest.fixture
def drawn(monkeypatch):
    """Every Figure saved while the test runs (each is still written to disk)."""
    kept: list[Figure] = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        if not kept or kept[-1] is not fig:
            kept.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return kept


def _points(ax) -> list[tuple[str, np.ndarray, bool, bool]]:
    """``(what, xy [N, 2], check x, check y)`` of every data-space artist of ``ax``."""
    out = []
    data, xaxis, yaxis = ax.transData, ax.get_xaxis_transform(), ax.get_yaxis_transform()

    def which(transform) -> tuple[bool, bool] | None:
        if transform == data:
            return True, True
        if transform == xaxis:  # x in data, y in axes coordinates (axvline)
            return True, False
        if transform == yaxis:  # y in data (axhline)
            return False, True
        return None

    for line in ax.get_lines():
        axes_ = which(line.get_transform())
        if line.get_visible() and axes_:
            out.append((f"line {line.get_label()!r}", line.get_xydata(), *axes_))
    for coll in ax.collections:
        if not coll.get_visible():
            continue
        if isinstance(coll, PathCollection) and which(coll.get_offset_transform()) == (
            True,
            True,
        ):
            out.append(("scatter", np.asarray(coll.get_offsets()), True, True))
        elif isinstance(coll, LineCollection) and which(coll.get_transform()):
            for seg in coll.get_segments():
                out.append(("error bar / segments", np.asarray(seg), *which(coll.get_transform())))
        elif isinstance(coll, PolyCollection) and which(coll.get_transform()):
            for path in coll.get_paths():
                out.append(("band", path.vertices, *which(coll.get_transform())))
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_visible():
            axes_ = which(patch.get_transform())
            if axes_:
                x, y, w, h = patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()
                corners = np.array([[x, y], [x + w, y + h]], dtype=float)
                out.append(("bar", corners, *axes_))
    return out


def outside_limits(fig: Figure) -> list[str]:
    """Each artist with a finite value outside its axes' limits, described."""
    problems = []
    for k, ax in enumerate(fig.axes):
        limits = [sorted(ax.get_xlim()), sorted(ax.get_ylim())]
        for what, xy, *check in _points(ax):
            xy = np.asarray(xy, dtype=float).reshape(-1, 2)
            for dim in (0, 1):
                if not check[dim]:
                    continue
                v = xy[:, dim][np.isfinite(xy[:, dim])]
                low, high = limits[dim]
                tol = 1e-9 * max(abs(high - low), 1e-12)
                bad = v[(v < low - tol) | (v > high + tol)]
                if len(bad):
                    problems.append(
                        f"axes {k} ({ax.get_title()!r}): {what} {'xy'[dim]} = {bad.max():.4g} "
                        f"/ {bad.min():.4g} outside [{low:.4g}, {high:.4g}]"
                    )
    return problems


def _check(figs: list[Figure], out_dir) -> None:
    assert figs, "no figure was drawn"
    problems = [f"{fig.get_suptitle()!r} {p}" for fig in figs for p in outside_limits(fig)]
    assert not problems, "\n".join(problems)
    pngs = sorted(out_dir.rglob("*.png"))
    assert pngs
    wide = {p.name: imread(p).shape[1] for p in pngs if imread(p).shape[1] > MAX_WIDTH_PX}
    assert not wide, f"wider than {MAX_WIDTH_PX} px: {wide}"


# --------------------------------------------------------------- the check itself


def test_the_check_finds_a_clipped_line_a_clipped_bar_and_a_clipped_band():
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 9.3])
    ax.set_ylim(0, 8.4)
    assert any("9.3" in p for p in outside_limits(fig))
    fig = Figure()
    ax = fig.add_subplot()
    ax.bar([0, 1], [1.0, 2.0], yerr=[0.1, 0.5])
    ax.set_ylim(0, 2.2)  # the bar fits, its error bar (2.5) does not
    problems = outside_limits(fig)
    assert problems and all("error bar" in p or "line" in p for p in problems)
    fig = Figure()
    ax = fig.add_subplot()
    ax.fill_between([0, 1], [0, 0], [1, 3])
    ax.axhline(5.0)
    ax.set_ylim(0, 2.5)  # the band reaches 3
    problems = outside_limits(fig)
    assert any("band" in p for p in problems) and any("line" in p for p in problems)
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 9.3])
    ax.scatter([0.5], [1.0])
    assert outside_limits(fig) == []  # autoscaled: everything inside


# --------------------------------------------------------- every analysis, tiny runs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from invariscope.models import create_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("limits") / "simple-cnn.pt"
    save_checkpoint(create_model("simple-cnn"), path)
    return path


ENTRIES = {e.name: e for e in list_analyses() if e.figures and e.conformance}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_analysis_figure_keeps_its_data_inside_the_axes(name, checkpoint, tmp_path, drawn):
    entry = ENTRIES[name]
    out = tmp_path / "run"
    argv = [entry.command, "--model", str(checkpoint), *entry.conformance, "--no-progress"]
    assert run([*argv, "--no-figures", "--out", str(out)]) == 0
    drawn.clear()
    paths = entry.render()(out, tmp_path / "figures")
    assert paths
    _check(drawn, tmp_path / "figures")


# ------------------------------------------------------ synthetic tables: more panels


def test_shift_figures_of_two_models_fit(tmp_path, drawn):
    from test_plots_shift import _tables

    from invariscope.plots.shift import render_shift_figures

    tables = _tables()
    # the BlurPool case of issue 20: the second model's nonshiftability is the highest
    if "nonshiftability" in tables:
        t = tables["nonshiftability"]
        t.loc[t["model"] == "model", "nonshiftability"] += 9.0
    render_shift_figures(tables, tmp_path)
    _check(drawn, tmp_path)


def test_stitch_and_lee_figures_fit(tmp_path, drawn):
    from test_plots_stitch_lee import _lee_tables, _stitch_tables

    from invariscope.plots.lee import render_lee_figures
    from invariscope.plots.stitch import render_stitch_figures

    render_stitch_figures(_stitch_tables(), tmp_path)
    render_lee_figures(_lee_tables(), tmp_path)
    _check(drawn, tmp_path)


def test_one_seed_draws_no_error_bar_and_says_n_1(checkpoint, tmp_path, drawn):
    entry = ENTRIES["stn_benchmark"]
    out = tmp_path / "run"
    argv = [entry.command, "--model", str(checkpoint), *entry.conformance, "--no-progress"]
    assert "--seeds" in argv and argv[argv.index("--seeds") + 1] == "1"
    assert run([*argv, "--no-figures", "--out", str(out)]) == 0
    drawn.clear()
    entry.render()(out, tmp_path / "figures")
    bars = [f for f in drawn if f.axes and f.axes[0].patches]
    assert bars
    for fig in bars:
        ax = fig.axes[0]
        assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert not [c for c in ax.collections if isinstance(c, LineCollection)]
        assert "n = 1 seed: no error bars" in ax.get_title()


def test_lee_puts_one_unit_on_each_axis(tmp_path, drawn):
    """lee.png: every panel's bars (x tick labels "<transform> (per <unit>)") share one
    unit, and the y label names it."""
    import re

    from test_plots_stitch_lee import _lee_tables

    from invariscope.plots.lee import render_lee_figures

    units = {"translate_x": "px", "translate_y": "px", "rotation": "degrees", "zoom": "log-scale"}
    render_lee_figures(_lee_tables(transforms=units), tmp_path)
    (fig,) = [f for f in drawn if "Lie-derivative equivariance error" in f.get_suptitle()]
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 2 * len(set(units.values()))
    for ax in panels:
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        shown = {re.search(r"\(per (.+)\)$", t).group(1) for t in ticks}
        assert len(shown) == 1, ticks
        assert f"per {shown.pop()}" in ax.get_ylabel()
