"""Figures of learned equivariance maps (Lenc & Vedaldi 2018), drawn from stored aggregates.

Tables (each optional; a missing one skips its figure):

- ``invariance``: ``layer, order, transform, transform_order, map, error, error_low,
  error_high, n`` (top-1 error of the network after the layer on ``M phi(g^-1 x)`` for
  each map: ``none`` = identity, ``permutation`` = P_g, ``regression``, ``tl``);
  ``models``: ``error, error_low, error_high`` on the original images;
  ``invariance_summary``: ``layer, transform, invariant`` (flags);
- ``reconstruction``: ``layer, order, transform, transform_order, map, relative``.

Figures (``<name>.png`` at 150 dpi and ``<name>.svg``):

- ``equivariance_invariance``: the layout of the paper's figure 10: one panel per
  transformation, top-1 error (%) per layer; green dashed = original images, red dashed
  = transformed images without compensation, grey = P_g only, orange = learned map
  (band: 95% Wilson interval); a ring marks layers flagged invariant;
- ``equivariance_reconstruction``: per transformation, the relative reconstruction
  error (mean per-cell distance / mean per-cell norm of phi(x)) of each map per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from invariscope.errors import InvariscopeError
from invariscope.plots.sweep import figures_dir, save_figures, stored_aggregates

__all__ = ["render_equivariance_figures", "render_equivariance_run"]

_STYLE = {
    "none": ("#D55E00", "identity (no compensation)"),
    "permutation": ("#777777", "P_g: spatial resampling only"),
    "regression": ("#0072B2", "regression map M_g"),
    "tl": ("#E69F00", "transformation layer M_g"),
}


def _present(tables: Mapping[str, pd.DataFrame], name: str) -> pd.DataFrame | None:
    t = tables.get(name)
    return t if t is not None and len(t) else None


def _transforms(table: pd.DataFrame) -> list[str]:
    return list(table.sort_values("transform_order")["transform"].drop_duplicates())


def _layers(table: pd.DataFrame) -> list[str]:
    return list(table.sort_values("order")["layer"].drop_duplicates())


def _short(layers: list[str]) -> list[str]:
    """Tick labels without the Classifier's ``net.`` prefix."""
    return [n[4:] if n.startswith("net.") else n for n in layers]


