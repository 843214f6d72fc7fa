"""Figures of the small-shift stability analysis, drawn from small synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

from invariscope.errors import InvariscopeError
from invariscope.plots import shift as plots
from invariscope.runs.store import RunStore

N_IMAGES, N_FRAMES = 10, 8
LAYERS = {
    "baseline": ["conv1", "pool1", "conv2", "pool2", "fc"],
    "model": ["conv1", "blur1", "conv2", "blur2", "fc"],
}
LABELS = {"baseline": "small-vgg.ckpt", "model": "small-vgg-blurpool.ckpt"}
PROTOCOLS = {
    # protocol: unit, reference, direction, positions
    "embed": ("px", "adjacent", "vertical", np.arange(N_FRAMES) - 4.0),
    "sequence:rotation": ("degrees", "first", "", np.arange(N_FRAMES) * 5.0),
}
ALL_FIGURES = {
    "shift_pcorrect",
    "shift_stability",
    "shift_nonshiftability",
    "shift_layer_sums",
    "shift_flip_rate",
}


def _files(names) -> set[str]:
    return {f"{n}.{ext}" for n in names for ext in ("png", "svg")}


def _tables(roles=("baseline", "model"), seed=0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    summary, pcorrect, per_image, means, sums = [], [], [], [], []
    for role in roles:
        for protocol, (_unit, _ref, _dir, positions) in PROTOCOLS.items():
            p = rng.uniform(0, 1, (N_IMAGES, N_FRAMES))
            rank = np.argsort(np.argsort(-p.sum(axis=1), kind="stable"), kind="stable")
            for i in range(N_IMAGES):
                for f in range(N_FRAMES):
                    pcorrect.append(
                        {
                            "model": role,
                            "protocol": protocol,
                            "index": 100 + i,
                            "label": i % 3,
                            "frame": f,
                            "position": positions[f],
                            "p_true": p[i, f],
                            "row": int(rank[i]),
                        }
                    )
            row = {"model": role, "protocol": protocol, "n_images": N_IMAGES}
            for metric, scale in (
                ("accuracy", 1),
                ("jagged", 1),
                ("p_top1_change", 0.3),
                ("fp", 0.4),
                ("t5d", 8),
                ("mad", 0.2),
                ("consistency", 1),
            ):
                value = rng.uniform(0.1, 0.9) * scale
                row |= {metric: value, f"{metric}_low": value * 0.8, f"{metric}_high": value * 1.1}
            if protocol.startswith("sequence:"):  # no 2-D shifts
                row |= {"consistency": np.nan, "consistency_low": np.nan}
                row["consistency_high"] = np.nan
            row["mean_jaggedness"] = rng.uniform(0, 2)
            summary.append(row)
            values = rng.integers(0, N_FRAMES, (N_IMAGES, len(LAYERS[role]))).astype(float)
            values[0, 2] = np.nan  # no qualifying map
            for order, layer in enumerate(LAYERS[role]):
                for i in range(N_IMAGES):
                    per_image.append(
                        {
                            "model": role,
                            "protocol": protocol,
                            "index": 100 + i,
                            "layer": layer,
                            "layer_order": order,
                            "n_maps": 4,
                            "nonshiftability": values[i, order],
                        }
                    )
                m = float(np.nanmean(values[:, order]))
                means.append(
                    {
                        "model": role,
                        "protocol": protocol,
                        "layer": layer,
                        "layer_order": order,
                        "mean": m,
                        "low": m - 0.5,
                        "high": m + 0.5,
                        "n_images": N_IMAGES,
                    }
                )
                for i in range(4):
                    for f in range(N_FRAMES):
                        sums.append(
                            {
                                "model": role,
                                "protocol": protocol,
                                "index": 100 + i,
                                "layer": layer,
                                "layer_order": order,
                                "frame": f,
                                "position": positions[f],
                                "total": 1000.0 * (order + 1) + rng.normal(0, 50),
                            }
                        )
    # shuffled: the figures must order by `row`, `frame` and `layer_order`, not by position
    tables = {
        "models": pd.DataFrame({"model": list(roles), "label": [LABELS[r] for r in roles]}),
        "protocols": pd.DataFrame(
            [
                {"protocol": k, "unit": u, "reference": r, "steps": N_FRAMES, "direction": d}
                for k, (u, r, d, _) in PROTOCOLS.items()
            ]
        ),
        "shift_summary": pd.DataFrame(summary),
        "pcorrect": pd.DataFrame(pcorrect).sample(frac=1.0, random_state=seed),
        "nonshiftability": pd.DataFrame(per_image).sample(frac=1.0, random_state=seed),
        "nonshiftability_mean": pd.DataFrame(means),
        "layer_sums": pd.DataFrame(sums).sample(frac=1.0, random_state=seed),
        "classes": pd.DataFrame({"label": [0, 1, 2], "name": ["zero", "one", "two"]}),
    }
    if "baseline" in roles:
        fr = [
            {"protocol": p, "model": "model", "fp": 0.1, "baseline_fp": 0.2, "fr": 0.5 + 0.2 * k}
            for k, p in enumerate(PROTOCOLS)
        ]
        fr.append({"protocol": "mean", "model": "model", "fp": 0.1, "baseline_fp": 0.2, "fr": 0.6})
        tables["mfr"] = pd.DataFrame(fr)
    return tables


def _check_pngs(paths, out_dir, expected: set[str]) -> None:
    assert {p.name for p in paths} == _files(expected)
    assert {p.name for p in out_dir.iterdir()} == _files(expected)
    for path in paths:
        assert path.exists() and path.parent == out_dir
        if path.suffix == ".png":
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert len(data) > 10_000


def test_all_figures_are_written(tmp_path):
    paths = plots.render_shift_figures(_tables(), tmp_path / "figs")
    _check_pngs(paths, tmp_path / "figs", ALL_FIGURES)


@pytest.mark.parametrize(
    "drop, missing",
    [
        (["mfr"], {"shift_flip_rate"}),
        (["layer_sums"], {"shift_layer_sums"}),
        (["pcorrect"], {"shift_pcorrect"}),
        (["nonshiftability", "nonshiftability_mean"], {"shift_nonshiftability"}),
        (["nonshiftability"], set()),  # the stored means alone still draw the figure
        (["nonshiftability_mean"], set()),  # the mean is then taken over the images
        (["models", "protocols", "classes"], set()),
        (
            ["mfr", "layer_sums", "pcorrect", "nonshiftability", "nonshiftability_mean"],
            ALL_FIGURES - {"shift_stability"},
        ),
    ],
)
def test_missing_optional_tables_skip_their_figure(tmp_path, drop, missing):
    tables = {k: v for k, v in _tables().items() if k not in drop}
    paths = plots.render_shift_figures(tables, tmp_path)
    _check_pngs(paths, tmp_path, ALL_FIGURES - missing)


def test_empty_optional_table_is_skipped(tmp_path):
    tables = _tables()
    tables["layer_sums"] = tables["layer_sums"].iloc[:0]
    paths = plots.render_shift_figures(tables, tmp_path)
    _check_pngs(paths, tmp_path, ALL_FIGURES - {"shift_layer_sums"})


def test_shift_summary_is_required(tmp_path):
    tables = _tables()
    del tables["shift_summary"]
    with pytest.raises(InvariscopeError, match="shift_summary"):
        plots.render_shift_figures(tables, tmp_path)


def test_single_model_without_models_table_uses_the_role(tmp_path):
    tables = _tables(roles=("model",))
    del tables["models"]
    paths = plots.render_shift_figures(tables, tmp_path)
    _check_pngs(paths, tmp_path, ALL_FIGURES - {"shift_flip_rate"})
    fig = plots._pcorrect_figure(tables)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert len(titles) == len(PROTOCOLS)
    assert all(t.startswith("model — ") for t in titles)
    stability = plots._stability_figure(tables)
    # in a free panel, or beside the panels when none is free
    (legend,) = [ax.get_legend() for ax in stability.axes if ax.get_legend()] + stability.legends
    assert legend.get_texts()[0].get_text() == "model"


def test_pcorrect_heatmap_rows_follow_row_and_baseline_comes_first():
    tables = _tables()
    fig = plots._pcorrect_figure(tables)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(PROTOCOLS) * 2
    pcorrect, summary = tables["pcorrect"], tables["shift_summary"]
    for k, ax in enumerate(panels):
        role = ("baseline", "model")[k % 2]
        protocol = list(PROTOCOLS)[k // 2]
        jagged = summary[(summary.model == role) & (summary.protocol == protocol)].jagged.iloc[0]
        label = LABELS[role] + " (baseline)" * (role == "baseline")
        title = ax.get_title().replace(" —\n", " — ")  # long titles take two lines
        assert title == f"{label} — {protocol}: jagged {jagged:.0%}"
        data = np.asarray(ax.images[0].get_array(), dtype=float)
        assert data.shape == (N_IMAGES, N_FRAMES)
        sums = data.sum(axis=1)
        assert np.all(np.diff(sums) <= 1e-12)  # row 0 (largest sum) on top
        sub = pcorrect[(pcorrect.model == role) & (pcorrect.protocol == protocol)]
        top = sub[sub.row == 0].sort_values("frame").p_true.to_numpy()
        np.testing.assert_allclose(data[0], top)
        assert ax.images[0].get_clim() == (0.0, 1.0)
    xlabels = {ax.get_xlabel() for ax in panels}
    assert xlabels == {"vertical shift (px)", "rotation (degrees)"}
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "P(correct class)"]
    assert len(colorbars) == 1


def test_nonshiftability_has_one_thin_line_per_image_and_a_bold_mean():
    tables = _tables()
    fig = plots._nonshiftability_figure(tables)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == len(PROTOCOLS) * 2
    assert len({ax.get_ylim() for ax in panels}) == 1  # shared y: baseline vs remedied
    for k, ax in enumerate(panels):
        role = ("baseline", "model")[k % 2]
        assert len(ax.lines) == N_IMAGES + 1
        widths = sorted(line.get_linewidth() for line in ax.lines)
        assert widths[-1] > 2 * widths[0] and widths[-2] == widths[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS[role]
        assert len(ax.collections) == 1  # the interval band of the mean
        mean = max(ax.lines, key=lambda line: line.get_linewidth())
        protocol = list(PROTOCOLS)[k // 2]
        stored = tables["nonshiftability_mean"]
        stored = stored[(stored.model == role) & (stored.protocol == protocol)]
        np.testing.assert_allclose(mean.get_ydata(), stored.sort_values("layer_order")["mean"])


def test_stability_bars_match_summary_and_nan_consistency_is_marked():
    tables = _tables()
    fig = plots._stability_figure(tables)
    panels = [ax for ax in fig.axes if ax.get_title()]
    titles = [ax.get_title() for ax in panels]
    assert len(panels) == 6
    assert titles[0] == "accuracy on the frames"  # accuracy beside the stability measures
    accuracy = [p.get_height() for p in panels[0].patches if isinstance(p, Rectangle)]
    summary = tables["shift_summary"]
    expected = [
        summary[(summary.model == role) & (summary.protocol == p)].accuracy.iloc[0]
        for role in ("baseline", "model")
        for p in PROTOCOLS
    ]
    np.testing.assert_allclose(accuracy, expected)
    (chance,) = [line for line in panels[0].lines if line.get_linestyle() == "--"]
    assert chance.get_ydata()[0] == pytest.approx(1 / len(tables["classes"]))
    assert "FP" in titles[2] and "flip probability" in titles[2]
    consistency = panels[3]
    assert "consistency" in titles[3]
    bars = [p for p in consistency.patches if isinstance(p, Rectangle)]
    summary = tables["shift_summary"]
    expected = [
        summary[(summary.model == role) & (summary.protocol == p)].consistency.iloc[0]
        for role in ("baseline", "model")
        for p in PROTOCOLS
    ]
    heights = [b.get_height() for b in bars]
    np.testing.assert_allclose(heights, np.nan_to_num(expected, nan=0.0))
    assert "n/a" in [t.get_text() for t in consistency.texts]
    for ax in panels[:5]:  # fractions
        assert ax.get_ylim()[0] == 0 and max(ax.get_yticks()) <= 1.0
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:2] == ["small-vgg.ckpt (baseline)", "small-vgg-blurpool.ckpt"]


def test_all_nan_metric_drops_its_panel():
    tables = _tables()
    summary = tables["shift_summary"].copy()
    summary["consistency"] = np.nan
    tables["shift_summary"] = summary
    fig = plots._stability_figure(tables)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 5 and not any("consistency" in t for t in titles)


def test_flip_rate_bars_and_baseline_line():
    tables = _tables()
    fig = plots._flip_rate_figure(tables)
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches if isinstance(p, Rectangle)]
    np.testing.assert_allclose(heights, tables["mfr"]["fr"])
    assert [t.get_text() for t in ax.get_xticklabels()] == [*PROTOCOLS, "mean"]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and set(dashed[0].get_ydata()) == {1.0}
    assert ax.get_ylabel() == "flip rate relative to baseline (mFR)"


def test_layer_sums_draw_the_deepest_layer_per_image():
    tables = _tables()
    fig = plots._layer_sums_figure(tables)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == len(PROTOCOLS) * 2
    for ax in panels:
        assert len(ax.lines) == 4
        assert ax.get_ylabel() == "global sum of fc\nactivations"
        for line in ax.lines:
            assert np.all(np.diff(line.get_xdata()) > 0)  # sorted by frame
            assert np.all(np.asarray(line.get_ydata()) > 4000)  # layer_order 4 only


def test_render_shift_run_reads_the_aggregates(tmp_path):
    out = tmp_path / "run"
    run = RunStore(out, {"analysis": "shift", "images": N_IMAGES})
    for name, table in _tables().items():
        run.write_aggregate(name, table)
    run.finalize({"num_images": N_IMAGES})
    paths = plots.render_shift_run(out)
    _check_pngs(paths, out / "figures", ALL_FIGURES)
    other = tmp_path / "elsewhere"
    paths = plots.render_shift_run(out, other)
    _check_pngs(paths, other, ALL_FIGURES)
