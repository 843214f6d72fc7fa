"""Figures of a transformation sweep, drawn from its stored aggregate tables.

Tables (as written by :func:`invariscope.measure.sweep.sweep`):

- ``accuracy``: ``transform, magnitude, n, accuracy, accuracy_low, accuracy_high,
  mean_p_true`` (``accuracy_low/high``: the 95% Wilson interval; optional, runs written
  before it was added lack it and are drawn without bands);
- ``class_accuracy``: the same per ``label``;
- ``softmax_curves``: ``transform, label, magnitude, series, class_index, mean_softmax,
  is_true_class`` (see :func:`invariscope.measure.aggregate.softmax_curves`);
- ``thresholds``: ``transform, label, identity_accuracy, threshold_low, threshold_high``;
- ``accuracy_2d``: ``transform_a, magnitude_a, transform_b, magnitude_b, n, accuracy,
  mean_p_true``;
- ``worst_case_summary``: ``label, setting, n, accuracy[, accuracy_low, accuracy_high]``;
- ``classes``: ``label, name``; ``transforms``: ``transform, identity, unit``.

Every figure is written as ``<name>.png`` (150 dpi) and ``<name>.svg``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.patches import Patch

_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
]


#: The widest a figure is drawn (inches): 1600 px at the saved 150 dpi, less a margin.
MAX_WIDTH_IN = 10.4


def _colour(class_index: int) -> str:
    return _PALETTE[int(class_index) % len(_PALETTE)]


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"{name}.{ext}"
        # SVG text stays text (searchable, editable) instead of glyph outlines
        with rc_context({"svg.fonttype": "none"}):
            fig.savefig(path, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    return paths


def stored_aggregates(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Every aggregate table of the stored run at ``run_dir`` (opened read-only)."""
    from invariscope.runs.store import RunStore

    run = RunStore.open(run_dir)
    return {name: run.read_aggregate(name) for name in run.aggregates()}


def figures_dir(run_dir: str | Path, out_dir: str | Path | None) -> Path:
    """``out_dir``, or the run's own ``figures`` folder when it is not given."""
    return Path(out_dir) if out_dir else Path(run_dir) / "figures"


