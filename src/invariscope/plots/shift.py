"""Figures of the small-shift stability analysis, drawn from its stored aggregate tables.

After Azulay & Weiss 2019 (P(correct class) per image and frame, jaggedness, MAD,
nonshiftability, global sums of a layer), Zhang 2019 (consistency) and Hendrycks &
Dietterich 2019 (flip probability, flip rate relative to a baseline). A run holds one
or two models, named by role: ``"model"`` and, optionally, ``"baseline"``; the
baseline is drawn first (left, first bar), the remedied model next to it.

Tables (all optional except ``shift_summary``; a missing table skips its figure):

- ``models``: ``model`` (role), ``label`` (display name, e.g. a checkpoint file name);
  without it the role is the label;
- ``protocols``: ``protocol, unit, reference`` (``"adjacent"`` | ``"first"``),
  ``steps, direction``;
- ``shift_summary``: one row per (model, protocol): ``n_images`` and, each with
  ``_low`` / ``_high`` (95% interval), ``accuracy, jagged, p_top1_change, fp, t5d, mad,
  consistency`` (NaN where the protocol has no 2-D shifts), and ``mean_jaggedness``;
- ``mfr``: ``protocol`` (and a row ``"mean"``), ``model, fp, baseline_fp, fr``;
- ``pcorrect``: ``model, protocol, index, label, frame, position, p_true, row`` (``row``
  0 = the image with the largest sum of ``p_true`` over frames);
- ``nonshiftability``: ``model, protocol, index, layer, layer_order, n_maps,
  nonshiftability``; ``nonshiftability_mean``: ``model, protocol, layer, layer_order,
  mean, low, high, n_images``;
- ``layer_sums``: ``model, protocol, index, layer, layer_order, frame, position, total``;
- ``classes``: ``label, name``.

Figures (each written as ``<name>.png`` (150 dpi) and ``<name>.svg``, like the sweep's):
``shift_pcorrect`` (paper figure 2), ``shift_stability`` (jaggedness, P(top-1 change) /
flip probability, consistency, MAD (figure 7), top-5 distance), ``shift_nonshiftability``
(figure 10), ``shift_layer_sums`` (figure 4) and ``shift_flip_rate`` (with a baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, MaxNLocator

from invariscope.errors import InvariscopeError
from invariscope.plots.sweep import _grid, _names, figures_dir, save_figures, stored_aggregates

__all__ = ["render_shift_figures", "render_shift_run"]

#: Okabe & Ito's colour-blind-safe palette (black last).
_OKABE_ITO = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
]
#: Fixed colours of the two roles, so every figure draws the baseline alike.
_ROLE_COLOURS = {"baseline": "#E69F00", "model": "#0072B2"}
_ROLE_RANK = {"baseline": 0, "model": 1}
#: The widest a figure is drawn (inches; 1600 px at the saved 150 dpi, less a margin).
MAX_WIDTH_IN = 10.4
#: Legend text of the error bars and bands.
INTERVAL_LABEL = "error bars: 95% interval"
#: y-axis label of the nonshiftability panels (Azulay & Weiss 2019, figure 10).
NONSHIFTABILITY_LABEL = "nonshiftability: frames with a\n>20% change of the global sum"
#: y-axis label of the flip-rate figure.
FLIP_RATE_LABEL = "flip rate relative to baseline (mFR)"


# --------------------------------------------------------------------------- context

#: The tables with ``model`` and ``protocol`` columns, in the order that sets the defaults.
_MODEL_TABLES = (
    "shift_summary",
    "pcorrect",
    "nonshiftability",
    "nonshiftability_mean",
    "layer_sums",
    "mfr",
)


@dataclass
class _Context:
    """Model roles, display labels and colours; protocol order, units and references."""

    labels: dict[str, str] = field(default_factory=dict)
    protocols: dict[str, dict[str, str]] = field(default_factory=dict)
    protocol_rank: dict[str, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of(cls, tables: Mapping[str, pd.DataFrame]) -> _Context:
        roles: list[str] = []
        for name in _MODEL_TABLES:
            table = tables.get(name)
            if table is not None and "model" in table.columns:
                roles += list(table["model"].astype(str).unique())
        given: dict[str, str] = {}
        models = tables.get("models")
        if models is not None and len(models):
            given = {str(r.model): str(r.label) for r in models.itertuples(index=False)}
            roles = [*map(str, models["model"]), *roles]
        roles = list(dict.fromkeys(roles))
        labels = {}
        for role in roles:
            label = given.get(role, role)
            if role == "baseline" and label != role:
                label = f"{label} (baseline)"
            labels[role] = label
        duplicated = {v for v in labels.values() if list(labels.values()).count(v) > 1}
        labels = {r: (f"{v} ({r})" if v in duplicated else v) for r, v in labels.items()}

        protocols: dict[str, dict[str, str]] = {}
        info = tables.get("protocols")
        order: list[str] = []
        if info is not None and len(info):
            for r in info.to_dict("records"):
                protocols[str(r["protocol"])] = {
                    k: ("" if _missing(r.get(k)) else str(r.get(k)))
                    for k in ("unit", "reference", "direction")
                }
                order.append(str(r["protocol"]))
        for name in _MODEL_TABLES:
            table = tables.get(name)
            if table is not None and "protocol" in table.columns:
                order += [p for p in table["protocol"].astype(str).unique() if p != "mean"]
        rank = {p: i for i, p in enumerate(dict.fromkeys(order))}
        return cls(labels, protocols, rank, _names(tables.get("classes")))

    def label(self, role: str) -> str:
        return self.labels.get(role, role)

    def colour(self, role: str) -> str:
        if role in _ROLE_COLOURS:
            return _ROLE_COLOURS[role]
        others = [r for r in self.labels if r not in _ROLE_COLOURS]
        free = [c for c in _OKABE_ITO if c not in _ROLE_COLOURS.values()]
        i = others.index(role) if role in others else len(others)
        return free[i % len(free)]

    def model_order(self, roles: Iterable) -> list[str]:
        """Baseline first, then the model, then any other role in order of appearance."""
        seen = list(dict.fromkeys(str(r) for r in roles))
        known = list(self.labels)
        return sorted(
            seen,
            key=lambda r: (_ROLE_RANK.get(r, 2), known.index(r) if r in known else len(known)),
        )

    def protocol_order(self, protocols: Iterable) -> list[str]:
        seen = list(dict.fromkeys(str(p) for p in protocols))
        return sorted(seen, key=lambda p: self.protocol_rank.get(p, len(self.protocol_rank)))

    def reference(self, protocol: str) -> str:
        return self.protocols.get(protocol, {}).get("reference", "") or "adjacent"

    def position_label(self, protocol: str) -> str:
        """x-axis label of a protocol's frames, e.g. ``"vertical shift (px)"``."""
        info = self.protocols.get(protocol, {})
        if protocol.startswith("sequence:"):
            what = protocol.split(":", 1)[1]
        elif protocol == "scale":
            what = "scale"
        else:
            what = "shift"
        direction = info.get("direction", "").strip()
        if direction and direction.lower() not in {"none", "nan", what}:
            what = f"{direction} {what}"
        unit = info.get("unit", "")
        return f"{what} ({unit})" if unit else what


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _highest(values) -> float:
    """The largest finite value (0 when there is none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.max()) if len(v) else 0.0


def _select(table: pd.DataFrame, model: str, protocol: str) -> pd.DataFrame:
    return table[
        (table["model"].astype(str) == model) & (table["protocol"].astype(str) == protocol)
    ]


def _present(tables: Mapping[str, pd.DataFrame], name: str) -> pd.DataFrame | None:
    table = tables.get(name)
    return table if table is not None and len(table) else None


def _summary_value(summary: pd.DataFrame | None, model: str, protocol: str, column: str) -> float:
    if summary is None or column not in summary.columns:
        return math.nan
    sub = _select(summary, model, protocol)
    return float(sub[column].iloc[0]) if len(sub) else math.nan


def _wraps(ctx: _Context, models: list[str], protocols: list[str], extra: int = 0) -> bool:
    """Whether the panel titles of a figure take two lines (one would run into the next panel)."""
    longest = max((len(ctx.label(m)) for m in models), default=0)
    longest += max((len(p) for p in protocols), default=0)
    return longest + 3 + extra > 42


def _panel_title(label: str, what: str, wrap: bool) -> str:
    """``"<label> — <what>"``, on two lines with ``wrap``."""
    return f"{label} —\n{what}" if wrap else f"{label} — {what}"


def _value_text(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


# ------------------------------------------------------------- figure 2: P(correct)


def _frame_axis(ax, positions: np.ndarray, n_rows: int) -> tuple[float, float, float, float]:
    """Extent for imshow: positions on x where evenly spaced, else frame indices."""
    steps = np.diff(positions)
    even = len(positions) > 1 and np.all(np.isfinite(positions)) and np.allclose(steps, steps[0])
    if len(positions) == 1 and np.isfinite(positions[0]):
        return (positions[0] - 0.5, positions[0] + 0.5, n_rows - 0.5, -0.5)
    if even and steps[0] != 0:
        half = steps[0] / 2
        return (positions[0] - half, positions[-1] + half, n_rows - 0.5, -0.5)
    # uneven positions: one column per frame, ticks labelled by position
    ticks = np.unique(
        np.linspace(0, len(positions) - 1, min(len(positions), 5)).round().astype(int)
    )
    ax.set_xticks(ticks, [f"{positions[i]:.3g}" for i in ticks])
    return (-0.5, len(positions) - 0.5, n_rows - 0.5, -0.5)


def _pcorrect_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Heatmaps images x frames of P(correct class): one row per protocol, one column per model."""
    pcorrect = _present(tables, "pcorrect")
    if pcorrect is None:
        return None
    ctx = _Context.of(tables)
    summary = _present(tables, "shift_summary")
    protocols = ctx.protocol_order(pcorrect["protocol"])
    models = ctx.model_order(pcorrect["model"])
    rows, cols = len(protocols), len(models)
    wrap = _wraps(ctx, models, protocols, extra=len(": jagged 100%"))
    fig = Figure(figsize=(3.7 * cols + 1.2, 2.9 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for r, protocol in enumerate(protocols):
        for c, model in enumerate(models):
            ax = axes[r, c]
            sub = _select(pcorrect, model, protocol)
            jagged = _summary_value(summary, model, protocol, "jagged")
            extra = f": jagged {jagged:.0%}" if np.isfinite(jagged) else ""
            ax.set_title(_panel_title(ctx.label(model), protocol + extra, wrap), fontsize=9)
            if not len(sub):
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            grid = sub.pivot_table(index="row", columns="frame", values="p_true", aggfunc="mean")
            grid = grid.sort_index().sort_index(axis=1)
            positions = (
                sub.groupby("frame")["position"].first().reindex(grid.columns).to_numpy(dtype=float)
            )
            extent = _frame_axis(ax, positions, len(grid))
            image = ax.imshow(
                grid.to_numpy(dtype=float),
                origin="upper",
                aspect="auto",
                extent=extent,
                vmin=0.0,
                vmax=1.0,
                cmap="viridis",
                interpolation="nearest",
            )
            ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.set_xlabel(ctx.position_label(protocol))
            if c == 0:
                ax.set_ylabel("image (sorted by Σ P(correct))")
    if image is not None:
        fig.colorbar(image, ax=axes, label="P(correct class)", shrink=min(1.0, 4.0 / (2.9 * rows)))
    fig.suptitle(
        "P(correct class) of each image as the input moves\n"
        "jagged: the true class enters or leaves the top 5 between adjacent frames",
        fontsize=10,
    )
    return fig


# ----------------------------------------------------------- stability bar charts


#: (column, panel title, y label, fraction in 0..1)
_METRICS = (
    # accuracy first: stability means little where the model is near chance on the frames
    ("accuracy", "accuracy on the frames", "fraction of frames\nwith the correct top-1", True),
    ("jagged", "jagged images (fraction)", "fraction of images", True),
    ("p_top1_change", "P(top-1 change) between adjacent frames", "probability", True),
    (
        "consistency",
        "consistency (Zhang 2019)",
        "fraction of shift pairs\nwith the same top-1",
        True,
    ),
    ("mad", "MAD of P(correct)", "mean |Δ P(correct class)|\nbetween adjacent frames", True),
    ("t5d", "top-5 distance T5D", "mean top-5 distance", False),
)


def _interval(sub: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = sub[column].to_numpy(dtype=float)
    low = sub.get(f"{column}_low", pd.Series(np.nan, index=sub.index)).to_numpy(dtype=float)
    high = sub.get(f"{column}_high", pd.Series(np.nan, index=sub.index)).to_numpy(dtype=float)
    return values, low, high


def _bars(
    ax,
    groups: list[str],
    series: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]],
    *,
    group_inches: float,
    hatch_last: bool = False,
) -> float:
    """Grouped bars with error bars and values; returns the highest drawn point."""
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups), dtype=float)
    top = 0.0
    fontsize = 7 if len(groups) * n <= 8 else 6
    rotate = len(groups) * n > 12
    for i, (label, colour, values, low, high) in enumerate(series):
        xs = x - 0.4 + width * (i + 0.5)
        hatches = ["//" if hatch_last and j == len(groups) - 1 else "" for j in range(len(groups))]
        ax.bar(
            xs,
            np.nan_to_num(values, nan=0.0),
            width=width * 0.92,
            color=colour,
            edgecolor="black",
            linewidth=0.5,
            hatch=hatches,
            label=label,
        )
        spans = np.stack([values - low, high - values])
        yerr = np.nan_to_num(spans, nan=0.0).clip(min=0.0)
        if np.isfinite(low).any() or np.isfinite(high).any():
            ax.errorbar(
                xs,
                np.nan_to_num(values, nan=0.0),
                yerr=yerr,
                fmt="none",
                ecolor="black",
                elinewidth=0.9,
                capsize=2.5,
            )
        for xv, v, h in zip(xs, values, high, strict=True):
            if not np.isfinite(v):
                ax.text(xv, 0, "n/a", ha="center", va="bottom", fontsize=fontsize, color="0.3")
                continue
            y = h if np.isfinite(h) and h > v else v
            top = max(top, y)
            ax.annotate(
                _value_text(v),
                (xv, y),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=fontsize,
                rotation=90 if rotate else 0,
            )
    ax.set_xticks(x, groups)
    # about 0.076 inch a character at the tick font size: rotate labels that would touch
    halves = [0.038 * (len(a) + len(b)) for a, b in zip(groups, groups[1:], strict=False)]
    if max(halves, default=0.0) > 0.85 * group_inches:
        ax.tick_params(axis="x", labelrotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    return top


def _limits(ax, top: float, fraction: bool, rotated: bool) -> None:
    """y from 0 with headroom for the printed values; fractions stay within 0..1 ticks."""
    room = 1.35 if rotated else 1.2
    if fraction:
        upper = min(max(top * room, 0.05), 1.0 + (0.25 if rotated else 0.12))
        ax.set_ylim(0, upper)
        locator = MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10])
        ticks = [t for t in locator.tick_values(0, min(upper, 1.0)) if 0 <= t <= 1]
        ax.set_yticks(ticks)
    else:
        ax.set_ylim(0, max(top * room, 0.5))


