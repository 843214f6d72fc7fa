"""Figures of the feature-map alignment check (Jansson et al. 2020), from stored tables.

Table ``alignment_mean``: ``transform, unit, magnitude, layer, order, method, n, mean,
low, high, median, pooled, positions`` with ``method`` in ``exact`` (``T^-1`` carried to
the feature grid), ``best`` (the best spatial warp found near ``T^-1``, per image),
``floor`` (the round trip ``T^-1 T`` of the layer's own map: what an exactly
equivariant layer would show) and ``input`` (the same check on the input image read on
the layer's grid); ``mean`` is the mean over images of
``||T^-1 Gamma(T f) - Gamma f|| / ||Gamma f||`` over the valid region, ``low``/``high``
its 95% interval. Optional ``transforms`` (``transform, unit``) gives the order.

Figures (``<name>.png`` at 150 dpi and ``<name>.svg``): ``alignment_<transform>``, one
per transformation, a panel per magnitude: the error against the layer (input to
output) for each method, with the 95% band of the exact-inverse error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from invariscope.errors import InvariscopeError
from invariscope.plots.shift import _present
from invariscope.plots.sweep import _save, figures_dir, stored_aggregates

__all__ = ["render_alignment_figures", "render_alignment_run"]

#: method -> (legend text, colour, line style, marker)
STYLES = {
    "exact": ("exact inverse T⁻¹ on the feature grid", "#0072B2", "-", "o"),
    "best": ("best spatial warp near T⁻¹ (per image)", "#D55E00", "--", "s"),
    "floor": ("floor: round trip T⁻¹T of the layer's own map", "0.35", ":", "^"),
    "input": ("input image on the layer's grid (equivariant)", "0.6", "-.", "v"),
}
YLABEL = "alignment error\n‖T⁻¹Γ(Tf) − Γf‖ / ‖Γf‖"


def _magnitude_text(value: float, unit: str) -> str:
    if unit == "degree":
        return f"{value:g}°"
    if unit == "pixel":
        return f"{value:g} px"
    if unit == "factor":
        return f"×{value:g}"
    if unit == "shear factor":
        return f"k = {value:g}"
    return f"{value:g} {unit}".strip()


def _transform_figure(table: pd.DataFrame, transform: str) -> Figure | None:
    sub = table[table["transform"].astype(str) == transform]
    if not len(sub):
        return None
    unit = str(sub["unit"].iloc[0]) if "unit" in sub.columns else ""
    mags = sorted(sub["magnitude"].astype(float).unique())
    pairs = sorted(set(zip(sub["order"].astype(int), sub["layer"].astype(str), strict=True)))
    names = [name for _, name in pairs]
    where = {name: i for i, name in enumerate(names)}
    cols = len(mags)
    fig = Figure(figsize=(max(3.2 * cols + 0.6, 6.5), 4.2), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False, sharey=True)[0]
    top = 0.0
    methods = [m for m in STYLES if m in set(sub["method"])]
    for ax, mag in zip(axes, mags, strict=True):
        panel = sub[np.isclose(sub["magnitude"].astype(float), mag)]
        for method in methods:
            rows = panel[panel["method"] == method].sort_values("order")
            if not len(rows):
                continue
            label, colour, style, marker = STYLES[method]
            xs = rows["layer"].astype(str).map(where).to_numpy(dtype=float)
            ys = rows["mean"].to_numpy(dtype=float)
            if method == "exact" and {"low", "high"} <= set(rows.columns):
                low = rows["low"].to_numpy(dtype=float)
                high = rows["high"].to_numpy(dtype=float)
                ok = np.isfinite(low) & np.isfinite(high)
                if ok.any():
                    ax.fill_between(xs, low, high, where=ok, color=colour, alpha=0.2, lw=0)
                    top = max(top, float(np.nanmax(high[ok])))
            ax.plot(xs, ys, color=colour, ls=style, marker=marker, ms=4, lw=1.6, zorder=3)
            if np.isfinite(ys).any():
                top = max(top, float(np.nanmax(ys)))
        ticks = [n[4:] if n.startswith("net.") else n for n in names]
        ax.set_xticks(range(len(names)), ticks, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("layer (input → output)", fontsize=8)
        ax.set_xlim(-0.4, len(names) - 0.6)
        ax.set_title(f"{transform} {_magnitude_text(mag, unit)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylim(0, max(top * 1.08, 1e-3))
    axes[0].set_ylabel(YLABEL, fontsize=8)
    handles = [
        Line2D([], [], color=STYLES[m][1], ls=STYLES[m][2], marker=STYLES[m][3], ms=4)
        for m in methods
    ]
    labels = [STYLES[m][0] for m in methods]
    if "exact" in methods:
        handles.append(Patch(facecolor=STYLES["exact"][1], alpha=0.2))
        labels.append("95% interval of the exact-inverse error")
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    n = sub["n"].dropna().unique() if "n" in sub.columns else []
    suffix = f" ({int(max(n))} images)" if len(n) else ""
    fig.suptitle(
        f"Feature-map alignment under {transform}{suffix}: 0 = a purely spatial warp "
        "aligns the maps",
        fontsize=10,
    )
    return fig


def render_alignment_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Draw ``alignment_<transform>`` for every transformation in ``alignment_mean``."""
    table = _present(tables, "alignment_mean")
    if table is None:
        raise InvariscopeError(
            "the alignment tables have no 'alignment_mean'; draw the figures of a finished "
            "alignment run (run the alignment analysis first)"
        )
    order = list(dict.fromkeys(table["transform"].astype(str)))
    listed = _present(tables, "transforms")
    if listed is not None and "transform" in listed.columns:
        first = [t for t in listed["transform"].astype(str) if t in order]
        order = first + [t for t in order if t not in first]
    paths: list[Path] = []
    for transform in order:
        fig = _transform_figure(table, transform)
        if fig is not None:
            paths += _save(fig, Path(out_dir), f"alignment_{transform}")
    return paths


def render_alignment_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a stored alignment run (read-only) into ``out_dir`` (default
    ``run_dir/figures``)."""
    return render_alignment_figures(stored_aggregates(run_dir), figures_dir(run_dir, out_dir))
