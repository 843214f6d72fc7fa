"""Figures of the STN benchmark (Finnveden, Jansson & Lindeberg 2020), from its stored aggregates.

Tables (each optional; a missing table skips its figure):

- ``error_table``: ``arch, label, data, error_mean_pct, error_std_pct, seeds, params``
  (table II);
- ``pose_table``: ``arch, label, data, measure, pose_sd, pose_sd_std, ...`` (table I);
- ``angle_points``: ``arch, seed, index, applied_angle_deg, predicted_angle_deg`` and
  ``angle_fit``: ``arch, label, seed, slope, intercept, n`` (figure 6, rotated data);
- ``example_images``: ``arch, label, example, image ("input"/"warped"), height, width,
  pixels`` (figure 5).

Figures (``<name>.png`` at 150 dpi and ``<name>.svg``): ``stn_errors`` (bars of the
error, ± 1 SD over seeds), ``stn_pose`` (bars of the pose SD), ``stn_angles`` (predicted
against applied rotation angle per STN, with the orthogonal-regression line of the first
seed and the line of perfect compensation) and ``stn_examples`` (inputs and what each
transformer makes of them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from invariscope.errors import InvariscopeError
from invariscope.plots.shift import _OKABE_ITO, _present
from invariscope.plots.sweep import figures_dir, save_figures, stored_aggregates

__all__ = ["render_stn_figures", "render_stn_run"]

_UNITS = {
    "angle_sd_deg": "circular SD of the final angle (degrees)",
    "distance_sd_px": "standard distance deviation of the final position (px)",
    "log2_det_sd": "SD of the final log2 det (log2 of the area scale)",
}
_DATA = {"rotated": "rotated digits", "translated": "translated digits", "scaled": "scaled digits"}


def _sd(value) -> float:
    return (
        0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    )


def _arch_colours(tables: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    """One colour per architecture, the same in every figure (in the error table's order)."""
    t = _present(tables, "error_table")
    archs = [] if t is None else list(dict.fromkeys(t["arch"]))
    return {a: _OKABE_ITO[i % len(_OKABE_ITO)] for i, a in enumerate(archs)}


def _bars(
    table: pd.DataFrame,
    column: str,
    spread: str,
    ylabel: str,
    title: str,
    palette: Mapping[str, str] | None = None,
    reference: tuple[float, str] | None = None,
) -> Figure:
    fig = Figure(figsize=(1.1 * len(table) + 2.5, 3.6))
    ax = fig.add_subplot()
    x = np.arange(len(table))
    palette = palette or {}
    colours = [palette.get(a, _OKABE_ITO[i % len(_OKABE_ITO)]) for i, a in enumerate(table["arch"])]
    seeds = int(table["seeds"].max()) if "seeds" in table else 1
    # one seed has no spread: no error bars (a zero-height bar would read as "no spread")
    errs = [_sd(v) for v in table[spread]] if seeds > 1 else [0.0] * len(table)
    ax.bar(
        x,
        table[column],
        yerr=errs if seeds > 1 else None,
        capsize=4,
        color=colours,
        edgecolor="black",
        lw=0.5,
    )
    for xi, v in zip(x, table[column], strict=True):  # inside the bar: clear of the error bar
        ax.text(
            xi,
            v / 2,
            f"{v:.3g}",
            ha="center",
            va="center",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    ax.set_xticks(x, list(table["label"]), rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    top = max(float(v) + e for v, e in zip(table[column], errs, strict=True))
    if reference is not None and math.isfinite(reference[0]):
        ax.axhline(reference[0], color="black", ls="--", lw=1, label=reference[1])
        ax.legend(loc="upper left", fontsize=8, frameon=True)
        top = max(top, reference[0])
    ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)  # room for the note above the bars
    # in the title, clear of the legend and the bars
    note = f"error bars: ± 1 SD over {seeds} seeds" if seeds > 1 else "n = 1 seed: no error bars"
    ax.set_title(f"{title}\n{note}", fontsize=10)
    return fig


def _errors(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    t = _present(tables, "error_table")
    if t is None:
        return None
    data = _DATA.get(str(t["data"].iloc[0]), str(t["data"].iloc[0]))
    return _bars(
        t,
        "error_mean_pct",
        "error_std_pct",
        "top-1 test error (%)",
        f"Classification error on {data} (table II)",
        _arch_colours(tables),
    )


def _pose(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    t = _present(tables, "pose_table")
    if t is None:
        return None
    measure = str(t["measure"].iloc[0])
    data = _DATA.get(str(t["data"].iloc[0]), str(t["data"].iloc[0]))
    return _bars(
        t,
        "pose_sd",
        "pose_sd_std",
        _UNITS.get(measure, measure),
        f"Pose SD after the transformer on {data} (table I; lower = more canonical)",
        _arch_colours(tables),
        reference=(
            (float(t["unaligned_pose_sd"].iloc[0]), "no alignment (the applied perturbations)")
            if "unaligned_pose_sd" in t
            else None
        ),
    )


def _angles(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    points, fits = _present(tables, "angle_points"), _present(tables, "angle_fit")
    if points is None or fits is None:
        return None
    archs = list(dict.fromkeys(fits["arch"]))
    labels = dict(zip(fits["arch"], fits["label"], strict=False))
    fig = Figure(figsize=(3.8 * len(archs) + 0.6, 4.0))
    axes = fig.subplots(1, len(archs), squeeze=False, sharey=True)[0]
    line = np.array([-90.0, 90.0])
    for ax, arch in zip(axes, archs, strict=True):
        seed = int(fits[fits["arch"] == arch]["seed"].min())
        p = points[(points["arch"] == arch) & (points["seed"] == seed)]
        f = fits[(fits["arch"] == arch) & (fits["seed"] == seed)].iloc[0]
        ax.scatter(
            p["applied_angle_deg"],
            p["predicted_angle_deg"],
            s=3,
            alpha=0.35,
            color="black",
            lw=0,
            label=f"test images (n = {len(p)})",
        )
        ax.plot(
            line,
            f.slope * line + f.intercept,
            color="#D55E00",
            lw=2,
            label=f"orthogonal regression, slope {f.slope:.2f}",
        )
        ax.plot(line, -line, color="#0072B2", lw=1, ls="--", label="perfect compensation")
        ax.set_xlim(-95, 95)
        ax.set_ylim(-185, 185)
        ax.set_title(f"{labels.get(arch, arch)} (seed {seed})", fontsize=10)
        ax.set_xlabel("applied rotation (degrees)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("rotation applied by the transformer (degrees)")
    fig.suptitle(
        "Predicted vs applied rotation (figure 6; positive = counter-clockwise as displayed)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _examples(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    ex = _present(tables, "example_images")
    if ex is None:
        return None
    archs = list(dict.fromkeys(ex["arch"]))
    labels = dict(zip(ex["arch"], ex["label"], strict=False))
    k = int(ex["example"].max()) + 1
    rows = 1 + len(archs)
    fig = Figure(figsize=(max(1.3 * k + 1.2, 6.0), 1.35 * rows + 0.4))
    axes = fig.subplots(rows, k, squeeze=False)

    def show(ax, row) -> None:
        img = np.asarray(row.pixels, dtype=np.float32).reshape(int(row.height), int(row.width))
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")

    first = ex[(ex["arch"] == archs[0]) & (ex["image"] == "input")]
    for r in first.itertuples(index=False):
        show(axes[0, int(r.example)], r)
    for i, arch in enumerate(archs, start=1):
        for r in ex[(ex["arch"] == arch) & (ex["image"] == "warped")].itertuples(index=False):
            show(axes[i, int(r.example)], r)
    names = ["input"] + [
        labels.get(a, a) + (" *" if str(a).startswith("C") and str(a) != "C0" else "")
        for a in archs
    ]
    for i, name in enumerate(names):
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(
        "Perturbed test digits and the transformer's output (figure 5)\n"
        "* STN-CX warps a feature map; shown: its transform applied to the input",
        fontsize=9,
    )
    return fig


_FIGURES = (
    ("stn_errors", _errors),
    ("stn_pose", _pose),
    ("stn_angles", _angles),
    ("stn_examples", _examples),
)


def render_stn_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Draw every STN figure whose tables are present; return the written paths."""
    if _present(tables, "error_table") is None:
        raise InvariscopeError(
            "the STN tables have no 'error_table'; draw the figures of a finished stn-benchmark run"
        )
    return save_figures(_FIGURES, tables, out_dir)


def render_stn_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a stored STN benchmark run (read-only) into ``out_dir``
    (default ``run_dir/figures``)."""
    return render_stn_figures(stored_aggregates(run_dir), figures_dir(run_dir, out_dir))