def save_figures(builders, tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Build each ``(name, build(tables) -> Figure | None)`` and save the ones drawn."""
    paths: list[Path] = []
    for name, build in builders:
        fig = build(tables)
        if fig is not None:
            paths += _save(fig, Path(out_dir), name)
    return paths


def _names(classes: pd.DataFrame | None) -> dict[int, str]:
    if classes is None or len(classes) == 0:
        return {}
    return {int(r.label): str(r.name) for r in classes.itertuples(index=False)}


def _class_name(label: int, names: Mapping[int, str]) -> str:
    if label == -1:
        return "all classes"
    return names.get(int(label), str(label))


def _units(transforms: pd.DataFrame | None) -> tuple[dict[str, str], dict[str, float]]:
    if transforms is None or len(transforms) == 0:
        return {}, {}
    units = {str(r.transform): str(r.unit) for r in transforms.itertuples(index=False)}
    identity = {str(r.transform): float(r.identity) for r in transforms.itertuples(index=False)}
    return units, identity


def _axis_label(name: str, units: Mapping[str, str]) -> str:
    unit = units.get(name, "")
    return f"{name} [{unit}]" if unit else name


#: Legend text of the shaded accuracy bands.
BAND_LABEL = "shaded: 95% Wilson interval"
#: y-axis label of every accuracy axis.
ACCURACY_LABEL = "top-1 accuracy [fraction of images]"


def _has_interval(table: pd.DataFrame | None, column: str = "accuracy") -> bool:
    return table is not None and {f"{column}_low", f"{column}_high"} <= set(table.columns)


def _band(ax, sub: pd.DataFrame, colour: str, alpha: float, column: str = "accuracy") -> bool:
    """Shade ``<column>_low .. <column>_high`` against magnitude; False when nothing drawn."""
    if not _has_interval(sub, column) or len(sub) == 0:
        return False
    low = sub[f"{column}_low"].to_numpy(dtype=float)
    high = sub[f"{column}_high"].to_numpy(dtype=float)
    finite = np.isfinite(low) & np.isfinite(high)
    if not finite.any():
        return False
    ax.fill_between(
        sub["magnitude"].to_numpy(dtype=float),
        low,
        high,
        where=finite,
        color=colour,
        alpha=alpha,
        linewidth=0,
        zorder=1,
    )
    return True


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def plot_accuracy_curves(
    accuracy: pd.DataFrame,
    out_dir: str | Path,
    *,
    class_accuracy: pd.DataFrame | None = None,
    classes: pd.DataFrame | None = None,
    transforms: pd.DataFrame | None = None,
    max_classes: int = 10,
    name: str = "accuracy",
    band_alpha: float = 0.18,
    class_bands: bool | None = None,
    max_class_bands: int = 3,
) -> list[Path]:
    """Top-1 accuracy vs magnitude, one panel per transformation.

    The overall curve is black; with ``class_accuracy`` and at most ``max_classes``
    classes, each class adds a thin coloured curve. Where a table has
    ``accuracy_low`` / ``accuracy_high`` (the 95% Wilson interval), the curves get a
    shaded band of their own colour (opacity ``band_alpha``; 0 turns bands off): the
    overall curve always, the class curves when ``class_bands`` is True, or by default
    when at most ``max_class_bands`` classes are drawn (more overlapping bands hide
    each other and the curves; the legend then says the band is the overall curve's).
    Tables without those columns (older runs) are drawn without bands. A dotted
    vertical line marks the identity. Returns the written paths (PNG, SVG).
    """
    names = _names(classes)
    units, identity = _units(transforms)
    order = list(dict.fromkeys(accuracy["transform"]))
    # as many panels a row as fit the page (MAX_WIDTH_IN) at 3.4 inches or more each
    cols = max(1, min(len(order), 4, int((MAX_WIDTH_IN - 1.8) // 3.4)))
    rows = math.ceil(len(order) / cols)
    panel = min(3.6, (MAX_WIDTH_IN - 1.8) / cols)
    fig = Figure(figsize=(panel * cols + 1.8, 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    labels = []
    if class_accuracy is not None and len(class_accuracy):
        labels = sorted(int(v) for v in class_accuracy["label"].unique())
        if len(labels) > max_classes:
            labels = []
    if class_bands is None:
        class_bands = len(labels) <= max_class_bands
    handles = {}
    banded = class_banded = False
    for ax, tname in zip(axes.flat, order, strict=False):
        for label in labels:
            sub = class_accuracy[
                (class_accuracy["transform"] == tname) & (class_accuracy["label"] == label)
            ].sort_values("magnitude")
            if class_bands and band_alpha > 0:
                class_banded |= _band(ax, sub, _colour(label), band_alpha)
            (h,) = ax.plot(
                sub["magnitude"], sub["accuracy"], lw=0.9, alpha=0.75, color=_colour(label)
            )
            handles.setdefault(f"class {_class_name(label, names)}", h)
        sub = accuracy[accuracy["transform"] == tname].sort_values("magnitude")
        if band_alpha > 0:
            banded |= _band(ax, sub, "black", band_alpha)
        (h,) = ax.plot(
            sub["magnitude"], sub["accuracy"], color="black", lw=2.2, marker=".", ms=4, zorder=3
        )
        handles.setdefault("all classes", h)
        if tname in identity:
            ax.axvline(identity[tname], color="grey", ls=":", lw=1)
        ax.set_ylim(-0.03, 1.03)
        ax.locator_params(axis="x", nbins=6)  # 4-digit tick labels such as -150 stay apart
        ax.set_xlabel(_axis_label(tname, units))
        ax.set_ylabel(ACCURACY_LABEL)
        ax.set_title(tname)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(order) :]:
        ax.set_visible(False)
    keys = ["all classes"] + [k for k in handles if k != "all classes"]
    legend_handles = [handles[k] for k in keys]
    if banded or class_banded:
        only_overall = labels and not class_banded
        keys.append(BAND_LABEL + ("\n(all classes)" if only_overall else ""))
        legend_handles.append(Patch(facecolor="black", alpha=band_alpha))
    fig.legend(legend_handles, keys, loc="outside right upper", fontsize=8)
    fig.suptitle("Accuracy under each transformation")
    return _save(fig, Path(out_dir), name)


def plot_softmax_curves(
    curves: pd.DataFrame,
    out_dir: str | Path,
    *,
    classes: pd.DataFrame | None = None,
    transforms: pd.DataFrame | None = None,
    labels: Sequence[int] | None = None,
    max_classes: int = 10,
    name: str = "softmax_curves",
) -> list[Path]:
    """Class-wise mean softmax curves: a grid with one row per class, one column per transformation.

    Each panel shows, for the images of that class, the three classes with the highest
    mean softmax (coloured by class, the true class drawn thicker) and "others" (dashed
    grey, the max over the remaining classes), as in Bunne et al. 2018, figures 2-3.
    ``labels`` picks the rows (default: the first ``max_classes`` classes).
    """
    names = _names(classes)
    units, identity = _units(transforms)
    order = list(dict.fromkeys(curves["transform"]))
    if labels is None:
        labels = sorted(int(v) for v in curves["label"].unique())[:max_classes]
    labels = list(labels)
    rows, cols = max(len(labels), 1), max(len(order), 1)
    # a fixed grid (no constrained layout): many panels stay cheap to draw
    # panels narrow (to 2.4 inches) before the figure outgrows the page (MAX_WIDTH_IN)
    width = max(2.4, min(3.3, (MAX_WIDTH_IN - 0.9) / cols)) * cols + 0.9
    height = 2.3 * rows + 1.1
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=0.9 / width,
        right=0.98,
        bottom=0.55 / height,
        top=1 - 0.75 / height,
        wspace=0.25,
        hspace=0.3,
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, label in enumerate(labels):
        for c, tname in enumerate(order):
            ax = axes[r, c]
            sub = curves[(curves["transform"] == tname) & (curves["label"] == label)]
            ranked = sorted(sub["series"].unique(), key=lambda v: (v == "others", v))
            for series in ranked:
                group = sub[sub["series"] == series].sort_values("magnitude")
                cls = int(group["class_index"].iloc[0])
                if series == "others":
                    ax.plot(
                        group["magnitude"],
                        group["mean_softmax"],
                        color="grey",
                        ls="--",
                        lw=1,
                        label="others (max)",
                    )
                else:
                    true = bool(group["is_true_class"].iloc[0])
                    ax.plot(
                        group["magnitude"],
                        group["mean_softmax"],
                        color=_colour(cls),
                        lw=2.2 if true else 1.2,
                        label=_class_name(cls, names) + (" (true)" if true else ""),
                    )
            if tname in identity:
                ax.axvline(identity[tname], color="grey", ls=":", lw=0.8)
            # headroom above 1 keeps the legend off the curves
            ax.set_ylim(-0.03, 1.38)
            ax.set_yticks(np.linspace(0.0, 1.0, 6))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="upper center", ncol=2, framealpha=0.8)
            if r == 0:
                ax.set_title(tname)
            if r == rows - 1:
                ax.set_xlabel(_axis_label(tname, units))
            if c == 0:
                ax.set_ylabel(f"class {_class_name(label, names)}\nmean softmax")
    fig.suptitle("Class-wise mean softmax (top 3 classes and others)", y=1 - 0.2 / height)
    return _save(fig, Path(out_dir), name)


def _fmt(value: float) -> str:
    return (
        "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"
    )


def plot_thresholds(
    thresholds: pd.DataFrame,
    out_dir: str | Path,
    *,
    classes: pd.DataFrame | None = None,
    transforms: pd.DataFrame | None = None,
    fraction: float | None = None,
    max_rows: int = 30,
    name: str = "thresholds",
) -> list[Path]:
    """The threshold table rendered as a figure: one row per class, low / high per transformation.

    A cell is the first magnitude (moving out from the identity) at which the class's
    accuracy drops below ``fraction`` of its identity accuracy; "—" = not within the
    swept range, "n/a" = nothing swept on that side. The first row summarises all classes.
    """
    names = _names(classes)
    units, _ = _units(transforms)
    ranges = {}
    if transforms is not None and "min_magnitude" in transforms.columns:
        ranges = {
            str(r.transform): (float(r.min_magnitude), float(r.max_magnitude))
            for r in transforms.itertuples(index=False)
        }
    order = list(dict.fromkeys(thresholds["transform"]))
    labels = sorted(int(v) for v in thresholds["label"].unique())[: max_rows + 1]
    table = thresholds.set_index(["transform", "label"])
    header = ["class", "accuracy at\nidentity"]
    for tname in order:
        unit = "\n" + textwrap.fill(f"[{units[tname]}]", 18) if units.get(tname) else ""
        header += [f"{tname}\nlow side{unit}", f"{tname}\nhigh side{unit}"]
    header_lines = max(h.count("\n") + 1 for h in header)
    cells = []
    for label in labels:
        first = table.loc[(order[0], label)] if (order[0], label) in table.index else None
        acc = _fmt(round(float(first["identity_accuracy"]), 3)) if first is not None else "—"
        row = [_class_name(label, names), acc]
        for tname in order:
            if (tname, label) in table.index:
                rec = table.loc[(tname, label)]
                low, high = _fmt(float(rec["threshold_low"])), _fmt(float(rec["threshold_high"]))
                lo_m, hi_m = ranges.get(tname, (-math.inf, math.inf))
                identity = float(rec["identity"]) if "identity" in rec else math.nan
                row += ["n/a" if lo_m >= identity else low, "n/a" if hi_m <= identity else high]
            else:
                row += ["—", "—"]
        cells.append(row)
    fig = Figure(
        figsize=(
            1.0 + min(1.45, (MAX_WIDTH_IN - 1.0) / len(header)) * len(header),
            1.0 + 0.3 * (len(cells) + header_lines),
        ),
        layout="constrained",
    )
    ax = fig.subplots()
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1.0, 1.35)
    for (r, _c), cell in tab.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_height(cell.get_height() * (0.4 + 0.6 * header_lines))
    ax.text(
        0.5,
        0.0,
        "— : not reached within the swept range;   n/a : nothing swept on that side",
        transform=ax.transAxes,
        ha="center",
        va="top",
        fontsize=8,
        color="0.3",
    )
    frac = "" if fraction is None else f"{fraction:g} x "
    ax.set_title(
        f"Thresholds: first magnitude where class accuracy < {frac}identity accuracy", fontsize=10
    )
    return _save(fig, Path(out_dir), name)


def plot_heatmaps(
    accuracy_2d: pd.DataFrame,
    out_dir: str | Path,
    *,
    transforms: pd.DataFrame | None = None,
    name_prefix: str = "heatmap",
) -> list[Path]:
    """One figure per pair of transformations: accuracy and mean p(true class) as heatmaps.

    The x axis is the first transformation's magnitude, the y axis the second's; each
    panel has a colourbar. Written as ``<name_prefix>_<a>_x_<b>.png/.svg``.
    """
    units, _ = _units(transforms)
    paths: list[Path] = []
    for (a, b), sub in accuracy_2d.groupby(["transform_a", "transform_b"], sort=False):
        xs = np.sort(sub["magnitude_a"].unique())
        ys = np.sort(sub["magnitude_b"].unique())
        fig = Figure(figsize=(10.5, 4.3), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, column, title in (
            (axes[0], "accuracy", "top-1 accuracy"),
            (axes[1], "mean_p_true", "mean p(true class)"),
        ):
            grid = sub.pivot(index="magnitude_b", columns="magnitude_a", values=column)
            grid = grid.reindex(index=ys, columns=xs)
            dx = (xs[1] - xs[0]) / 2 if len(xs) > 1 else 0.5
            dy = (ys[1] - ys[0]) / 2 if len(ys) > 1 else 0.5
            image = ax.imshow(
                grid.to_numpy(dtype=float),
                origin="lower",
                aspect="auto",
                extent=(xs[0] - dx, xs[-1] + dx, ys[0] - dy, ys[-1] + dy),
                vmin=0.0,
                vmax=1.0,
                cmap="viridis",
                interpolation="nearest",
            )
            fig.colorbar(image, ax=ax, label=title)
            ax.set_xlabel(_axis_label(str(a), units))
            ax.set_ylabel(_axis_label(str(b), units))
            ax.set_title(title)
        fig.suptitle(f"{a} x {b}")
        paths += _save(fig, Path(out_dir), f"{name_prefix}_{a}_x_{b}")
    return paths


def plot_worst_case(
    summary: pd.DataFrame,
    out_dir: str | Path,
    *,
    name: str = "worst_case",
    budget: str | None = None,
) -> list[Path]:
    """Bar chart of natural / random / worst-of-k / grid accuracy (Engstrom et al. 2019).

    Where ``summary`` has ``accuracy_low`` / ``accuracy_high`` (the 95% Wilson interval),
    each bar gets an error bar spanning it and the value is printed above the error bar;
    older tables without them are drawn without error bars.
    """
    overall = summary[summary["label"] == -1].set_index("setting")
    settings = [s for s in ("natural", "random", "worst_of_k", "grid") if s in overall.index]
    values = [float(overall.loc[s, "accuracy"]) for s in settings]
    tops = values
    yerr = None
    if _has_interval(overall):
        low = np.array([float(overall.loc[s, "accuracy_low"]) for s in settings])
        high = np.array([float(overall.loc[s, "accuracy_high"]) for s in settings])
        vals = np.array(values)
        # NaN bounds (no images) draw no error bar
        yerr = np.nan_to_num(np.stack([vals - low, high - vals]), nan=0.0).clip(min=0.0)
        tops = list(np.where(np.isfinite(high), high, vals))
    fig = Figure(figsize=(5.6, 4.4), layout="constrained")
    ax = fig.subplots()
    colours = {
        "natural": "#2ca02c",
        "random": "#1f77b4",
        "worst_of_k": "#ff7f0e",
        "grid": "#d62728",
    }
    meaning = {
        "natural": "natural: untransformed image",
        "random": "random: one uniform draw in the budget",
        "worst_of_k": "worst-of-k: all k random draws correct",
        "grid": "grid: every grid point correct",
    }
    bars = ax.bar(
        [s.replace("_", "-") for s in settings],
        values,
        color=[colours[s] for s in settings],
        label=[meaning[s] for s in settings],
    )
    if yerr is not None:
        ax.errorbar(
            [bar.get_x() + bar.get_width() / 2 for bar in bars],
            values,
            yerr=yerr,
            fmt="none",
            ecolor="black",
            elinewidth=1.2,
            capsize=5,
            label="error bars: 95% Wilson interval",
        )
    for bar, value, top in zip(bars, values, tops, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            top + 0.015,
            f"{value:.3f}",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylim(0, 1.12)  # room for the value printed above a bar at 1
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(ACCURACY_LABEL)
    ax.set_xlabel("evaluation (rotation + translation)")
    # below the axes: inside, it would cover the bars and values near 1
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
    n = int(overall["n"].iloc[0]) if "n" in overall.columns and len(overall) else None
    title = "Worst-case spatial accuracy" + (f" ({budget})" if budget else "")
    if n is not None:
        title += f"\n{n} images"
    ax.set_title(title, fontsize=10)
    return _save(fig, Path(out_dir), name)


def render_sweep_figures(
    tables: Mapping[str, pd.DataFrame],
    out_dir: str | Path,
    *,
    fraction: float | None = None,
    budget: str | None = None,
) -> list[Path]:
    """Draw every figure whose tables are present in ``tables``; return the written paths."""
    out_dir = Path(out_dir)
    classes = tables.get("classes")
    transforms = tables.get("transforms")
    paths: list[Path] = []
    accuracy = tables.get("accuracy")
    if accuracy is not None and len(accuracy):
        paths += plot_accuracy_curves(
            accuracy,
            out_dir,
            class_accuracy=tables.get("class_accuracy"),
            classes=classes,
            transforms=transforms,
        )
    curves = tables.get("softmax_curves")
    if curves is not None and len(curves):
        paths += plot_softmax_curves(curves, out_dir, classes=classes, transforms=transforms)
    th = tables.get("thresholds")
    if th is not None and len(th):
        paths += plot_thresholds(
            th, out_dir, classes=classes, transforms=transforms, fraction=fraction
        )
    acc2d = tables.get("accuracy_2d")
    if acc2d is not None and len(acc2d):
        paths += plot_heatmaps(acc2d, out_dir, transforms=transforms)
    wc = tables.get("worst_case_summary")
    if wc is not None and len(wc):
        paths += plot_worst_case(wc, out_dir, budget=budget)
    return paths


def render_sweep_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a stored sweep run (read-only) into ``out_dir`` (default ``run_dir/figures``)."""
    from invariscope.runs.store import RunStore

    run = RunStore.open(run_dir)
    tables = stored_aggregates(run_dir)
    meta = run.meta
    budget = run.config.get("worst_case") or None
    text = None
    if budget:
        text = (
            f"+-{budget['max_angle']:g} deg, +-{budget['max_shift']:g} px, grid "
            f"{budget['angles']}x{budget['shifts']}x{budget['shifts']}, k={budget['k']}"
        )
    return render_sweep_figures(
        tables,
        figures_dir(run_dir, out_dir),
        fraction=meta.get("threshold_fraction"),
        budget=text,
    )
