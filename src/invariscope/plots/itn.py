"""Figures of the Invariant Transformer Net (Bunne et al. 2018, strategy 2), drawn from its
stored aggregate tables.

Tables (each optional; a missing table skips its figure): ``training`` (``step,
loss_used, loss, classifier_loss, l_k1, l_k2, batch_accuracy``), ``clean`` (``acc_orig``,
``clean_accuracy``, ``tolerance``), ``k1_curve`` (``k1, accuracy, accuracy_low,
accuracy_high, p_true, p_other``), ``class_probabilities`` (``k1, label, name,
probability``), ``example_probabilities`` (``example, label, k1, class, probability``),
``examples`` (one row per pixel: ``example, original, k1, k2, channel, row, col,
value``), ``learned_transforms`` (``control, transform, k`` and the decomposition),
``accuracy`` (``k1, k2, accuracy``) and ``classes`` (``label, name``).

Figures (``<name>.png`` at 150 dpi and ``<name>.svg``):

- ``itn_training``: the classifier's loss and the invariance losses ``L_k1``, ``L_k2``
  over the training steps, and the batch accuracy against ``acc_orig`` (paper figure 4a);
- ``itn_k1_probabilities``: accuracy and class probabilities of the test images
  transformed by ``F([k1, 0])`` as ``k1`` goes from 0 to 1, and per example image its
  most probable classes (paper figure 4b);
- ``itn_examples``: example images at the corner controls (paper figure 5);
- ``itn_transforms``: the learned matrices decomposed (rotation, scale, shear,
  translation; contrast, brightness) as functions of their control;
- ``itn_accuracy``: test accuracy over the ``(k1, k2)`` lattice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from invariscope.errors import InvariscopeError
from invariscope.plots.shift import _OKABE_ITO, _present
from invariscope.plots.stitch import _heatmap
from invariscope.plots.sweep import _colour, figures_dir, save_figures, stored_aggregates

__all__ = ["render_itn_figures", "render_itn_run"]

#: Steps averaged by the running means drawn over the raw per-step values.
SMOOTH = 10


def _mapping(tables: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    """``{"k1": "spatial", "k2": "colour"}`` (the run's control mapping; default if unknown)."""
    lt = _present(tables, "learned_transforms")
    if lt is None:
        return {"k1": "spatial", "k2": "colour"}
    pairs = lt[["control", "transform"]].drop_duplicates()
    return {str(r.control): str(r.transform) for r in pairs.itertuples(index=False)}


def _clean(tables: Mapping[str, pd.DataFrame]) -> pd.Series | None:
    clean = _present(tables, "clean")
    return None if clean is None else clean.iloc[0]


def _names(tables: Mapping[str, pd.DataFrame]) -> dict[int, str]:
    classes = _present(tables, "classes")
    if classes is None:
        return {}
    return {int(r.label): str(r.name) for r in classes.itertuples(index=False)}


def _running(values: pd.Series) -> np.ndarray:
    return values.rolling(SMOOTH, min_periods=1).mean().to_numpy(dtype=float)


# ------------------------------------------------------------------- figure 4a


def _training_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    tr = _present(tables, "training")
    if tr is None:
        return None
    tr = tr.sort_values("step")
    mapping = _mapping(tables)
    clean = _clean(tables)
    fig = Figure(figsize=(10.2, 3.9), layout="constrained")  # within 1600 px at 150 dpi
    ax_c, ax_i, ax_a = fig.subplots(1, 3)
    step = tr["step"].to_numpy()
    used = tr["loss_used"].astype(str).to_numpy()
    # the classifier's loss, computed every step; marked where it was the loss used
    ax_c.plot(step, tr["classifier_loss"], color="0.7", lw=0.8, label="every step")
    ax_c.plot(
        step,
        _running(tr["classifier_loss"]),
        color=_OKABE_ITO[0],
        lw=1.6,
        label=f"running mean ({SMOOTH} steps)",
    )
    mask = used == "classifier"
    ax_c.scatter(
        step[mask],
        tr["classifier_loss"].to_numpy()[mask],
        s=9,
        color=_OKABE_ITO[5],
        zorder=3,
        label="steps that used it (acc < acc_orig)",
    )
    ax_c.set_title("classifier loss L_orig (cross-entropy)", fontsize=10)
    ax_c.set_ylabel("cross-entropy (nats)")
    for column, colour in (("l_k1", _OKABE_ITO[1]), ("l_k2", _OKABE_ITO[2])):
        kind = mapping.get(column[2:], column[2:])
        ax_i.plot(step, tr[column], color=colour, lw=0.6, alpha=0.45)
        ax_i.plot(
            step,
            _running(tr[column]),
            color=colour,
            lw=1.6,
            label=f"L_{column[2:]} ({kind}), running mean",
        )
    ax_i.set_title(
        "invariance losses L_k = mean_j k_j L(A_j)\n(more negative = larger transformations)",
        fontsize=10,
    )
    ax_i.set_ylabel("L_k (normalised units²; ≤ 0)")
    ax_a.plot(step, tr["batch_accuracy"], color="0.7", lw=0.8, label="batch accuracy")
    ax_a.plot(
        step,
        _running(tr["batch_accuracy"]),
        color=_OKABE_ITO[0],
        lw=1.6,
        label=f"running mean ({SMOOTH} steps)",
    )
    if clean is not None:
        ax_a.axhline(
            float(clean["acc_orig"]),
            color=_OKABE_ITO[5],
            ls="--",
            lw=1.2,
            label=f"acc_orig = {float(clean['tolerance']):g} × {float(clean['clean_accuracy']):.3f}",
        )
        ax_a.axhline(
            float(clean["clean_accuracy"]),
            color="0.3",
            ls=":",
            lw=1.0,
            label="clean accuracy (train split)",
        )
    ax_a.set_title("accuracy of the transformed training batch", fontsize=10)
    ax_a.set_ylabel("top-1 accuracy")
    ax_a.set_ylim(max(0.0, float(tr["batch_accuracy"].min()) - 0.05), 1.01)
    share = float(np.mean(used == "invariance")) if len(used) else float("nan")
    for ax in (ax_c, ax_i, ax_a):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(
        f"Training the Invariant Transformer Net ({len(tr)} steps; {100 * share:.0f}% used the "
        "invariance loss, the rest the classifier's loss)",
        fontsize=10,
    )
    return fig


# ------------------------------------------------------------------- figure 4b


def _k1_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    curve = _present(tables, "k1_curve")
    if curve is None:
        return None
    curve = curve.sort_values("k1")
    names = _names(tables)
    examples = _present(tables, "example_probabilities")
    ex_ids = [] if examples is None else sorted(examples["example"].unique())[:4]
    mapping = _mapping(tables)
    if ex_ids:  # the curve above, the examples in a row below: within the page width
        fig = Figure(figsize=(min(10.2, max(6.0, 2.5 * len(ex_ids))), 7.6), layout="constrained")
        grid = fig.add_gridspec(2, len(ex_ids))
        axes = [fig.add_subplot(grid[0, :])]
        axes += [fig.add_subplot(grid[1, i]) for i in range(len(ex_ids))]
    else:
        fig = Figure(figsize=(5.2, 4.0), layout="constrained")
        axes = [fig.add_subplot()]
    ax = axes[0]
    k1 = curve["k1"].to_numpy(dtype=float)
    ax.plot(k1, curve["accuracy"], color=_OKABE_ITO[0], marker="o", ms=3, label="top-1 accuracy")
    ax.fill_between(
        k1,
        curve["accuracy_low"],
        curve["accuracy_high"],
        color=_OKABE_ITO[0],
        alpha=0.2,
        lw=0,
        label="95% Wilson interval",
    )
    ax.plot(
        k1,
        curve["p_true"],
        color=_OKABE_ITO[2],
        marker="s",
        ms=3,
        label="mean softmax of the true class",
    )
    ax.plot(
        k1,
        curve["p_other"],
        color=_OKABE_ITO[5],
        marker="^",
        ms=3,
        label="mean of the largest other softmax",
    )
    clean = _clean(tables)
    if clean is not None:
        ax.axhline(
            float(clean["acc_orig"]), color="0.4", ls="--", lw=1.0, label="acc_orig (train split)"
        )
    n = int(curve["n"].iloc[0]) if "n" in curve.columns else None
    ax.set_title("test images under F([k1, 0])" + (f", {n} images" if n else ""), fontsize=10)
    ax.set_xlabel(f"k1 ({mapping.get('k1', '?')} control; k2 = 0)")
    ax.set_ylabel("accuracy / softmax probability")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left")
    for ax, e in zip(axes[1:], ex_ids, strict=True):
        sub = examples[examples["example"] == e]
        label = int(sub["label"].iloc[0])
        wide = sub.pivot(index="k1", columns="class", values="probability").sort_index()
        top = wide.max(axis=0).sort_values(ascending=False).index[:3].tolist()
        if label not in top:
            top = [label] + top[:2]
        for c in top:
            style = "-" if c == label else "--"
            ax.plot(
                wide.index,
                wide[c],
                style,
                color=_colour(c),
                marker="o",
                ms=3,
                label=f"{names.get(int(c), c)}" + (" (true)" if c == label else ""),
            )
        rest = wide.drop(columns=top)
        if rest.shape[1]:
            ax.plot(wide.index, rest.max(axis=1), ":", color="0.5", label="others (max)")
        index = int(sub["index"].iloc[0]) if "index" in sub.columns else e
        ax.set_title(f"test image #{index} (class {names.get(label, label)})", fontsize=9)
        ax.set_xlabel("k1")
        ax.set_ylabel("softmax probability")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(
        "Classification of images transformed with F([k1, 0], [0, 0]) (paper figure 4b)",
        fontsize=10,
    )
    return fig


# ------------------------------------------------------------------- figure 5


def _panel_name(row) -> str:
    return "original" if bool(row["original"]) else f"F(k1={row['k1']:g}, k2={row['k2']:g})"


def _examples_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    ex = _present(tables, "examples")
    if ex is None:
        return None
    names = _names(tables)
    mapping = _mapping(tables)
    panels = (
        ex[["original", "k1", "k2"]]
        .drop_duplicates()
        .assign(o=lambda d: ~d["original"].astype(bool))
        .sort_values(["o", "k2", "k1"])
    )
    ids = sorted(ex["example"].unique())
    C = int(ex["channel"].max()) + 1
    H, W = int(ex["row"].max()) + 1, int(ex["col"].max()) + 1
    fig = Figure(figsize=(1.55 * len(panels) + 0.6, 1.6 * len(ids) + 0.9), layout="constrained")
    axes = fig.subplots(len(ids), len(panels), squeeze=False)
    rescaled = False
    for i, e in enumerate(ids):
        sub = ex[ex["example"] == e]
        for j, (_, panel) in enumerate(panels.iterrows()):
            if bool(panel["original"]):
                cells = sub[sub["original"].astype(bool)]
            else:
                cells = sub[
                    (~sub["original"].astype(bool))
                    & (sub["k1"] == panel["k1"])
                    & (sub["k2"] == panel["k2"])
                ]
            image = np.zeros((C, H, W), dtype=np.float32)
            image[cells["channel"].to_numpy(), cells["row"].to_numpy(), cells["col"].to_numpy()] = (
                cells["value"].to_numpy(dtype=np.float32)
            )
            ax = axes[i, j]
            low, high = float(image.min()), float(image.max())
            if low < -1e-6 or high > 1 + 1e-6:  # unclamped colour map: show min-max rescaled
                image = (image - low) / (high - low) if high > low else np.zeros_like(image)
                rescaled = True
                ax.text(
                    0.97,
                    0.03,
                    "*",
                    transform=ax.transAxes,
                    ha="right",
                    va="bottom",
                    color="#E69F00",
                    fontsize=11,
                    fontweight="bold",
                )
            if C == 1:
                ax.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(np.clip(image[:3].transpose(1, 2, 0), 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_panel_name(panel), fontsize=8)
            if j == 0:
                label = int(sub["label"].iloc[0])
                ax.set_ylabel(f"class {names.get(label, label)}", fontsize=8)
    title = (
        f"Invariant Transformer Net at the corner controls (k1: {mapping.get('k1')}, k2: "
        f"{mapping.get('k2')}; paper figure 5)"
    )
    if rescaled:
        title += "\n* pixel values outside [0, 1] (unclamped colour map): shown min-max rescaled"
    fig.suptitle(title, fontsize=9)
    return fig


# ------------------------------------------------------------------- matrices


#: (columns, panel title, y label, transform kind)
_DECOMPOSITION = (
    (("rotation_deg",), "rotation", "degrees (counter-clockwise)", "spatial"),
    (("scale_x", "scale_y"), "scale", "factor (> 1 magnifies)", "spatial"),
    (("shear",), "shear", "x shift per unit of y", "spatial"),
    (("tx_px", "ty_px"), "translation of the centre", "pixels (right / down)", "spatial"),
    (("contrast",), "contrast", "factor (1 = unchanged)", "colour"),
    (("brightness",), "brightness", "additive ([0, 1] pixel units)", "colour"),
    (("mixing",), "channel mixing", "RMS off-diagonal term", "colour"),
    (("displacement",), "mean ||A x - x|| (unit x)", "displacement", "both"),
)


def _transforms_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    lt = _present(tables, "learned_transforms")
    if lt is None:
        return None
    panels = [
        p
        for p in _DECOMPOSITION
        if any(
            c in lt.columns
            and lt[c].notna().any()
            and not (c == "mixing" and (lt[c].fillna(0) == 0).all())
            for c in p[0]
        )
    ]
    cols = max(1, min(3, len(panels)))  # 3 panels of 3.3 inches: within 1600 px at 150 dpi
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.3 * cols, 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    identity = {
        "rotation_deg": 0.0,
        "scale_x": 1.0,
        "scale_y": 1.0,
        "shear": 0.0,
        "tx_px": 0.0,
        "ty_px": 0.0,
        "contrast": 1.0,
        "brightness": 0.0,
        "mixing": 0.0,
        "displacement": 0.0,
    }
    for ax, (columns, title, ylabel, kind) in zip(axes, panels, strict=False):
        kinds = ("spatial", "colour") if kind == "both" else (kind,)
        for t_i, t in enumerate(kinds):
            sub = lt[lt["transform"] == t].sort_values("k")
            if not len(sub):
                continue
            control = str(sub["control"].iloc[0])
            for c_i, column in enumerate(columns):
                colour = _OKABE_ITO[(c_i + 2 * t_i) % len(_OKABE_ITO)]
                label = f"{column} " if len(columns) > 1 else ""
                label += f"({t}, {control})" if kind == "both" else ""
                ax.plot(
                    sub["k"],
                    sub[column],
                    marker="o",
                    ms=3,
                    color=colour,
                    label=label.strip() or None,
                )
            ax.set_xlabel(f"{control} ({t} control)" if kind != "both" else "k (own control)")
        ax.axhline(identity[columns[0]], color="0.5", ls=":", lw=1.0, label="identity")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Learned transformations, decomposed (spatial: A = R(rotation) · diag(scale) · shear, in "
        "pixels; colour: I' = contrast · I + brightness)",
        fontsize=10,
    )
    return fig


def _accuracy_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    acc = _present(tables, "accuracy")
    if acc is None:
        return None
    wide = acc.pivot(index="k2", columns="k1", values="accuracy").sort_index()
    mapping = _mapping(tables)
    size = len(wide.columns)
    fig = Figure(
        figsize=(max(4.2, 0.75 * size + 2.4), max(3.6, 0.6 * len(wide) + 1.8)), layout="constrained"
    )
    ax = fig.subplots()
    _heatmap(
        fig,
        ax,
        wide.to_numpy(dtype=float)[::-1],
        cmap_name="viridis",
        label="top-1 accuracy",
        fontsize=8,
    )
    ax.set_xticks(range(size), [f"{v:g}" for v in wide.columns])
    ax.set_yticks(range(len(wide)), [f"{v:g}" for v in wide.index[::-1]])
    ax.set_xlabel(f"k1 ({mapping.get('k1', '?')} control)")
    ax.set_ylabel(f"k2 ({mapping.get('k2', '?')} control)")
    title = "test accuracy under the learned family F(k1, k2)"
    clean = _clean(tables)
    if clean is not None:
        title += f"\nacc_orig = {float(clean['acc_orig']):.3f} (train split)"
    n = int(acc["n"].iloc[0]) if "n" in acc.columns else None
    if n:
        title += f"; {n} test images"
    ax.set_title(title, fontsize=9)
    return fig


# ------------------------------------------------------------------- entry points

_FIGURES: tuple[tuple[str, Callable[[Mapping[str, pd.DataFrame]], Figure | None]], ...] = (
    ("itn_training", _training_figure),
    ("itn_k1_probabilities", _k1_figure),
    ("itn_examples", _examples_figure),
    ("itn_transforms", _transforms_figure),
    ("itn_accuracy", _accuracy_figure),
)


def render_itn_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Draw every ITN figure whose tables are present in ``tables``; return the written paths."""
    names = ("training", "k1_curve", "examples", "learned_transforms", "accuracy")
    if all(_present(tables, name) is None for name in names):
        raise InvariscopeError(
            "the tables have none of " + ", ".join(names) + "; draw the figures of a finished "
            "Invariant Transformer Net run (run 'invariscope itn' first)"
        )
    return save_figures(_FIGURES, tables, out_dir)


def render_itn_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a stored ITN run (read-only) into ``out_dir`` (default ``run_dir/figures``)."""
    return render_itn_figures(stored_aggregates(run_dir), figures_dir(run_dir, out_dir))