def _panels(count: int, layers: int):
    """A figure with ``count`` panels, at most 3 per row, sharing y; returns (fig, axes)."""
    cols = min(3, count)
    rows = -(-count // cols)
    width = max(2.6, 0.45 * layers + 1.2)
    fig = Figure(figsize=(width * cols + 0.8, 2.9 * rows + 1.0), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False, sharey=True)
    axes = list(grid.ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _invariance_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    inv = _present(tables, "invariance")
    if inv is None:
        return None
    models = _present(tables, "models")
    flags = _present(tables, "invariance_summary")
    transforms, layers = _transforms(inv), _layers(inv)
    fig, axes = _panels(len(transforms), len(layers))
    x = np.arange(len(layers))
    for ax, transform in zip(axes, transforms, strict=True):
        sub = inv[inv["transform"] == transform]
        if models is not None:
            ax.axhline(
                100 * float(models["error"].iloc[0]),
                color="#009E73",
                ls="--",
                lw=1.2,
                label="original images",
            )
        none = sub[sub["map"] == "none"]
        if len(none):
            ax.axhline(
                100 * float(none["error"].mean()),
                color=_STYLE["none"][0],
                ls="--",
                lw=1.2,
                label="transformed, no compensation",
            )
        for kind in ("permutation", "regression", "tl"):
            s = sub[sub["map"] == kind].set_index("layer").reindex(layers)
            if s["error"].isna().all():
                continue
            colour, label = _STYLE[kind]
            ax.plot(x, 100 * s["error"], marker="o", ms=4, color=colour, label=label)
            if kind != "permutation":
                ax.fill_between(
                    x, 100 * s["error_low"], 100 * s["error_high"], color=colour, alpha=0.2, lw=0
                )
        if flags is not None:
            f = flags[(flags["transform"] == transform) & flags["invariant"].astype(bool)]
            for layer in f["layer"]:
                i = layers.index(layer)
                e = sub[(sub["map"] == "permutation") & (sub["layer"] == layer)]["error"]
                ax.plot(
                    [i],
                    [100 * float(e.iloc[0])],
                    marker="o",
                    ms=11,
                    mfc="none",
                    mec="black",
                    mew=1.0,
                    ls="none",
                    label="flagged invariant (P_g as good as M_g)",
                )
        ax.set_title(f"g = {transform}")
        ax.set_xticks(x, _short(layers), rotation=45, ha="right")
        ax.set_xlabel("layer phi (psi: the network after it)")
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("top-1 error (%)")
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend(
        [handles[lab] for lab in labels],
        labels,
        loc="outside lower center",
        ncol=min(3, len(labels)),
        fontsize=8,
        title="bands: 95% Wilson interval",
        title_fontsize=8,
    )
    fig.suptitle("Equivariance by layer: psi(M_g phi(g^-1 x)) (Lenc & Vedaldi 2018, fig. 10)")
    return fig


def _reconstruction_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    rec = _present(tables, "reconstruction")
    if rec is None:
        return None
    transforms, layers = _transforms(rec), _layers(rec)
    kinds = [k for k in _STYLE if k in set(rec["map"])]
    top = 1.1 * float(np.nanmax(rec["relative"].to_numpy(dtype=float)))
    if len(layers) == 1:  # one representation (HOG): grouped bars per transformation
        fig = Figure(
            figsize=(1.3 * len(transforms) * len(kinds) / 2 + 2.5, 4.0), layout="constrained"
        )
        ax = fig.subplots()
        width = 0.8 / len(kinds)
        x = np.arange(len(transforms))
        for i, kind in enumerate(kinds):
            s = rec[rec["map"] == kind].set_index("transform").reindex(transforms)
            colour, label = _STYLE[kind]
            ax.bar(
                x + (i - (len(kinds) - 1) / 2) * width,
                s["relative"],
                width,
                color=colour,
                edgecolor="black",
                linewidth=0.5,
                label=label,
            )
        ax.set_xticks(x, [f"g = {t}" for t in transforms])
        ax.set_xlabel(f"transformation (representation: {_short(layers)[0]})")
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylabel("relative reconstruction error\n(per-cell distance / norm)")
        ax.legend(fontsize=8)
        fig.suptitle("Held-out feature reconstruction of phi(x) from phi(g^-1 x)")
        return fig
    fig, axes = _panels(len(transforms), len(layers))
    x = np.arange(len(layers))
    for ax, transform in zip(axes, transforms, strict=True):
        sub = rec[rec["transform"] == transform]
        for kind in kinds:
            colour, label = _STYLE[kind]
            s = sub[sub["map"] == kind].set_index("layer").reindex(layers)
            ax.plot(x, s["relative"], marker="o", ms=4, color=colour, label=label)
        ax.set_title(f"g = {transform}")
        ax.set_xticks(x, _short(layers), rotation=45, ha="right")
        ax.set_xlabel("layer")
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("relative reconstruction error\n(per-cell distance / norm)")
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="outside lower center", ncol=min(4, len(lab)), fontsize=8)
    fig.suptitle("Held-out feature reconstruction of phi(x) from phi(g^-1 x)")
    return fig


_FIGURES = (
    ("equivariance_invariance", _invariance_figure),
    ("equivariance_reconstruction", _reconstruction_figure),
)


def render_equivariance_figures(
    tables: Mapping[str, pd.DataFrame], out_dir: str | Path
) -> list[Path]:
    """Draw every equivariance figure whose tables are in ``tables``; return the paths."""
    if _present(tables, "reconstruction") is None and _present(tables, "invariance") is None:
        raise InvariscopeError(
            "the tables have neither 'reconstruction' nor 'invariance'; draw the figures of a "
            "finished equivariance run"
        )
    return save_figures(_FIGURES, tables, out_dir)


def render_equivariance_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a stored equivariance run into ``out_dir`` (default ``run_dir/figures``)."""
    return render_equivariance_figures(stored_aggregates(run_dir), figures_dir(run_dir, out_dir))