def _stability_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Grouped bars per protocol and model: jaggedness, P(top-1 change)/FP, consistency, MAD, T5D."""
    summary = _present(tables, "shift_summary")
    if summary is None:
        return None
    ctx = _Context.of(tables)
    protocols = ctx.protocol_order(summary["protocol"])
    models = ctx.model_order(summary["model"])
    first = [p for p in protocols if ctx.reference(p) == "first"]
    panels = []
    for column, title, ylabel, fraction in _METRICS:
        shown = column
        if column == "p_top1_change" and "fp" in summary.columns:
            shown = "fp"  # equals p_top1_change where the reference is the adjacent frame
        if shown not in summary.columns:
            continue
        if not np.isfinite(summary[shown].to_numpy(dtype=float)).any():
            continue
        if column == "p_top1_change" and first:
            title = f"{title}\n* FP: flip probability vs the first frame"
        panels.append((shown, title, ylabel, fraction, column == "p_top1_change"))
    if not panels:
        return None
    width = max(3.6, 0.32 * len(protocols) * len(models) + 1.6)
    # as many columns as fit the page (MAX_WIDTH_IN), at most 3
    rows, cols = _grid(len(panels), max_cols=max(1, min(3, int((MAX_WIDTH_IN - 1.8) // width))))
    fig = Figure(figsize=(width * cols + 1.8, 3.3 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    rotated = len(protocols) * len(models) > 12
    classes = _present(tables, "classes")
    chance = 1.0 / len(classes) if classes is not None and len(classes) > 1 else math.nan
    for ax, (column, title, ylabel, fraction, mark_first) in zip(axes.flat, panels, strict=False):
        groups = [f"{p} *" if mark_first and p in first else p for p in protocols]
        series = []
        for model in models:
            sub = summary[summary["model"].astype(str) == model].copy()
            sub["protocol"] = sub["protocol"].astype(str)
            sub = sub.set_index("protocol").reindex(protocols)
            values, low, high = _interval(sub, column)
            series.append((ctx.label(model), ctx.colour(model), values, low, high))
        top = _bars(ax, groups, series, group_inches=(width - 1.0) / len(protocols))
        if column == "accuracy" and math.isfinite(chance):
            ax.axhline(chance, color="black", ls="--", lw=0.9)
            top = max(top, chance)
        _limits(ax, top, fraction, rotated)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("protocol", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    spare = list(axes.flat)[len(panels) :]
    for ax in spare:
        ax.axis("off")
    handles = [Patch(facecolor=ctx.colour(m), edgecolor="black", linewidth=0.5) for m in models]
    labels = [ctx.label(m) for m in models]
    handles.append(Line2D([], [], color="black", lw=0.9, marker="_", ms=6))
    labels.append(INTERVAL_LABEL)
    if panels[0][0] == "accuracy" and math.isfinite(chance):
        handles.append(Line2D([], [], color="black", ls="--", lw=0.9))
        labels.append(f"chance (1/{len(classes)} classes)")
    if spare:  # the legend takes the free panel's place
        spare[0].legend(handles, labels, loc="center", fontsize=9)
    else:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    n = summary["n_images"].dropna().unique() if "n_images" in summary.columns else []
    suffix = f" ({int(n[0])} images per protocol)" if len(n) == 1 else ""
    fig.suptitle("Stability under small transformations" + suffix, fontsize=10)
    return fig


# ------------------------------------------------------- figure 10: nonshiftability


def _layers(tables: list[pd.DataFrame | None], model: str) -> list[str]:
    """The layers of a model in ``layer_order`` order."""
    pairs = []
    for table in tables:
        if table is not None:
            sub = table[table["model"].astype(str) == model]
            pairs += list(
                zip(sub["layer_order"].astype(float), sub["layer"].astype(str), strict=True)
            )
    ordered = sorted(set(pairs))
    return list(dict.fromkeys(layer for _, layer in ordered))


def _nonshiftability_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Nonshiftability vs layer: one thin line per image, the mean bold with its interval band."""
    per_image = _present(tables, "nonshiftability")
    means = _present(tables, "nonshiftability_mean")
    if per_image is None and means is None:
        return None
    ctx = _Context.of(tables)
    present = [t for t in (per_image, means) if t is not None]
    protocols = ctx.protocol_order(pd.concat([t["protocol"] for t in present]))
    models = ctx.model_order(pd.concat([t["model"] for t in present]))
    layers = {m: _layers([per_image, means], m) for m in models}
    rows, cols = len(protocols), len(models)
    wrap = _wraps(ctx, models, protocols)
    most = max(len(v) for v in layers.values())
    longest = max((len(layer) for v in layers.values() for layer in v), default=1)
    width = max(3.8, 0.3 * most + 1.2)
    fig = Figure(
        figsize=(width * cols + 0.8, (2.6 + 0.06 * longest) * rows + 1.3), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    banded = False
    top = 0.0  # the highest value drawn in any panel: the shared y-axis must reach it
    for r, protocol in enumerate(protocols):
        for c, model in enumerate(models):
            ax = axes[r, c]
            names = layers[model]
            where = {layer: i for i, layer in enumerate(names)}
            colour = ctx.colour(model)
            if per_image is not None:
                sub = _select(per_image, model, protocol)
                # fainter lines where there are many, so the mean stays readable
                alpha = float(np.clip(5.0 / max(sub["index"].nunique(), 1), 0.12, 0.4))
                for _, image in sub.groupby("index", sort=True):
                    image = image.sort_values("layer_order")
                    top = max(top, _highest(image["nonshiftability"]))
                    ax.plot(
                        image["layer"].astype(str).map(where),
                        image["nonshiftability"].astype(float),
                        color=colour,
                        lw=0.7,
                        alpha=alpha,
                    )
            xs = ys = None
            if means is not None:
                mean = _select(means, model, protocol).sort_values("layer_order")
                if len(mean):
                    xs = mean["layer"].astype(str).map(where).to_numpy(dtype=float)
                    ys = mean["mean"].to_numpy(dtype=float)
                    low = mean["low"].to_numpy(dtype=float)
                    high = mean["high"].to_numpy(dtype=float)
                    finite = np.isfinite(low) & np.isfinite(high)
                    if finite.any():
                        ax.fill_between(
                            xs, low, high, where=finite, color=colour, alpha=0.25, linewidth=0
                        )
                        banded = True
                        top = max(top, _highest(high[finite]))
            if xs is None and per_image is not None:
                sub = _select(per_image, model, protocol)
                if len(sub):
                    # no stored mean: the mean over images, without an interval
                    avg = sub.groupby("layer", sort=False)["nonshiftability"].mean()
                    xs = avg.index.astype(str).map(where).to_numpy(dtype=float)
                    order = np.argsort(xs)
                    xs, ys = xs[order], avg.to_numpy(dtype=float)[order]
            if xs is not None:
                ax.plot(xs, ys, color=colour, lw=2.6, marker="o", ms=3.5, zorder=3)
                top = max(top, _highest(ys))
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(names) - 0.5)
            ax.set_title(_panel_title(ctx.label(model), protocol, wrap), fontsize=9)
            ax.grid(alpha=0.3)
            if r == rows - 1:
                ax.set_xlabel("layer (input → output)")
            if c == 0:
                ax.set_ylabel(NONSHIFTABILITY_LABEL, fontsize=8)
    # one y-range for every panel (shared), set after all are drawn: from 0 to the highest
    # value of any panel (a limit set per panel would clip the panels drawn after it)
    axes[0, 0].set_ylim(0, 1.05 * top if top > 0 else 1.0)
    handles = [
        Line2D([], [], color="0.4", lw=0.7, alpha=0.6),
        Line2D([], [], color="0.2", lw=2.6, marker="o", ms=3.5),
    ]
    labels = ["one image", "mean over images"]
    if banded:
        handles.append(Patch(facecolor="0.4", alpha=0.25))
        labels.append("band: 95% interval of the mean")
    for model in models:
        handles.append(Line2D([], [], color=ctx.colour(model), lw=2.6))
        labels.append(ctx.label(model))
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(
        "Nonshiftability by layer\n0: no frame moves a feature map's global sum by more than 20%",
        fontsize=10,
    )
    return fig


