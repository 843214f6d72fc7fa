"""Figures of the Lie-derivative equivariance error (LEE), drawn from its stored aggregate tables.

After Gruver et al. 2022 ("The Lie derivative for measuring learned equivariance"): for
each transformation ``g_t`` (``t = 0`` the identity), the derivative of the logits
along ``t``, ``d f(g_t x) / dt`` at ``t = 0``; LEE is the mean over images of its
squared norm, in units of the logits per unit of ``t`` squared (per px² for a
translation, per degree² for a rotation).

Tables (each optional; a missing table skips its figure):

- ``lee_summary``: ``transform, unit, n, lee, lee_low, lee_high`` (mean ± 1.96 SE of
  the per-image squared norm), ``lee_abs, lee_abs_low, lee_abs_high`` (the same of
  the ℓ₁ norm over the logits), ``median_lee``;
- ``lee_layers_mean``: ``transform, layer, order, mean, low, high`` (per-element mean
  squared equivariance error of a layer and its 95% interval), ``rel_mean`` (relative
  to the layer's mean squared activation), ``n``;
- ``lee_contrib_mean``: ``transform, layer, order, mean, low, high`` (per image squared
  norm of a layer's contribution to the logits' Lie derivative, Gruver et al.'s
  additive decomposition, and its 95% interval), ``share_mean``, ``n``;
- ``transforms``: ``transform, unit`` (order and units of the transformations).

Figures (each written as ``<name>.png`` (150 dpi) and ``<name>.svg``, like the
sweep's): ``lee`` (bars per transformation, log y), ``lee_layers`` (the relative
error of each layer, one line per transformation, log y) and ``lee_contrib`` (per
transformation a panel of bars per layer of the mean contribution, log y).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from invariscope.errors import InvariscopeError
from invariscope.plots.shift import _OKABE_ITO, _present
from invariscope.plots.sweep import figures_dir, save_figures, stored_aggregates

__all__ = ["render_lee_figures", "render_lee_run"]

#: y-axis labels of the two panels of ``lee``.
LEE_LABEL = "LEE = E‖d logits/dt‖² (per unit²)"
LEE_ABS_LABEL = "E‖d logits/dt‖₁ (per unit)"
#: y-axis label of ``lee_layers``.
LAYER_LABEL = (
    "relative equivariance error of the layer\n(mean squared error / mean squared activation)"
)
#: Legend text of the error bars and bands.
INTERVAL_LABEL = "error bars: 95% interval (mean ± 1.96 SE)"
#: The widest a figure is drawn (inches; 1600 px at the saved 150 dpi, less a margin).
MAX_WIDTH_IN = 10.4
BAND_LABEL = "band: 95% interval"


def _units(tables: Mapping[str, pd.DataFrame]) -> tuple[list[str], dict[str, str]]:
    """Transformations in order (the ``transforms`` table first) and their units."""
    order: list[str] = []
    units: dict[str, str] = {}
    for name in ("transforms", "lee_summary", "lee_layers_mean", "lee_contrib_mean"):
        table = _present(tables, name)
        if table is None or "transform" not in table.columns:
            continue
        order += list(table["transform"].astype(str))
        if "unit" in table.columns:
            for t, u in zip(table["transform"].astype(str), table["unit"], strict=True):
                if not _missing(u) and str(u):
                    units.setdefault(t, str(u))
    return list(dict.fromkeys(order)), units


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _colours(order: list[str]) -> dict[str, str]:
    """A fixed Okabe & Ito colour per transformation, alike in both figures."""
    return {t: _OKABE_ITO[i % len(_OKABE_ITO)] for i, t in enumerate(order)}


def _tick(transform: str, units: Mapping[str, str]) -> str:
    unit = units.get(transform, "")
    return f"{transform} (per {unit})" if unit else transform


def _positive(*arrays: np.ndarray) -> np.ndarray:
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    return values[np.isfinite(values) & (values > 0)]


def _log_limits(ax, low: float, high: float, room: float) -> None:
    """Log y from below ``low`` to above ``high`` with ``room`` decades for printed values."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return
    ax.set_ylim(low / 10**0.4, high * 10**room)


# ------------------------------------------------------------------- LEE bars


#: (column, panel title, y label)
_PANELS = (
    ("lee", "LEE (mean squared Lie derivative)", LEE_LABEL),
    ("lee_abs", "mean ℓ₁ norm of the Lie derivative", LEE_ABS_LABEL),
)


