"""Figures drawn from small hand-made tables: what is on the Axes, not just that a file exists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer

from invariscope.measure import aggregate as agg
from invariscope.plots import sweep as plots

MAGS = [-2.0, -1.0, 0.0, 1.0, 2.0]


@pytest.fixture
def figures(monkeypatch):
    """Keep every Figure the plotting functions save (they are still written to disk)."""
    kept = []
    save = plots._save

    def keep(fig, out_dir, name):
        kept.append(fig)
        return save(fig, out_dir, name)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _accuracy(n_correct: list[int], n: int = 10, name: str = "rotation") -> pd.DataFrame:
    rows = []
    for m, k in zip(MAGS, n_correct, strict=True):
        rows.append({"transform": name, "magnitude": m, "n": n, "n_correct": k, "sum_p_true": k})
    return agg.accuracy_curve(pd.DataFrame(rows).assign(label=0))


def _class_accuracy(labels: list[int]) -> pd.DataFrame:
    rows = []
    for label in labels:
        for m, k in zip(MAGS, [2, 4, 5, 3, 1], strict=True):
            rows.append(
                {
                    "transform": "rotation",
                    "magnitude": m,
                    "label": label,
                    "n": 5,
                    "n_correct": k,
                    "sum_p_true": float(k),
                }
            )
    return agg.class_accuracy_curve(pd.DataFrame(rows))


def _bands(ax) -> list[PolyCollection]:
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_accuracy_band_spans_the_wilson_interval(tmp_path, figures):
    acc = _accuracy([3, 8, 10, 6, 0])
    paths = plots.plot_accuracy_curves(acc, tmp_path)
    assert {p.name for p in paths} == {"accuracy.png", "accuracy.svg"}
    assert all(p.stat().st_size > 0 for p in paths)
    (fig,) = figures
    ax = fig.axes[0]
    (band,) = _bands(ax)
    ys = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
    xs = np.concatenate([path.vertices[:, 0] for path in band.get_paths()])
    # the band runs from the lowest lower bound (k=0 -> 0) to the highest upper (k=10 -> 1)
    assert ys.min() == pytest.approx(acc["accuracy_low"].min())
    assert ys.max() == pytest.approx(acc["accuracy_high"].max())
    assert ys.max() == 1.0 and ys.min() == 0.0
    assert xs.min() == -2.0 and xs.max() == 2.0
    # the upper edge at magnitude -2 (3 of 10) is that point's Wilson upper bound
    high_at_minus2 = float(agg.wilson_interval(3, 10)[1])
    assert np.any(np.isclose(xs, -2.0) & np.isclose(ys, high_at_minus2))
    # same colour as the (black) overall curve, translucent
    face = band.get_facecolor()[0]
    assert tuple(face[:3]) == pytest.approx(to_rgba("black")[:3])
    assert 0.1 <= face[3] <= 0.25
    assert ax.get_ylabel() == "top-1 accuracy [fraction of images]"
    assert plots.BAND_LABEL in _legend_texts(fig)


def test_accuracy_without_interval_columns_draws_no_band(tmp_path, figures):
    acc = _accuracy([3, 8, 10, 6, 0]).drop(columns=["accuracy_low", "accuracy_high"])
    classes = _class_accuracy([0, 1]).drop(columns=["accuracy_low", "accuracy_high"])
    paths = plots.plot_accuracy_curves(acc, tmp_path, class_accuracy=classes)
    assert len(paths) == 2
    (fig,) = figures
    assert _bands(fig.axes[0]) == []
    assert len(fig.axes[0].get_lines()) == 3  # overall and two classes (no identity: no table)
    assert not any(t.startswith("shaded") for t in _legend_texts(fig))


def test_class_bands_match_their_curves_when_few_classes(tmp_path, figures):
    acc = _accuracy([3, 8, 10, 6, 0])
    plots.plot_accuracy_curves(acc, tmp_path, class_accuracy=_class_accuracy([2, 7]))
    (fig,) = figures
    bands = _bands(fig.axes[0])
    assert len(bands) == 3  # class 2, class 7, all classes
    colours = {tuple(np.round(b.get_facecolor()[0][:3], 6)) for b in bands}
    for label in (2, 7):
        assert tuple(np.round(to_rgba(plots._colour(label))[:3], 6)) in colours
    assert plots.BAND_LABEL in _legend_texts(fig)


def test_many_classes_keep_only_the_overall_band(tmp_path, figures):
    acc = _accuracy([3, 8, 10, 6, 0])
    classes = _class_accuracy(list(range(6)))
    plots.plot_accuracy_curves(acc, tmp_path, class_accuracy=classes)
    plots.plot_accuracy_curves(acc, tmp_path, class_accuracy=classes, class_bands=True)
    few, forced = figures
    assert len(_bands(few.axes[0])) == 1
    assert any(t.startswith(plots.BAND_LABEL) and "all classes" in t for t in _legend_texts(few))
    assert len(_bands(forced.axes[0])) == 7


def test_empty_cells_leave_a_gap_not_an_error(tmp_path, figures):
    acc = _accuracy([3, 8, 10, 6, 0])
    acc.loc[acc["magnitude"] == 2.0, ["accuracy_low", "accuracy_high"]] = np.nan
    plots.plot_accuracy_curves(acc, tmp_path)
    (band,) = _bands(figures[0].axes[0])
    xs = np.concatenate([path.vertices[:, 0] for path in band.get_paths()])
    assert xs.max() == 1.0


def _worst_case(with_interval: bool = True) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "label": [0] * 10 + [1] * 10,
            "natural_correct": [True] * 19 + [False],
            "random_correct": [True] * 15 + [False] * 5,
            "worst_of_k_correct": [True] * 8 + [False] * 12,
            "grid_correct": [False] * 20,
        }
    )
    summary = agg.worst_case_summary(table)
    return summary if with_interval else summary.drop(columns=["accuracy_low", "accuracy_high"])


def test_worst_case_error_bars_are_the_wilson_interval(tmp_path, figures):
    summary = _worst_case()
    plots.plot_worst_case(summary, tmp_path)
    (fig,) = figures
    ax = fig.axes[0]
    (container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    (segments,) = container.lines[2]
    spans = [sorted(seg[:, 1]) for seg in segments.get_segments()]
    overall = summary[summary["label"] == -1].set_index("setting")
    for span, setting in zip(spans, agg.WORST_CASE_SETTINGS, strict=True):
        want = [overall.loc[setting, "accuracy_low"], overall.loc[setting, "accuracy_high"]]
        assert span == pytest.approx(want), setting
    # grid: 0 of 20 -> the bar reaches from 0 up to z^2 / (20 + z^2)
    assert spans[3][0] == 0.0 and spans[3][1] == pytest.approx(0.1611, abs=1e-4)
    assert "error bars: 95% Wilson interval" in _legend_texts(fig)
    assert "20 images" in ax.get_title()


def test_worst_case_without_interval_has_no_error_bars(tmp_path, figures):
    plots.plot_worst_case(_worst_case(with_interval=False), tmp_path)
    (fig,) = figures
    ax = fig.axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.95, 0.75, 0.4, 0.0])