# --------------------------------------------------------- figure 4: layer sums


def _image_names(tables: Mapping[str, pd.DataFrame], ctx: _Context) -> dict[int, str]:
    """``index -> "image <index> (<class>)"`` where ``pcorrect`` gives the class."""
    pcorrect = _present(tables, "pcorrect")
    if pcorrect is None or "label" not in pcorrect.columns:
        return {}
    first = pcorrect.groupby("index")["label"].first()
    return {int(i): f"image {int(i)} ({ctx.names.get(int(v), int(v))})" for i, v in first.items()}


def _layer_sums_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Global sum of the deepest layer's activations vs position, one line per image."""
    sums = _present(tables, "layer_sums")
    if sums is None:
        return None
    ctx = _Context.of(tables)
    protocols = ctx.protocol_order(sums["protocol"])
    models = ctx.model_order(sums["model"])
    images = sorted(int(i) for i in sums["index"].unique())
    colours = {i: _OKABE_ITO[k % len(_OKABE_ITO)] for k, i in enumerate(images)}
    names = _image_names(tables, ctx)
    rows, cols = len(protocols), len(models)
    wrap = _wraps(ctx, models, protocols)
    fig = Figure(figsize=(4.2 * cols + 0.8, 2.9 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for c, model in enumerate(models):
        own = sums[sums["model"].astype(str) == model]
        deepest = own.loc[own["layer_order"].astype(float).idxmax(), "layer"]
        for r, protocol in enumerate(protocols):
            ax = axes[r, c]
            sub = _select(own, model, protocol)
            sub = sub[sub["layer"].astype(str) == str(deepest)]
            for index, image in sub.groupby("index", sort=True):
                image = image.sort_values("frame")
                ax.plot(
                    image["position"].astype(float),
                    image["total"].astype(float),
                    color=colours[int(index)],
                    lw=1.3,
                    marker=".",
                    ms=4,
                )
            ax.set_title(_panel_title(ctx.label(model), protocol, wrap), fontsize=9)
            ax.set_xlabel(ctx.position_label(protocol))
            ax.set_ylabel(f"global sum of {deepest}\nactivations", fontsize=8)
            ax.grid(alpha=0.3)
            # from 0: a change of a few percent looks as small as it is
            totals = sub["total"].to_numpy(dtype=float)
            totals = totals[np.isfinite(totals)]
            if len(totals):
                low, high = min(totals.min(), 0.0), max(totals.max(), 0.0)
                pad = 0.06 * (high - low) or 1.0
                ax.set_ylim(low - (pad if low < 0 else 0), high + pad)
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))  # 14k, 1.2M: no offset text
    handles = [Line2D([], [], color=colours[i], lw=1.3, marker=".", ms=4) for i in images]
    labels = [names.get(i, f"image {i}") for i in images]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(images), 3), fontsize=8)
    fig.suptitle("Global sum of the deepest layer as the input moves (y from 0)", fontsize=10)
    return fig