def _log_error_bars(ax, x, values, low, high, keep, **style) -> tuple[np.ndarray, np.ndarray]:
    """95% error bars of the bars ``keep`` on a log axis: a lower bound at or below 0
    (mean - 1.96 SE) runs to a tenth of the smallest positive value, the axis's bottom.
    Returns the drawn (lower, upper) bounds."""
    shown = _positive(values)
    floor = shown.min() / 10 if len(shown) else 1e-12
    lower = np.where(np.isfinite(low), np.maximum(low, floor), values)
    upper = np.where(np.isfinite(high), high, values)
    spans = np.nan_to_num(np.stack([values - lower, upper - values]), nan=0.0).clip(min=0.0)
    if keep.any() and (np.isfinite(low) | np.isfinite(high)).any():
        ax.errorbar(x[keep], values[keep], yerr=spans[:, keep], fmt="none", ecolor="black", **style)
    return lower, upper


def _unit_label(label: str, unit: str) -> str:
    """A y label's generic ``unit`` replaced by the panel's own (``per px²``)."""
    return label.replace("unit", unit) if unit else label


def _lee_panel(ax, sub, column, title, ylabel, unit, units, colours) -> bool:
    """One panel of ``lee``: bars of ``column`` for the transformations of one unit, with
    95% error bars (and the median for LEE) on a log axis; whether a median was drawn."""
    transforms = list(sub.index)
    x = np.arange(len(transforms), dtype=float)
    values = sub[column].to_numpy(dtype=float)
    low = sub.get(f"{column}_low", pd.Series(np.nan, index=sub.index)).to_numpy(dtype=float)
    high = sub.get(f"{column}_high", pd.Series(np.nan, index=sub.index)).to_numpy(dtype=float)
    finite = np.isfinite(values)
    ax.bar(
        x[finite],
        values[finite],
        width=0.65,
        color=[colours[t] for t, f in zip(transforms, finite, strict=True) if f],
        edgecolor="black",
        linewidth=0.5,
    )
    lower, upper = _log_error_bars(ax, x, values, low, high, finite, elinewidth=0.9, capsize=3)
    medians = np.full(len(transforms), np.nan)
    has_median = False
    if column == "lee" and "median_lee" in sub.columns:
        medians = sub["median_lee"].to_numpy(dtype=float)
        ok = np.isfinite(medians) & (medians > 0)
        if ok.any():
            has_median = True
            ax.plot(
                x[ok], medians[ok], ls="none", marker="D", ms=5, mfc="white", mec="black", zorder=3
            )
    ax.set_yscale("log")
    for xv, v, top in zip(x, values, np.fmax(upper, values), strict=True):
        if not np.isfinite(v):
            ax.text(xv, 0.02, "n/a", transform=ax.get_xaxis_transform(), ha="center")
            continue
        ax.annotate(
            f"{v:.3g}",
            (xv, top if np.isfinite(top) and top > 0 else v),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    everything = _positive(values, lower, upper, medians)
    if len(everything):
        _log_limits(ax, everything.min(), everything.max(), room=0.5)
    ticks = [_tick(t, units) for t in transforms]
    ax.set_xticks(x, ticks, fontsize=8)
    if sum(len(t) for t in ticks) * 0.07 > 0.9 * max(0.75 * len(ticks) + 0.5, 1.0):
        ax.tick_params(axis="x", labelrotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    ax.set_xlim(-0.6, len(transforms) - 0.4)
    ax.set_ylabel(_unit_label(ylabel, unit), fontsize=8)
    ax.set_title(f"{title}\nper {unit}" if unit else title, fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.set_axisbelow(True)
    return has_median


def _lee_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Bars per transformation of LEE (and of the unsquared norm) with 95% error bars, log y."""
    summary = _present(tables, "lee_summary")
    if summary is None:
        return None
    order, units = _units(tables)
    summary = summary.assign(transform=summary["transform"].astype(str))
    transforms = [t for t in order if t in set(summary["transform"])]
    sub = summary.drop_duplicates("transform").set_index("transform").reindex(transforms)
    panels = [
        p
        for p in _PANELS
        if p[0] in sub.columns and len(_positive(sub[p[0]].to_numpy(dtype=float)))
    ]
    if not panels:
        return None
    colours = _colours(order)
    # one panel per unit (values per pixel and per degree do not share an axis): a row of
    # unit panels per measure, wrapped to the page width
    groups: dict[str, list[str]] = {}
    for t in transforms:
        groups.setdefault(units.get(t, ""), []).append(t)
    widths = {u: max(2.3, 0.6 * len(ts) + 1.2) for u, ts in groups.items()}
    cols = 1
    for n in range(len(groups), 0, -1):  # the most unit panels a row fits
        if max(widths.values()) * n + 0.4 <= MAX_WIDTH_IN:
            cols = n
            break
    per_measure = math.ceil(len(groups) / cols)
    rows = per_measure * len(panels)
    width = max(widths.values())
    fig = Figure(figsize=(width * cols + 0.4, 3.6 * rows + 1.0), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    has_median = False
    used = set()
    for m, (column, title, ylabel) in enumerate(panels):
        for g, (unit, names) in enumerate(groups.items()):
            r, c = m * per_measure + g // cols, g % cols
            used.add((r, c))
            has_median |= _lee_panel(
                grid[r, c], sub.reindex(names), column, title, ylabel, unit, units, colours
            )
    for r in range(rows):
        for c in range(cols):
            if (r, c) not in used:
                grid[r, c].axis("off")
    handles = [Line2D([], [], color="black", lw=0.9, marker="_", ms=6)]
    labels = [INTERVAL_LABEL]
    if has_median:
        handles.append(Line2D([], [], ls="none", marker="D", ms=5, mfc="white", mec="black"))
        labels.append("median over images (LEE)")
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    n = summary["n"].dropna().unique() if "n" in summary.columns else []
    suffix = f" ({int(n[0])} images)" if len(n) == 1 else ""
    fig.suptitle(
        "Lie-derivative equivariance error of the logits" + suffix + "\n"
        "0: the logits do not change under an infinitesimal transformation",
        fontsize=10,
    )
    return fig


# ------------------------------------------------------------------ per layer


def _lee_layers_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """The relative equivariance error of each layer, one line per transformation, log y."""
    layers = _present(tables, "lee_layers_mean")
    if layers is None:
        return None
    order, _units_ = _units(tables)
    colours = _colours(order)
    layers = layers.assign(transform=layers["transform"].astype(str))
    column = "rel_mean"
    if column not in layers.columns or not len(_positive(layers[column].to_numpy(dtype=float))):
        column = "mean"  # no relative error: the absolute one
    pairs = sorted(
        set(zip(layers["order"].astype(float), layers["layer"].astype(str), strict=True))
    )
    names = list(dict.fromkeys(name for _, name in pairs))
    where = {name: i for i, name in enumerate(names)}
    transforms = [t for t in order if t in set(layers["transform"])]
    longest = max(len(n) for n in names)
    fig = Figure(
        figsize=(max(7.2, 0.32 * len(names) + 4.4), 4.2 + 0.055 * longest),
        layout="constrained",
    )
    ax = fig.subplots()
    banded = False
    values: list[np.ndarray] = []
    for transform in transforms:
        sub = layers[layers["transform"] == transform].sort_values("order")
        xs = sub["layer"].astype(str).map(where).to_numpy(dtype=float)
        ys = sub[column].to_numpy(dtype=float)
        colour = colours[transform]
        if {"low", "high", "mean"} <= set(sub.columns):
            mean = sub["mean"].to_numpy(dtype=float)
            # the interval of the mean, scaled as the mean is to the plotted value
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(mean > 0, ys / mean, np.nan)
            low = sub["low"].to_numpy(dtype=float) * scale
            high = sub["high"].to_numpy(dtype=float) * scale
            floor = _positive(ys).min() / 10 if len(_positive(ys)) else np.nan
            low = np.where(np.isfinite(low), np.fmax(low, floor), np.nan)
            finite = np.isfinite(low) & np.isfinite(high)
            if finite.any():
                ax.fill_between(xs, low, high, where=finite, color=colour, alpha=0.2, linewidth=0)
                banded = True
                values += [low[finite], high[finite]]
        unit = _units_.get(transform, "")
        label = f"{transform} (per {unit})" if unit else transform
        ax.plot(xs, ys, color=colour, lw=1.8, marker="o", ms=4, label=label, zorder=3)
        values.append(ys)
    ax.set_yscale("log")
    shown = _positive(*values) if values else np.array([])
    if len(shown):
        _log_limits(ax, shown.min(), shown.max(), room=0.3)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("layer (input → output)")
    ylabel = LAYER_LABEL if column == "rel_mean" else "mean squared equivariance error\n(per unit²)"
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3, which="major")
    handles, labels = ax.get_legend_handles_labels()
    if banded:
        handles.append(Patch(facecolor="0.4", alpha=0.2))
        labels.append(BAND_LABEL)
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    n = layers["n"].dropna().unique() if "n" in layers.columns else []
    suffix = f" ({int(n[0])} images)" if len(n) == 1 else ""
    # over the axes, not the figure: a figure title would run into the legend beside them
    ax.set_title("Lie-derivative equivariance error by layer" + suffix, fontsize=10)
    return fig


# ------------------------------------------------------------ layer contributions


def _lee_contrib_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Per transformation a panel of bars per layer (input to output) of the mean squared
    contribution to the logits' Lie derivative, 95% error bars, log y."""
    contrib = _present(tables, "lee_contrib_mean")
    if contrib is None:
        return None
    order, units = _units(tables)
    contrib = contrib.assign(transform=contrib["transform"].astype(str))
    transforms = [t for t in order if t in set(contrib["transform"])]
    if not transforms:
        return None
    colours = _colours(order)
    names = list(
        dict.fromkeys(
            name
            for _, name in sorted(
                set(zip(contrib["order"].astype(float), contrib["layer"].astype(str), strict=True))
            )
        )
    )
    longest = max(len(n) for n in names)
    width = max(3.4, 0.3 * len(names) + 1.4)
    # at most 3 panels a row, as many as fit the page width
    cols = max(1, min(len(transforms), 3, int((MAX_WIDTH_IN - 0.4) // width)))
    rows = math.ceil(len(transforms) / cols)
    fig = Figure(
        figsize=(width * cols + 0.4, (2.6 + 0.055 * longest) * rows + 0.9),
        layout="constrained",
    )
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(transforms) :]:
        ax.set_visible(False)
    for ax, transform in zip(axes, transforms, strict=False):
        sub = (
            contrib[contrib["transform"] == transform]
            .drop_duplicates("layer")
            .set_index("layer")
            .reindex(names)
        )
        values = sub["mean"].to_numpy(dtype=float)
        low = sub.get("low", pd.Series(np.nan, index=sub.index)).to_numpy(dtype=float)
        high = sub.get("high", pd.Series(np.nan, index=sub.index)).to_numpy(dtype=float)
        x = np.arange(len(names), dtype=float)
        positive = np.isfinite(values) & (values > 0)
        ax.bar(
            x[positive],
            values[positive],
            width=0.7,
            color=colours[transform],
            edgecolor="black",
            linewidth=0.5,
        )
        lower, upper = _log_error_bars(
            ax, x, values, low, high, positive, elinewidth=0.8, capsize=2
        )
        ax.set_yscale("log")
        # an exactly zero contribution (an equivariant layer) has no bar on a log axis
        for xv, v in zip(x, values, strict=True):
            if not (np.isfinite(v) and v > 0):
                text = "0" if np.isfinite(v) else "n/a"
                ax.text(xv, 0.02, text, transform=ax.get_xaxis_transform(), ha="center", fontsize=7)
        everything = _positive(values[positive], lower[positive], upper[positive])
        if len(everything):
            _log_limits(ax, everything.min(), everything.max(), room=0.2)
        else:
            ax.set_ylim(1e-3, 1.0)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(_tick(transform, units), fontsize=9)
        unit = units.get(transform, "unit")
        ax.set_ylabel(f"E‖c_i‖² (per {unit}²)", fontsize=8)
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.set_axisbelow(True)
    fig.supxlabel("layer (input → output)", fontsize=9)
    n = contrib["n"].dropna().unique() if "n" in contrib.columns else []
    suffix = f" ({int(n[0])} images)" if len(n) == 1 else ""
    fig.suptitle(
        "Layer-wise contributions to the Lie derivative of the logits" + suffix + "\n"
        "c_i: layer i's local equivariance error carried to the logits (Σ c_i = d logits/dt); "
        + INTERVAL_LABEL,
        fontsize=9,
    )
    return fig


# ------------------------------------------------------------------- entry points

_FIGURES: tuple[tuple[str, Callable[[Mapping[str, pd.DataFrame]], Figure | None]], ...] = (
    ("lee", _lee_figure),
    ("lee_layers", _lee_layers_figure),
    ("lee_contrib", _lee_contrib_figure),
)


def render_lee_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Draw every LEE figure whose tables are present in ``tables``; return the written paths.

    ``lee_summary`` draws ``lee``, ``lee_layers_mean`` draws ``lee_layers``,
    ``lee_contrib_mean`` draws ``lee_contrib``; a missing table skips its figure.
    """
    names = ("lee_summary", "lee_layers_mean", "lee_contrib_mean")
    if all(_present(tables, name) is None for name in names):
        raise InvariscopeError(
            "the LEE tables have neither 'lee_summary' nor 'lee_layers_mean' nor "
            "'lee_contrib_mean'; draw the "
            "figures of a finished LEE run (run the LEE analysis first)"
        )
    return save_figures(_FIGURES, tables, out_dir)


def render_lee_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a stored LEE run (read-only) into ``out_dir`` (default ``run_dir/figures``)."""
    return render_lee_figures(stored_aggregates(run_dir), figures_dir(run_dir, out_dir))
