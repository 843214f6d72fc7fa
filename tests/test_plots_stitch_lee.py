"""Figures of the stitching and LEE analyses, drawn from small synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

from invariscope.errors import InvariscopeError
from invariscope.plots import lee, stitch
from invariscope.runs.store import RunStore

LAYERS_A = ["conv1", "pool1", "conv2", "fc"]
LAYERS_B = ["conv1", "blur1", "conv2", "blur2", "fc"]
LABELS = {"model": "small-vgg.ckpt", "model_b": "small-vgg-blurpool.ckpt"}
TRANSFORMS = {"translate_x": "px", "rotate": "degrees", "scale": "log-scale"}
LAYERS = ["conv1", "relu1", "pool1", "conv2", "relu2", "fc"]


def _files(names) -> set[str]:
    return {f"{n}.{ext}" for n in names for ext in ("png", "svg")}


def _stitch_tables(layers_a=LAYERS_A, layers_b=LAYERS_B, seed=0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    error, cka = [], []
    for i, a in enumerate(layers_a):
        for j, b in enumerate(layers_b):
            e = float(rng.uniform(0, 1))
            pair = {"layer_a": a, "layer_b": b, "order_a": i, "order_b": j}
            error.append(
                pair
                | {
                    "error": e,
                    "error_low": max(e - 0.03, 0.0),
                    "error_high": min(e + 0.02, 1.0),
                    "n": 500,
                }
            )
            cka.append(
                pair | {"cka": float(rng.uniform(0, 1)), "constant_a": False, "constant_b": False}
            )
    # shuffled: the heatmaps must order by order_a / order_b, not by position
    return {
        "stitch_error": pd.DataFrame(error).sample(frac=1.0, random_state=seed),
        "cka": pd.DataFrame(cka).sample(frac=1.0, random_state=seed + 1),
        "models": pd.DataFrame(
            {
                "model": ["model", "model_b"],
                "label": [LABELS["model"], LABELS["model_b"]],
                "error": [0.02, 0.034],
                "error_low": [0.01, 0.02],
                "error_high": [0.03, 0.05],
                "n": [500, 500],
            }
        ),
    }


def _lee_tables(transforms=TRANSFORMS, layers=LAYERS, seed=0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    summary, per_layer, contrib = [], [], []
    for k, (transform, unit) in enumerate(transforms.items()):
        value = 10.0 ** (k - 1) * rng.uniform(1, 3)
        absolute = np.sqrt(value) * 0.8
        summary.append(
            {
                "transform": transform,
                "unit": unit,
                "n": 64,
                "lee": value,
                "lee_low": value * 0.7,
                "lee_high": value * 1.3,
                "lee_abs": absolute,
                "lee_abs_low": absolute * 0.9,
                "lee_abs_high": absolute * 1.1,
                "median_lee": value * 0.4,
            }
        )
        for order, layer in enumerate(layers):
            mean = float(rng.uniform(0.5, 2.0)) * 2.0**order
            per_layer.append(
                {
                    "transform": transform,
                    "layer": layer,
                    "order": order,
                    "mean": mean,
                    "low": mean * 0.8,
                    "high": mean * 1.2,
                    "rel_mean": mean / 100.0 * (k + 1),
                    "n": 64,
                }
            )
            share = float(rng.uniform(-0.2, 1.0))
            contrib.append(
                {
                    "transform": transform,
                    "layer": layer,
                    "order": order,
                    "mean": mean * 1e-3,
                    "low": mean * 0.6e-3,
                    "high": mean * 1.4e-3,
                    "share_mean": share,
                    "n": 64,
                }
            )
    return {
        "lee_summary": pd.DataFrame(summary),
        "lee_layers_mean": pd.DataFrame(per_layer).sample(frac=1.0, random_state=seed),
        "lee_contrib_mean": pd.DataFrame(contrib).sample(frac=1.0, random_state=seed + 1),
        "transforms": pd.DataFrame(
            {"transform": list(transforms), "unit": list(transforms.values())}
        ),
    }


def _check_pngs(paths, out_dir, expected: set[str]) -> None:
    assert {p.name for p in paths} == _files(expected)
    assert {p.name for p in out_dir.iterdir()} == _files(expected)
    for path in paths:
        assert path.exists() and path.parent == out_dir
        if path.suffix == ".png":
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert len(data) > 10_000


def _panels(fig):
    return [ax for ax in fig.axes if ax.images]


# ------------------------------------------------------------------------ stitching


def test_stitch_figure_is_written(tmp_path):
    paths = stitch.render_stitch_figures(_stitch_tables(), tmp_path / "figs")
    _check_pngs(paths, tmp_path / "figs", {"stitch_cka"})


@pytest.mark.parametrize(
    "drop, titles",
    [
        ([], ["top-1 error", "linear CKA"]),
        (["cka"], ["top-1 error"]),
        (["stitch_error"], ["linear CKA"]),
        (["models"], ["top-1 error", "linear CKA"]),
    ],
)
def test_missing_stitch_table_drops_its_panel(tmp_path, drop, titles):
    tables = {k: v for k, v in _stitch_tables().items() if k not in drop}
    fig = stitch._stitch_figure(tables)
    panels = _panels(fig)
    assert len(panels) == len(titles)
    for ax, expected in zip(panels, titles, strict=True):
        assert expected in ax.get_title()
    paths = stitch.render_stitch_figures(tables, tmp_path)
    _check_pngs(paths, tmp_path, {"stitch_cka"})


def test_stitch_without_any_panel_table_is_refused(tmp_path):
    tables = {"models": _stitch_tables()["models"]}
    with pytest.raises(InvariscopeError, match="stitch_error"):
        stitch.render_stitch_figures(tables, tmp_path)
    assert not tmp_path.joinpath("stitch_cka.png").exists()


def _expected(table: pd.DataFrame, column: str) -> np.ndarray:
    return table.pivot(index="order_a", columns="order_b", values=column).sort_index().to_numpy()


def test_stitch_heatmaps_follow_layer_order_and_are_annotated():
    tables = _stitch_tables()
    fig = stitch._stitch_figure(tables)
    error_ax, cka_ax = _panels(fig)
    for ax, table, column in (
        (error_ax, tables["stitch_error"], "error"),
        (cka_ax, tables["cka"], "cka"),
    ):
        data = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
        assert data.shape == (len(LAYERS_A), len(LAYERS_B))
        np.testing.assert_allclose(data, _expected(table, column))
        assert ax.images[0].get_clim() == (0.0, 1.0)
        texts = [t.get_text() for t in ax.texts]
        assert len(texts) == len(LAYERS_A) * len(LAYERS_B)
        # row-major, one per cell, two decimals
        assert texts == [f"{v:.2f}" for v in _expected(table, column).ravel()]
        assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS_A  # input on top
        assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS_B
        assert ax.get_ylabel() == f"layer of A ({LABELS['model']})"
        assert ax.get_xlabel() == f"layer of B ({LABELS['model_b']})"
    # text colour follows the background: the lowest error is drawn bright (viridis_r)
    values = _expected(tables["stitch_error"], "error").ravel()
    colours = [t.get_color() for t in error_ax.texts]
    assert colours[int(np.argmin(values))] == "black"
    assert colours[int(np.argmax(values))] == "white"
    colorbars = {ax.get_ylabel() for ax in fig.axes if not ax.images and ax.get_ylabel()}
    assert {"stitched top-1 error", "linear CKA"} <= colorbars
    title = fig.get_suptitle().replace(",\n", ", ")
    assert f"A: {LABELS['model']} (error 0.02), B: {LABELS['model_b']} (error 0.03)" in title
    assert "500 images per cell" in title
    assert "±0.03" in error_ax.get_title()


def test_stitch_missing_pairs_and_constant_cka_are_marked():
    tables = _stitch_tables()
    error = tables["stitch_error"]
    tables["stitch_error"] = error[~((error.order_a == 1) & (error.order_b == 2))]
    cka = tables["cka"].copy()
    constant = (cka.order_a == 0) & (cka.order_b == 0)
    cka.loc[constant, ["cka", "constant_a"]] = [np.nan, True]
    stored_zero = (cka.order_a == 3) & (cka.order_b == 4)  # the analysis stores 0.0
    cka.loc[stored_zero, ["cka", "constant_b"]] = [0.0, True]
    tables["cka"] = cka
    fig = stitch._stitch_figure(tables)
    error_ax, cka_ax = _panels(fig)
    data = np.ma.filled(error_ax.images[0].get_array().astype(float), np.nan)
    assert np.isnan(data[1, 2]) and np.isfinite(np.delete(data.ravel(), 1 * 5 + 2)).all()
    assert error_ax.texts[1 * 5 + 2].get_text() == "n/a"
    assert cka_ax.texts[0].get_text() == "const"
    assert cka_ax.texts[-1].get_text() == "0.00*"
    assert sum("*" in t.get_text() or t.get_text() == "const" for t in cka_ax.texts) == 2
    note = fig.get_supxlabel()
    assert "constant over the images" in note and "n/a: no value" in note


def test_layers_table_adds_layers_without_a_pair():
    tables = _stitch_tables()
    tables["layers"] = pd.DataFrame(
        [("model", n, k) for k, n in enumerate([*LAYERS_A, "logits"])]
        + [("model_b", n, k) for k, n in enumerate(LAYERS_B)],
        columns=["model", "layer", "order"],
    )
    fig = stitch._stitch_figure(tables)
    for ax in _panels(fig):
        assert [t.get_text() for t in ax.get_yticklabels()] == [*LAYERS_A, "logits"]
        data = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
        assert data.shape == (len(LAYERS_A) + 1, len(LAYERS_B))
        assert np.isnan(data[-1]).all() and np.isfinite(data[:-1]).all()
        assert [t.get_text() for t in ax.texts[-len(LAYERS_B) :]] == ["n/a"] * len(LAYERS_B)


def test_stitch_without_models_table_names_a_and_b():
    tables = _stitch_tables()
    del tables["models"]
    fig = stitch._stitch_figure(tables)
    ax = _panels(fig)[0]
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("layer of A", "layer of B")
    assert "A: network A, B: network B" in fig.get_suptitle()


def test_large_stitch_matrix_with_long_names(tmp_path):
    names = [f"layer{i // 3 + 1}.{i % 3}.relu2" for i in range(10)]
    tables = _stitch_tables(names, names)
    fig = stitch._stitch_figure(tables)
    for ax in _panels(fig):
        assert len(ax.texts) == 100
        assert [t.get_text() for t in ax.get_xticklabels()] == names
    paths = stitch.render_stitch_figures(tables, tmp_path)
    _check_pngs(paths, tmp_path, {"stitch_cka"})


def test_render_stitch_run_reads_the_aggregates(tmp_path):
    out = tmp_path / "run"
    run = RunStore(out, {"analysis": "stitch", "images": 500})
    for name, table in _stitch_tables().items():
        run.write_aggregate(name, table)
    run.finalize({"num_images": 500})
    paths = stitch.render_stitch_run(out)
    _check_pngs(paths, out / "figures", {"stitch_cka"})
    other = tmp_path / "elsewhere"
    paths = stitch.render_stitch_run(out, other)
    _check_pngs(paths, other, {"stitch_cka"})


# ------------------------------------------------------------------------------ LEE


def test_lee_figures_are_written(tmp_path):
    paths = lee.render_lee_figures(_lee_tables(), tmp_path / "figs")
    _check_pngs(paths, tmp_path / "figs", {"lee", "lee_layers", "lee_contrib"})


@pytest.mark.parametrize(
    "drop, expected",
    [
        (["lee_layers_mean"], {"lee", "lee_contrib"}),
        (["lee_summary"], {"lee_layers", "lee_contrib"}),
        (["lee_contrib_mean"], {"lee", "lee_layers"}),
        (["lee_summary", "lee_layers_mean"], {"lee_contrib"}),
        (["transforms"], {"lee", "lee_layers", "lee_contrib"}),
    ],
)
def test_missing_lee_table_skips_its_figure(tmp_path, drop, expected):
    tables = {k: v for k, v in _lee_tables().items() if k not in drop}
    paths = lee.render_lee_figures(tables, tmp_path)
    _check_pngs(paths, tmp_path, expected)


def test_lee_without_its_tables_is_refused(tmp_path):
    tables = {"transforms": _lee_tables()["transforms"]}
    with pytest.raises(InvariscopeError, match="lee_summary"):
        lee.render_lee_figures(tables, tmp_path)


def test_lee_bars_equal_the_values_on_a_log_axis_one_unit_a_panel():
    tables = _lee_tables()
    fig = lee._lee_figure(tables)
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 2 * len(TRANSFORMS)  # LEE and l1 norm, one panel per unit
    summary = tables["lee_summary"].set_index("transform")
    measures = (("lee", lee.LEE_LABEL), ("lee_abs", lee.LEE_ABS_LABEL))
    for k, ax in enumerate(panels):  # row-major: a row of unit panels per measure
        column, label = measures[k // len(TRANSFORMS)]
        transform, unit = list(TRANSFORMS.items())[k % len(TRANSFORMS)]
        heights = [p.get_height() for p in ax.patches if isinstance(p, Rectangle)]
        np.testing.assert_allclose(heights, [summary.loc[transform, column]])
        assert ax.get_yscale() == "log"
        assert ax.get_ylabel() == label.replace("unit", unit)
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"{transform} (per {unit})"]
        low, high = ax.get_ylim()
        lo, hi = summary.loc[transform, f"{column}_low"], summary.loc[transform, f"{column}_high"]
        assert low < lo and high > hi
        # the error bar spans low..high
        (bars,) = [c for c in ax.collections if len(c.get_segments()) == 1]
        (seg,) = bars.get_segments()
        np.testing.assert_allclose([seg[:, 1].min(), seg[:, 1].max()], [lo, hi])
    assert lee.LEE_LABEL == "LEE = E‖d logits/dt‖² (per unit²)"
    for ax, transform in zip(panels[: len(TRANSFORMS)], TRANSFORMS, strict=True):
        (median,) = [line for line in ax.lines if line.get_marker() == "D"]
        np.testing.assert_allclose(median.get_ydata(), [summary.loc[transform, "median_lee"]])
    assert "64 images" in fig.get_suptitle()


def test_lee_transforms_of_one_unit_share_a_panel():
    units = {"translate_x": "px", "translate_y": "px", "rotate": "degrees"}
    fig = lee._lee_figure(_lee_tables(transforms=units))
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 4  # px and degrees, for LEE and the l1 norm
    ticks = [[t.get_text() for t in ax.get_xticklabels()] for ax in panels[:2]]
    assert ticks == [["translate_x (per px)", "translate_y (per px)"], ["rotate (per degrees)"]]


def test_lee_lower_bound_below_zero_stays_on_the_log_axis():
    tables = _lee_tables()
    summary = tables["lee_summary"].copy()
    summary.loc[0, "lee_low"] = -1.0  # mean - 1.96 SE below 0
    summary = summary.drop(columns=["lee_abs", "lee_abs_low", "lee_abs_high"])
    tables["lee_summary"] = summary
    fig = lee._lee_figure(tables)
    panels = [ax for ax in fig.axes if ax.patches]  # no lee_abs: one row, a panel per unit
    assert len(panels) == len(TRANSFORMS)
    assert all(ax.get_ylim()[0] > 0 for ax in panels)
    heights = [p.get_height() for ax in panels for p in ax.patches if isinstance(p, Rectangle)]
    np.testing.assert_allclose(heights, summary["lee"])


def test_lee_layers_has_a_line_per_transform_in_layer_order():
    tables = _lee_tables()
    fig = lee._lee_layers_figure(tables)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert len(ax.lines) == len(TRANSFORMS)
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
    assert len(ax.collections) == len(TRANSFORMS)  # one band each
    per_layer = tables["lee_layers_mean"]
    for line, transform in zip(ax.lines, TRANSFORMS, strict=True):
        sub = per_layer[per_layer["transform"] == transform].sort_values("order")
        np.testing.assert_allclose(line.get_xdata(), range(len(LAYERS)))
        np.testing.assert_allclose(line.get_ydata(), sub["rel_mean"])
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[: len(TRANSFORMS)] == [f"{t} (per {u})" for t, u in TRANSFORMS.items()]
    assert texts[-1] == lee.BAND_LABEL
    assert "relative equivariance error of the layer" in ax.get_ylabel()


def test_lee_contrib_has_a_panel_of_layer_bars_per_transform():
    tables = _lee_tables()
    contrib = tables["lee_contrib_mean"].copy()
    zero = (contrib["transform"] == "rotate") & (contrib["layer"] == "fc")
    contrib.loc[zero, ["mean", "low", "high"]] = 0.0  # an exactly equivariant layer
    tables["lee_contrib_mean"] = contrib
    fig = lee._lee_contrib_figure(tables)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"{t} (per {u})" for t, u in TRANSFORMS.items()]
    for ax, (transform, unit) in zip(panels, TRANSFORMS.items(), strict=True):
        assert ax.get_yscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
        assert ax.get_ylabel() == f"E‖c_i‖² (per {unit}²)"
        sub = contrib[contrib["transform"] == transform].sort_values("order")
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        positive = sub[sub["mean"] > 0]
        np.testing.assert_allclose([b.get_height() for b in bars], positive["mean"])
        np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in bars], positive["order"])
        (errors,) = [c for c in ax.collections if len(c.get_segments()) == len(positive)]
        spans = [(seg[:, 1].min(), seg[:, 1].max()) for seg in errors.get_segments()]
        np.testing.assert_allclose(spans, positive[["low", "high"]])
        assert [t.get_text() for t in ax.texts] == ["0"] * int((sub["mean"] == 0).sum())
    assert "64 images" in fig.get_suptitle()


def test_render_lee_run_reads_the_aggregates(tmp_path):
    out = tmp_path / "run"
    run = RunStore(out, {"analysis": "lee", "images": 64})
    for name, table in _lee_tables().items():
        run.write_aggregate(name, table)
    run.finalize({"num_images": 64})
    paths = lee.render_lee_run(out)
    _check_pngs(paths, out / "figures", {"lee", "lee_layers", "lee_contrib"})
    other = tmp_path / "elsewhere"
    paths = lee.render_lee_run(out, other)
    _check_pngs(paths, other, {"lee", "lee_layers", "lee_contrib"})