# ------------------------------------------------------------------ flip rate


def _flip_rate_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Flip rate of each model relative to the baseline, per protocol and the mean (mFR)."""
    mfr = _present(tables, "mfr")
    if mfr is None:
        return None
    ctx = _Context.of(tables)
    protocols = ctx.protocol_order(p for p in mfr["protocol"].astype(str) if p != "mean")
    has_mean = (mfr["protocol"].astype(str) == "mean").any()
    groups = protocols + (["mean"] if has_mean else [])
    models = [m for m in ctx.model_order(mfr["model"]) if m != "baseline"]
    series = []
    for model in models:
        sub = mfr[mfr["model"].astype(str) == model].copy()
        sub["protocol"] = sub["protocol"].astype(str)
        values = sub.set_index("protocol").reindex(groups)["fr"].to_numpy(dtype=float)
        nan = np.full(len(groups), np.nan)
        series.append((ctx.label(model), ctx.colour(model), values, nan, nan))
    width = max(4.6, len(groups) * (0.5 * max(len(models), 1) + 0.9) + 1.0)
    fig = Figure(figsize=(width, 4.6), layout="constrained")
    ax = fig.subplots()
    top = _bars(ax, groups, series, group_inches=(width - 1.0) / len(groups), hatch_last=has_mean)
    if has_mean and protocols:
        ax.axvline(len(protocols) - 0.5, color="0.5", ls=":", lw=1)
    baseline = ax.axhline(1.0, color="0.2", ls="--", lw=1.2)
    ax.set_ylim(0, max(1.25, top * 1.2))
    ax.set_ylabel(FLIP_RATE_LABEL)
    ax.set_xlabel("protocol")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles = [Patch(facecolor=ctx.colour(m), edgecolor="black", linewidth=0.5) for m in models]
    labels = [ctx.label(m) for m in models]
    handles.append(baseline)
    labels.append(f"{ctx.label('baseline')} = 1")
    if has_mean:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", linewidth=0.5))
        labels.append("mean over protocols (mFR)")
    # below the axes: beside them it would run into the title
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(
        "Flip probability relative to the baseline\n(below 1: fewer prediction flips)", fontsize=10
    )
    return fig


# ------------------------------------------------------------------- entry points

_FIGURES: tuple[tuple[str, Callable[[Mapping[str, pd.DataFrame]], Figure | None]], ...] = (
    ("shift_pcorrect", _pcorrect_figure),
    ("shift_stability", _stability_figure),
    ("shift_nonshiftability", _nonshiftability_figure),
    ("shift_layer_sums", _layer_sums_figure),
    ("shift_flip_rate", _flip_rate_figure),
)


def render_shift_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Draw every shift figure whose tables are present in ``tables``; return the written paths.

    ``shift_summary`` is required; every other table is optional and its figure is
    skipped without it.
    """
    if _present(tables, "shift_summary") is None:
        raise InvariscopeError(
            "the shift tables have no 'shift_summary'; draw the figures of a finished "
            "shift run (run the shift analysis first)"
        )
    return save_figures(_FIGURES, tables, out_dir)


def render_shift_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a stored shift run (read-only) into ``out_dir`` (default ``run_dir/figures``)."""
    return render_shift_figures(stored_aggregates(run_dir), figures_dir(run_dir, out_dir))
