"""Small-shift stability: jaggedness, flip rates, consistency and per-layer nonshiftability.

Azulay & Weiss (2019) embed an image in a larger canvas and move it one pixel at a time;
a network that had learned translation invariance would keep its prediction, yet for
about 30% of ImageNet images the true class enters or leaves the top-5 after a 1-pixel
shift. This module measures that, and the measures that followed:

- **jaggedness**: the number of adjacent frames where the true class enters or leaves
  the top-5; an image is *jagged* if it is > 0;
- **P(top-1 change)**: the fraction of adjacent frames whose top-1 differs;
- **MAD**: the mean ``|p_true(t) - p_true(t + 1)|`` over adjacent frames;
- **FP and T5D** (Hendrycks & Dietterich 2019, ImageNet-P): the flip probability and the
  top-5 ranking distance per sequence, frame against frame (adjacent), or every frame
  against the first for noise sequences; mFR divides FP by a baseline model's;
- **consistency** (Zhang 2019): the fraction of random pairs of 2-D shifts with the same
  top-1;
- **nonshiftability** (Azulay & Weiss, section 3): per layer, for each feature map whose
  peak response is large enough, the number of frames at which the map's global sum
  differs from its mean over the frames by more than 20% of that mean. A shiftable
  representation (one that obeys the sampling theorem) keeps its global sum: 0.

The measures are pure functions of predictions (numpy in, numpy or tidy tables out);
:class:`ShiftAnalysis` runs them on the engine (one part per protocol and batch of
images; every layer's sums come from the same forward pass as the logits).

Example:
    >>> import numpy as np
    >>> top5_true = np.array([[True, True, False, True]])  # frames of one image
    >>> jaggedness(top5_true).tolist()
    [2]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from invariscope._deprecation import renamed_arguments
from invariscope.engine import Analysis, AnalysisEntry, Batch, Part, part_id, register_analysis
from invariscope.engine import run as run_analysis
from invariscope.engine.execution import check_logits
from invariscope.engine.random import uniform_per_image
from invariscope.errors import InvariscopeError
from invariscope.measure._present import pct_ci
from invariscope.measure._present import pivot as tidy_pivot
from invariscope.measure.aggregate import mean_interval, wilson_interval
from invariscope.models.capture import register_layer_hook, resolve_layer
from invariscope.models.classifier import default_layer_names
from invariscope.transforms.shift import ShiftProtocol, parse_protocol

__all__ = [
    "ShiftAnalysis",
    "ShiftResult",
    "consistency",
    "jaggedness",
    "mean_absolute_difference",
    "nonshiftability",
    "sequence_measures",
    "shift_stability",
    "top1_changes",
    "top5_distance",
]

log = logging.getLogger(__name__)

TOP_K = 5
#: Per-image measures of the top-5; undefined (NaN) when the data has at most TOP_K classes.
TOP5_MEASURES = ("jaggedness", "jagged", "t5d")
PART_TABLES = ("frames", "sequences", "consistency", "layers", "layer_sums")
AGGREGATE_TABLES = (
    "shift_summary",
    "mfr",
    "pcorrect",
    "nonshiftability",
    "nonshiftability_mean",
    "layer_sums",
    "models",
    "protocols",
    "classes",
)
LAYER_SUM_IMAGES = 6  # images of the first batch whose layer sums are kept (figure 4)


# ----------------------------------------------------------------------------- measures


def _as_2d(name: str, a: Any, dtype=None) -> np.ndarray:
    arr = np.asarray(a, dtype=dtype)
    if arr.ndim != 2:
        raise InvariscopeError(f"{name} must be [images, frames], got shape {arr.shape}")
    return arr


def _check_reference(reference: str) -> None:
    if reference not in ("adjacent", "first"):
        raise InvariscopeError(f"reference must be 'adjacent' or 'first', got {reference!r}")


def jaggedness(top5_true: Any) -> np.ndarray:
    """Azulay & Weiss's jaggedness per image: adjacent frames where the true class enters
    or leaves the top-5.

    Args:
        top5_true: bool ``[images, frames]``: is the true class in the top-5 at frame t.

    Returns:
        int64 ``[images]``, in ``[0, frames - 1]``.
    """
    t = _as_2d("top5_true", top5_true, dtype=bool)
    return (t[:, 1:] != t[:, :-1]).sum(axis=1).astype(np.int64)


def top1_changes(pred: Any, reference: str = "adjacent") -> np.ndarray:
    """Number of frame pairs whose top-1 differs, per image.

    ``reference="adjacent"`` compares frame t with t + 1 (``frames - 1`` pairs);
    ``"first"`` compares every later frame with the first (ImageNet-P's noise sequences).
    Divide by ``frames - 1`` for P(top-1 change) / the flip probability FP.
    """
    _check_reference(reference)
    p = _as_2d("pred", pred)
    other = p[:, :-1] if reference == "adjacent" else p[:, :1]
    return (p[:, 1:] != other).sum(axis=1).astype(np.int64)


def mean_absolute_difference(p_true: Any) -> np.ndarray:
    """MAD per image: the mean ``|p_true(t + 1) - p_true(t)|`` over adjacent frames."""
    p = _as_2d("p_true", p_true, dtype=np.float64)
    return np.abs(np.diff(p, axis=1)).mean(axis=1)


def top5_distance(top5: Any, reference: str = "adjacent") -> np.ndarray:
    """Hendrycks & Dietterich's top-5 distance T5D per image, averaged over frame pairs.

    For frames a (earlier) and b, with ``a_0 .. a_4`` the top-5 classes of a in rank
    order and ``r_b(c)`` the 0-based rank of class c in b, clipped at 5::

        d(a, b) = sum_i |i - min(r_b(a_i), 5)|

    (their ``dist(sigma)`` with the cumulative top-5 weights). Identical top-5 rankings
    give 0; the most is 15 (none of a's top-5 in b's). Only b's top-5 are needed, since a
    rank beyond 5 counts as 5.

    Args:
        top5: int ``[images, frames, k]``: the top-k classes of each frame in rank order
            (k = 5, or the number of classes when fewer).
        reference: ``"adjacent"`` or ``"first"``, as in :func:`top1_changes`.
    """
    _check_reference(reference)
    t = np.asarray(top5)
    if t.ndim != 3:
        raise InvariscopeError(f"top5 must be [images, frames, k], got shape {t.shape}")
    k = t.shape[2]
    b = t[:, 1:]  # [N, F-1, k]
    a = t[:, :-1] if reference == "adjacent" else np.broadcast_to(t[:, :1], b.shape)
    # rank of a_i in b: position of a match, else k (clipped at 5)
    match = a[..., :, None] == b[..., None, :]  # [N, F-1, k(a), k(b)]
    found = match.any(axis=-1)
    rank_b = np.where(found, match.argmax(axis=-1), k)
    rank_b = np.minimum(rank_b, TOP_K)
    d = np.abs(np.arange(k)[None, None, :] - rank_b).sum(axis=-1)  # [N, F-1]
    return d.mean(axis=1).astype(np.float64)


def consistency(pred_a: Any, pred_b: Any) -> float:
    """Zhang's consistency: the fraction of pairs with the same top-1 (NaN for none)."""
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if a.shape != b.shape:
        raise InvariscopeError(f"pred_a {a.shape} and pred_b {b.shape} differ in shape")
    return float((a == b).mean()) if a.size else float("nan")


def nonshiftability(
    sums: Any, peaks: Any, *, map_threshold: float = 0.1, change: float = 0.2
) -> tuple[float, int]:
    """Azulay & Weiss's nonshiftability of one layer for one image.

    A feature map c qualifies when its peak response over all frames exceeds
    ``map_threshold`` times the layer's strongest peak (``max_t peaks[t, c] >
    map_threshold * max peaks``). For each qualifying map, count the frames t with
    ``|sums[t, c] - mean_t sums[:, c]| > change * |mean_t sums[:, c]|``; the layer's
    nonshiftability is the mean count over qualifying maps.

    Args:
        sums: ``[frames, maps]`` global sum of each feature map at each frame.
        peaks: ``[frames, maps]`` maximum of each feature map at each frame.
        map_threshold: relative threshold on the peak response (the paper: "maps where
            the maximum response was above a threshold").
        change: relative change of the global sum that counts (the paper: 20%).

    Returns:
        ``(nonshiftability, n_maps)``: NaN and 0 when no map qualifies.

    >>> sums = np.array([[1.0, 5.0], [1.0, 9.0], [1.0, 7.0]])
    >>> nonshiftability(sums, sums)   # map 1: mean 7, |5-7| = |9-7| = 2 > 1.4 -> 2 frames
    (1.0, 2)
    """
    s = _as_2d("sums", sums, dtype=np.float64)
    p = _as_2d("peaks", peaks, dtype=np.float64)
    if s.shape != p.shape:
        raise InvariscopeError(f"sums {s.shape} and peaks {p.shape} differ in shape")
    peak = p.max(axis=0)
    top = peak.max() if peak.size else 0.0
    keep = peak > map_threshold * top if top > 0 else np.zeros_like(peak, dtype=bool)
    if not keep.any():
        return float("nan"), 0
    s = s[:, keep]
    mean = s.mean(axis=0)
    counts = (np.abs(s - mean) > change * np.abs(mean)).sum(axis=0)
    return float(counts.mean()), int(keep.sum())


def sequence_measures(
    pred: Any, p_true: Any, top5: Any, labels: Any, reference: str = "adjacent"
) -> pd.DataFrame:
    """Per-image measures of a sequence of frames.

    Args:
        pred: top-1 ``[images, frames]``; p_true: probability of the true class
            ``[images, frames]``; top5: ``[images, frames, k]`` top classes in rank
            order; labels: ``[images]``.
        reference: ``"adjacent"`` (shifts, rotations...) or ``"first"`` (noise).

    Returns:
        One row per image: ``n_frames, jaggedness, jagged, changes`` (adjacent top-1
        changes), ``fp`` (flip probability against ``reference``), ``t5d, mad,
        accuracy`` (fraction of frames correct).
    """
    pred = _as_2d("pred", pred)
    p_true = _as_2d("p_true", p_true, dtype=np.float64)
    top5 = np.asarray(top5)
    labels = np.asarray(labels)
    n, f = pred.shape
    if f < 2:
        raise InvariscopeError(f"a sequence needs at least 2 frames, got {f}")
    top5_true = (top5 == labels[:, None, None]).any(axis=2)
    jag = jaggedness(top5_true)
    return pd.DataFrame(
        {
            "n_frames": np.full(n, f, dtype=np.int64),
            "jaggedness": jag,
            "jagged": jag > 0,
            "changes": top1_changes(pred, "adjacent"),
            "fp": top1_changes(pred, reference) / (f - 1),
            "t5d": top5_distance(top5, reference),
            "mad": mean_absolute_difference(p_true),
            "accuracy": (pred == labels[:, None]).mean(axis=1),
        }
    )


# ------------------------------------------------------------------------- the analysis


class _LayerSums:
    """Forward hooks that reduce each 4-D layer output to per-map sums and peaks on the
    fly, during the forward pass that computes the logits (no second pass)."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.layers = list(layers)
        self.sums: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        self.peaks: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        self.handles = [register_layer_hook(model, n, self._hook(n)) for n in self.layers]

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                out = output.float()
                self.sums[name].append(out.sum(dim=(2, 3)).cpu())
                self.peaks[name].append(out.amax(dim=(2, 3)).cpu())

        return hook

    def take(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (sums [N, C], peaks [N, C])}`` since the last take (4-D layers only)."""
        out = {
            n: (torch.cat(self.sums[n]), torch.cat(self.peaks[n]))
            for n in self.layers
            if self.sums[n]
        }
        self.sums = {n: [] for n in self.layers}
        self.peaks = {n: [] for n in self.layers}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _model_layers(model: nn.Module) -> list[str]:
    names = getattr(model, "layer_names", None)
    return list(names) if names is not None else default_layer_names(model)


def activation_layers(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The default layers for nonshiftability: the probe-able layers whose output on
    ``sample`` is a 4-D map with no negative value (ReLU outputs, pools of them, residual
    blocks ending in a ReLU), as in Azulay & Weiss, who count activity. A signed map (a
    convolution before its normalisation and ReLU) can have a global sum near zero, where
    a "20% change of the mean" means nothing. If no layer qualifies, every 4-D layer."""
    names = _model_layers(model)
    low: dict[str, float] = {}

    def hook(name):
        def record(module, inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                low[name] = min(low.get(name, np.inf), float(output.detach().float().amin()))

        return record

    handles = [register_layer_hook(model, n, hook(n)) for n in names]
    try:
        with torch.inference_mode():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    four_d = [n for n in names if n in low]
    return [n for n in four_d if low[n] >= 0] or four_d


class ShiftAnalysis(Analysis):
    """Small-shift stability of a classifier (and optionally a baseline) on the engine.

    Parts: one per (protocol, batch) (``shift-p<k>-<batch>``), computing for every model
    the frames' predictions, the per-image sequence measures, Zhang's consistency pairs
    and, from the same forward passes, every layer's per-map sums (nonshiftability).

    Args:
        protocols: protocol names or :class:`~invariscope.transforms.shift.ShiftProtocol`
            s (``"embed"``, ``"crop"``, ``"scale"``, ``"circular"``, ``"subpixel"``,
            ``"sequence:<transform>"``); strings take ``protocol_options``.
        protocol_options: ``steps, direction, factor, fill, step`` for string protocols.
        baseline: True when the run has a second model ``"baseline"`` (mFR, side by side).
        layers: layers for nonshiftability (default: the model's probe-able layers; only
            those with 4-D outputs count). ``()`` skips nonshiftability.
        consistency_pairs: random pairs of 2-D shifts per image (Zhang's consistency).
        consistency_range: 2-D offsets are drawn from ``[0, range)`` per axis (default:
            ``round(32 / 224 * H)`` at least 2, Zhang's ImageNet range scaled).
        map_threshold, change: see :func:`nonshiftability`.
    """

    name = "shift"
    part_tables = PART_TABLES
    aggregate_tables = AGGREGATE_TABLES

    def __init__(
        self,
        protocols: str | ShiftProtocol | Sequence[str | ShiftProtocol] = ("embed",),
        *,
        protocol_options: Mapping[str, Any] | None = None,
        baseline: bool = False,
        layers: Sequence[str] | None = None,
        consistency_pairs: int = 5,
        consistency_range: int | None = None,
        map_threshold: float = 0.1,
        change: float = 0.2,
    ) -> None:
        if isinstance(protocols, str | ShiftProtocol):
            protocols = [protocols]
        options = dict(protocol_options or {})
        self.protocols = [
            p if isinstance(p, ShiftProtocol) else parse_protocol(p, **options) for p in protocols
        ]
        # string protocols without a frame count: fewer than the default where the image
        # leaves less room (chosen in check(), when the image size is known)
        self._fit_steps = [
            not isinstance(p, ShiftProtocol) and options.get("steps") is None for p in protocols
        ]
        if not self.protocols:
            raise InvariscopeError("give at least one protocol, e.g. --protocol embed")
        names = [p.name for p in self.protocols]
        if len(set(names)) != len(names):
            raise InvariscopeError(f"protocol listed twice: {', '.join(names)}")
        self.models = ("model", "baseline") if baseline else ("model",)
        self.layers = None if layers is None else [str(n) for n in layers]
        self.resolved_layers: dict[str, list[str]] = {}
        if isinstance(consistency_pairs, bool) or int(consistency_pairs) != consistency_pairs:
            raise InvariscopeError(f"consistency pairs must be an integer, got {consistency_pairs}")
        if consistency_pairs < 0:
            raise InvariscopeError(f"consistency pairs must be >= 0, got {consistency_pairs}")
        self.consistency_pairs = int(consistency_pairs)
        if consistency_range is not None and int(consistency_range) < 2:
            raise InvariscopeError(
                f"consistency range must be >= 2 pixels, got {consistency_range}"
            )
        self.consistency_range = None if consistency_range is None else int(consistency_range)
        if not (0.0 <= map_threshold < 1.0):
            raise InvariscopeError(f"map threshold must be in [0, 1), got {map_threshold}")
        if not (0.0 < change):
            raise InvariscopeError(f"change must be positive, got {change}")
        self.map_threshold = float(map_threshold)
        self.change = float(change)

    # -- planning
    def _size(self, ctx) -> tuple[int, int]:
        x, _ = ctx.datasets["data"][int(ctx.indices["data"][0])]
        x = torch.as_tensor(x)
        return int(x.shape[-2]), int(x.shape[-1])

    def _range(self, protocol: ShiftProtocol, h: int, w: int) -> int:
        if not protocol.supports_2d:
            return 0
        r = self.consistency_range or max(2, round(32 / 224 * min(h, w)))
        return int(min(r, protocol.max_offset(h, w) + 1))

    def _fit(self, protocol: ShiftProtocol, h: int, w: int) -> ShiftProtocol:
        """``protocol`` with the most frames (up to its default) that fit ``h x w``."""
        try:
            protocol.check(h, w)
            return protocol
        except InvariscopeError as err:
            first = err
        for steps in range(protocol.steps - 1, 1, -1):
            fitted = replace(protocol, steps=steps)
            try:
                fitted.check(h, w)
            except InvariscopeError:
                continue
            log.warning(
                "shift: %s uses %d frames (not %d), the most that fit a %dx%d image; set "
                "--frames to choose",
                protocol.name,
                steps,
                protocol.steps,
                h,
                w,
            )
            return fitted
        raise first

    def check(self, ctx) -> None:
        h, w = self._size(ctx)
        self.protocols = [
            self._fit(p, h, w) if fit else p
            for p, fit in zip(self.protocols, self._fit_steps, strict=True)
        ]
        for p in self.protocols:
            p.check(h, w)
        if self.layers is None:  # the default: the model's activation layers
            x, _ = ctx.datasets["data"][int(ctx.indices["data"][0])]
            x = torch.as_tensor(x)[None].to(ctx.device)
            self.resolved_layers = {
                role: activation_layers(ctx.models[role], x) for role in self.models
            }
        for role in self.models:
            for layer in self.layers or ():
                try:
                    resolve_layer(ctx.models[role], layer)
                except InvariscopeError as err:
                    raise InvariscopeError(f"{role}: {err}") from None
        if "baseline" in ctx.models:
            x, _ = ctx.datasets["data"][int(ctx.indices["data"][0])]
            x = torch.as_tensor(x)[None].to(ctx.device)
            try:
                with torch.inference_mode():
                    logits = ctx.models["baseline"](x)
            except InvariscopeError as err:
                raise InvariscopeError(f"the baseline model does not fit the data: {err}") from None
            check_logits(logits, 1, ctx.num_classes, "of the baseline model")

    def config(self) -> dict[str, Any]:
        return {
            "protocols": [asdict(p) for p in self.protocols],
            "layers": self.layers if self.layers is not None else self.resolved_layers,
            "consistency_pairs": self.consistency_pairs,
            "consistency_range": self.consistency_range,
            "map_threshold": self.map_threshold,
            "change": self.change,
            "top_k": TOP_K,
        }

    def _per_image(self) -> int:
        per_model = sum(p.steps for p in self.protocols)
        per_model += 2 * self.consistency_pairs * sum(p.supports_2d for p in self.protocols)
        return per_model * len(self.models)

    def work(self, ctx) -> int:
        return len(ctx.indices["data"]) * self._per_image()

    def max_forward_batch(self, ctx) -> int:
        batch = max(len(b) for b in ctx.batches["data"])
        return batch * max(max(p.steps for p in self.protocols), 2 * self.consistency_pairs, 1)

    def plan(self, ctx) -> list[Part]:
        return [
            Part(part_id("shift", f"p{k}", b), batch=b, key=k)
            for b in range(len(ctx.batches["data"]))
            for k in range(len(self.protocols))
        ]

    # -- computing
    def _layers(self, role: str) -> list[str]:
        return self.resolved_layers.get(role, self.layers or [])

    def compute(self, part: Part, ctx, batch: Batch) -> dict[str, pd.DataFrame]:
        protocol = self.protocols[part.key]
        tables: dict[str, list[pd.DataFrame]] = {n: [] for n in PART_TABLES}
        for role in self.models:
            out = _measure_model(
                ctx.forward,
                role,
                ctx.models[role],
                protocol,
                batch,
                num_classes=ctx.num_classes,
                layers=self._layers(role),
                forward_batch=ctx.forward_batch,
                pairs=self.consistency_pairs,
                offsets=self._range(protocol, batch.x.shape[-2], batch.x.shape[-1]),
                seed=ctx.seed,
                stream=part.key,
                map_threshold=self.map_threshold,
                change=self.change,
            )
            for name, table in out.items():
                tables[name].append(table)
        return {n: pd.concat(t, ignore_index=True) for n, t in tables.items() if t}

    # -- aggregating
    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        r = ctx.results
        names = ctx.classes["data"]
        h, w = self._size(ctx)
        sequences = r.read_table("sequences")
        if ctx.num_classes <= TOP_K:
            log.warning(
                "shift: jaggedness and T5D are undefined with %d classes (the top-%d holds "
                "every class); they are NaN",
                ctx.num_classes,
                TOP_K,
            )
        pairs = _optional(r, "consistency")
        frames = r.read_table(
            "frames", columns=["model", "protocol", "index", "label", "frame", "position", "p_true"]
        )
        layers = _optional(r, "layers")
        out = {
            "shift_summary": shift_summary(sequences, pairs),
            "pcorrect": pcorrect_rows(frames),
            "models": pd.DataFrame(
                {
                    "model": list(self.models),
                    "label": [ctx.options.get(f"{m}_label", m) for m in self.models],
                }
            ),
            "protocols": pd.DataFrame(
                {
                    "protocol": [p.name for p in self.protocols],
                    "unit": [p.unit for p in self.protocols],
                    "reference": [p.reference for p in self.protocols],
                    "steps": [p.steps for p in self.protocols],
                    "direction": [p.direction for p in self.protocols],
                    "consistency_range": [self._range(p, h, w) for p in self.protocols],
                }
            ),
            "classes": pd.DataFrame(
                {"label": np.arange(len(names), dtype=np.int64), "name": names}
            ),
        }
        if len(layers):
            out["nonshiftability"] = layers
            out["nonshiftability_mean"] = nonshiftability_mean(layers)
        sums = _optional(r, "layer_sums")
        if len(sums):
            out["layer_sums"] = sums
        if "baseline" in self.models:
            out["mfr"] = flip_rate_ratios(out["shift_summary"])
        return out

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        s = aggregates.get("shift_summary")
        if s is None or not len(s):
            return super().headline(summary, aggregates, config)
        labels = _model_labels(aggregates)
        protocols = aggregates.get("protocols") if "protocols" in aggregates else None
        how = ""
        if protocols is not None and len(protocols):
            p = protocols.iloc[0]
            how = f", {int(p.steps)} steps of 1 {p.unit} ({p.direction})"
        parts = []
        for model, g in s.groupby("model", sort=False):
            each = ", ".join(
                f"{pct_ci(r.p_top1_change, r.p_top1_change_low, r.p_top1_change_high)} "
                f"({r.protocol})"
                for r in g.itertuples(index=False)
            )
            parts.append(f"{labels.get(model, model)} {each}")
        text = (
            f"On {summary.get('num_images')} images{how}, the top-1 prediction changes between "
            "adjacent shifts for " + "; ".join(parts) + " (95% intervals)."
        )
        if "consistency" in s.columns and s["consistency"].notna().any():
            best = s.loc[s["consistency"].idxmax()]
            text += (
                f" Consistency under random 2-D shifts is highest for "
                f"{labels.get(best.model, best.model)} ({best.protocol}): "
                f"{pct_ci(best.consistency, best.consistency_low, best.consistency_high)}."
            )
        mfr = summary.get("mfr")
        if isinstance(mfr, float):
            text += f" Flip-rate ratio model / baseline (mean over protocols): {mfr:.3g}."
        return text

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        s = aggregates.get("shift_summary")
        if s is None or not len(s):
            return {}
        labels = _model_labels(aggregates)
        s = s.assign(model=[labels.get(m, m) for m in s["model"]])
        out: dict[str, pd.DataFrame] = {}
        for key, caption in (
            ("p_top1_change", "P(top-1 change) between adjacent shifts (model x protocol)"),
            ("consistency", "Consistency under random 2-D shifts (model x protocol)"),
            ("jagged", "Fraction of jagged images (model x protocol)"),
        ):
            if key in s.columns and s[key].notna().any():
                pivot = tidy_pivot(s, "model", "protocol", key)
                out[caption] = pivot
        columns = {
            "n_images": "images",
            "accuracy": "accuracy (fraction)",
            "p_top1_change": "P(top-1 change) (fraction)",
            "fp": "FP (fraction)",
            "jagged": "jagged (fraction)",
            "consistency": "consistency (fraction)",
            "mad": "MAD (probability)",
            "t5d": "T5D (rank distance)",
        }
        kept = [c for c in columns if c in s.columns]
        flat = s[["model", "protocol", *kept]].rename(columns=columns)
        out["Every measure (model and protocol)"] = flat.set_index(["model", "protocol"])
        ns = (
            aggregates.get("nonshiftability_mean") if "nonshiftability_mean" in aggregates else None
        )
        if ns is not None and len(ns):
            ns = ns.assign(
                column=[
                    f"{labels.get(m, m)} / {p}"
                    for m, p in zip(ns["model"], ns["protocol"], strict=True)
                ]
            )
            ns = ns.sort_values("layer_order", kind="stable")
            pivot = tidy_pivot(ns, ["layer_order", "layer"], "column", "mean")
            pivot.index = pd.Index(pivot.index.get_level_values("layer"), name="layer")
            pivot.columns.name = None
            out["Nonshiftability (frames whose map sum moves > 20%; layer x model / protocol)"] = (
                pivot
            )
        return out

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        s = aggregates["shift_summary"]
        keys = ("jagged", "p_top1_change", "fp", "consistency", "mad", "t5d", "accuracy")
        result: dict[str, Any] = {"num_images": int(len(ctx.indices["data"]))}
        for row in s.itertuples(index=False):
            result[f"{row.model}/{row.protocol}"] = {
                k: (None if pd.isna(getattr(row, k)) else round(float(getattr(row, k)), 6))
                for k in keys
            }
        if "mfr" in aggregates:
            m = aggregates["mfr"]
            mean = m[m["protocol"] == "mean"]
            if len(mean):
                fr = float(mean["fr"].iloc[0])
                result["mfr"] = None if np.isnan(fr) else fr
        return result


def _optional(results, name: str) -> pd.DataFrame:
    """A stored table, or an empty frame when no part wrote it (e.g. no layers probed)."""
    return results.read_table(name) if name in results.tables() else pd.DataFrame()


def _frame_groups(steps: int, batch: int, forward_batch: int) -> list[range]:
    """Frames forwarded together: as many as fit ``forward_batch`` (at least one)."""
    per = max(1, forward_batch // max(batch, 1))
    return [range(s, min(s + per, steps)) for s in range(0, steps, per)]


def _measure_model(
    forward: Callable[..., torch.Tensor],
    role: str,
    model: nn.Module,
    protocol: ShiftProtocol,
    batch: Batch,
    *,
    num_classes: int,
    layers: Sequence[str],
    forward_batch: int,
    pairs: int,
    offsets: int,
    seed: int,
    stream: int,
    map_threshold: float,
    change: float,
) -> dict[str, pd.DataFrame]:
    """All tables of one model on one protocol and batch."""
    x, y = batch.x, batch.y
    b, steps = x.shape[0], protocol.steps
    k = min(TOP_K, num_classes)
    index = batch.index.numpy().astype(np.int64)
    labels = y.cpu().numpy().astype(np.int64)
    seeds = batch.index  # noise sequences: an image's noise depends on its index only
    hooks = _LayerSums(model, layers) if layers else None
    preds, ptrue, top5 = [], [], []
    layer_data: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    try:
        for group in _frame_groups(steps, b, forward_batch):
            frames = torch.cat([protocol.frame(x, t, seed=seeds) for t in group])
            logits = check_logits(forward(frames, role), frames.shape[0], num_classes, "on frames")
            probs = torch.softmax(logits.float(), dim=1)
            top = probs.topk(k, dim=1).indices.view(len(group), b, k)
            preds.append(top[..., 0].cpu())
            top5.append(top.cpu())
            ptrue.append(probs.gather(1, y.repeat(len(group))[:, None]).view(len(group), b).cpu())
            if hooks is not None:
                for name, (s, p) in hooks.take().items():
                    c = s.shape[1]
                    if s.shape[0] != frames.shape[0]:
                        raise InvariscopeError(
                            f"layer {name} ran more than once in one forward pass, so it has "
                            "no single output; probe its parent block or a module that runs "
                            "once (--layers)"
                        )
                    layer_data.setdefault(name, []).append(
                        (s.view(len(group), b, c), p.view(len(group), b, c))
                    )
    finally:
        if hooks is not None:
            hooks.close()
    pred = torch.cat(preds).T.numpy()  # [B, T]
    p_true = torch.cat(ptrue).T.numpy().astype(np.float64)
    top = torch.cat(top5).permute(1, 0, 2).numpy()  # [B, T, k]
    positions = np.asarray(protocol.positions(x.shape[-2], x.shape[-1]), dtype=np.float64)
    common = {"model": role, "protocol": protocol.name}

    frame_table = pd.DataFrame(
        {
            **common,
            "index": np.repeat(index, steps),
            "label": np.repeat(labels, steps),
            "frame": np.tile(np.arange(steps, dtype=np.int64), b),
            "position": np.tile(positions, b),
            "pred": pred.reshape(-1).astype(np.int64),
            "p_true": p_true.reshape(-1),
            "top5_true": (top == labels[:, None, None]).any(axis=2).reshape(-1),
            "correct": (pred == labels[:, None]).reshape(-1),
        }
    )
    seq = sequence_measures(pred, p_true, top, labels, protocol.reference)
    if num_classes <= TOP_K:  # the top-5 holds every class: the top-5 measures are undefined
        seq[list(TOP5_MEASURES)] = np.nan
    seq.insert(0, "label", labels)
    seq.insert(0, "index", index)
    seq.insert(0, "protocol", protocol.name)
    seq.insert(0, "model", role)

    tables = {
        "frames": frame_table,
        "sequences": seq,
        "consistency": _consistency_pairs(
            forward,
            role,
            protocol,
            x,
            pred,
            index,
            labels,
            pairs,
            offsets,
            seed,
            stream,
            num_classes,
        ),
    }
    if layer_data:
        tables.update(
            _layer_tables(
                layer_data,
                layers,
                role,
                protocol.name,
                index,
                labels,
                positions,
                batch.number,
                map_threshold,
                change,
            )
        )
    return tables


def _offset_step(protocol: ShiftProtocol) -> float:
    """The grid of 2-D offsets: whole pixels, or the subpixel protocol's step."""
    if protocol.name == "subpixel":
        return float(protocol.step if protocol.step is not None else 0.25)
    return 1.0


def _consistency_pairs(
    forward, role, protocol, x, pred, index, labels, pairs, offsets, seed, stream, num_classes
) -> pd.DataFrame:
    """Zhang's consistency pairs: random 2-D offsets in ``[0, offsets)`` per axis (shift
    protocols), or random pairs of frames of the sequence (the others)."""
    b = x.shape[0]
    cols = ["a_dy", "a_dx", "b_dy", "b_dx"]
    if pairs == 0:
        return pd.DataFrame()
    u = uniform_per_image(seed, index, 4 * pairs, stream=1000 + stream).reshape(b, pairs, 4)
    if protocol.supports_2d:
        step = _offset_step(protocol)
        grid = np.floor(u * (offsets / step)) * step  # multiples of the step in [0, offsets)
        off = torch.as_tensor(grid, dtype=x.dtype)
        images = []
        for j in range(pairs):
            for side in (0, 1):
                dy, dx = off[:, j, 2 * side].to(x.device), off[:, j, 2 * side + 1].to(x.device)
                images.append(protocol.at(x, dy, dx))
        logits = forward(torch.cat(images), role)
        check_logits(logits, 2 * pairs * b, num_classes, "on consistency pairs")
        p = logits.argmax(dim=1).view(pairs, 2, b).cpu().numpy()
        pred_a, pred_b = p[:, 0].T, p[:, 1].T  # [B, pairs]
    else:
        steps = pred.shape[1]
        t = np.floor(u[..., :2] * steps).astype(np.int64)  # frame numbers
        rows = np.arange(b)[:, None]
        pred_a, pred_b = pred[rows, t[..., 0]], pred[rows, t[..., 1]]
        grid = np.concatenate(
            [t[..., :1], np.zeros_like(t[..., :1]), t[..., 1:], 0 * t[..., 1:]], 2
        )
        grid = grid.astype(np.float64)
    table = pd.DataFrame(
        {
            "model": role,
            "protocol": protocol.name,
            "index": np.repeat(index, pairs),
            "label": np.repeat(labels, pairs),
            "pair": np.tile(np.arange(pairs, dtype=np.int64), b),
            **{c: grid[..., i].reshape(-1).astype(np.float64) for i, c in enumerate(cols)},
            "pred_a": pred_a.reshape(-1).astype(np.int64),
            "pred_b": pred_b.reshape(-1).astype(np.int64),
        }
    )
    table["same"] = table["pred_a"] == table["pred_b"]
    return table


def _layer_tables(
    layer_data,
    layers,
    role,
    protocol,
    index,
    labels,
    positions,
    batch_number,
    map_threshold,
    change,
) -> dict[str, pd.DataFrame]:
    rows, sums_rows = [], []
    order = {n: i for i, n in enumerate(layers)}
    keep_sums = batch_number == 0
    for name, chunks in layer_data.items():
        s = torch.cat([c[0] for c in chunks]).numpy()  # [T, B, C]
        p = torch.cat([c[1] for c in chunks]).numpy()
        for i in range(s.shape[1]):
            value, n_maps = nonshiftability(
                s[:, i], p[:, i], map_threshold=map_threshold, change=change
            )
            rows.append((index[i], labels[i], name, order[name], n_maps, value))
        if keep_sums:
            n = min(LAYER_SUM_IMAGES, s.shape[1])
            total = s[:, :n].sum(axis=2)  # [T, n]
            for i in range(n):
                for t in range(s.shape[0]):
                    sums_rows.append(
                        (index[i], name, order[name], t, positions[t], float(total[t, i]))
                    )
    layers_table = pd.DataFrame(
        rows, columns=["index", "label", "layer", "layer_order", "n_maps", "nonshiftability"]
    )
    layers_table.insert(0, "protocol", protocol)
    layers_table.insert(0, "model", role)
    layers_table = layers_table.astype(
        {"index": np.int64, "label": np.int64, "layer_order": np.int64, "n_maps": np.int64}
    )
    out = {"layers": layers_table}
    if sums_rows:
        sums = pd.DataFrame(
            sums_rows, columns=["index", "layer", "layer_order", "frame", "position", "total"]
        )
        sums.insert(0, "protocol", protocol)
        sums.insert(0, "model", role)
        out["layer_sums"] = sums.astype(
            {"index": np.int64, "layer_order": np.int64, "frame": np.int64}
        )
    return out


# ------------------------------------------------------------------------- aggregates


def _model_labels(aggregates: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    """``{"model": "blurpool (fine-tuned)", ...}`` from the ``models`` table, if stored."""
    models = aggregates.get("models") if "models" in aggregates else None
    if models is None or not {"model", "label"} <= set(models.columns):
        return {}
    return {str(m): str(v) for m, v in zip(models["model"], models["label"], strict=True)}


def shift_summary(sequences: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, protocol) with 95% intervals.

    Intervals: Wilson over images (jagged), over frame pairs (P(top-1 change), FP,
    consistency) and over frames (accuracy); mean +- 1.96 standard errors over images
    (MAD, T5D). Frame pairs of one image are not independent, so the pair intervals are
    on the narrow side.
    """
    rows = []
    for (model, protocol), g in sequences.groupby(["model", "protocol"], sort=False):
        n = len(g)
        f = int(g["n_frames"].iloc[0])
        row: dict[str, Any] = {"model": model, "protocol": protocol, "n_images": n}
        k = g["accuracy"].sum() * f
        row["accuracy"] = k / (n * f)
        row["accuracy_low"], row["accuracy_high"] = map(float, wilson_interval(k, n * f))
        if g["jagged"].isna().any():  # top-5 measures undefined (at most 5 classes)
            row["jagged"] = row["jagged_low"] = row["jagged_high"] = float("nan")
        else:
            k = int(g["jagged"].sum())
            row["jagged"] = k / n
            row["jagged_low"], row["jagged_high"] = map(float, wilson_interval(k, n))
        k = int(g["changes"].sum())
        row["p_top1_change"] = k / (n * (f - 1))
        lo, hi = wilson_interval(k, n * (f - 1))
        row["p_top1_change_low"], row["p_top1_change_high"] = float(lo), float(hi)
        k = float(g["fp"].sum()) * (f - 1)
        row["fp"] = k / (n * (f - 1))
        row["fp_low"], row["fp_high"] = map(float, wilson_interval(k, n * (f - 1)))
        for col in ("t5d", "mad"):
            row[col], row[f"{col}_low"], row[f"{col}_high"] = mean_interval(g[col])
        sel = (
            pairs[(pairs["model"] == model) & (pairs["protocol"] == protocol)]
            if len(pairs)
            else pairs
        )
        if len(sel):
            k = int(sel["same"].sum())
            row["consistency"] = k / len(sel)
            lo, hi = wilson_interval(k, len(sel))
            row["consistency_low"], row["consistency_high"] = float(lo), float(hi)
        else:
            row["consistency"] = row["consistency_low"] = row["consistency_high"] = float("nan")
        row["mean_jaggedness"] = float(g["jaggedness"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def pcorrect_rows(frames: pd.DataFrame) -> pd.DataFrame:
    """The P(correct) matrix of Azulay & Weiss's figure 2 as a tidy table: ``row`` numbers
    the images of each (model, protocol) by their sum of ``p_true`` over frames,
    descending (ties by dataset index)."""
    out = frames.sort_values(["model", "protocol", "index", "frame"]).reset_index(drop=True)
    totals = out.groupby(["model", "protocol", "index"], sort=False)["p_true"].sum().reset_index()
    totals = totals.sort_values(
        ["model", "protocol", "p_true", "index"], ascending=[True, True, False, True]
    )
    totals["row"] = totals.groupby(["model", "protocol"], sort=False).cumcount().astype(np.int64)
    return out.merge(
        totals[["model", "protocol", "index", "row"]], on=["model", "protocol", "index"]
    )


def nonshiftability_mean(layers: pd.DataFrame) -> pd.DataFrame:
    """Mean nonshiftability per (model, protocol, layer), mean +- 1.96 SE over images."""
    rows = []
    keys = ["model", "protocol", "layer_order", "layer"]
    for key, g in layers.groupby(keys, sort=True):
        m, lo, hi = mean_interval(g["nonshiftability"])
        rows.append(
            dict(zip(keys, key, strict=True))
            | {
                "mean": m,
                "low": lo,
                "high": hi,
                "n_images": int(g["nonshiftability"].notna().sum()),
            }
        )
    return pd.DataFrame(rows)


def flip_rate_ratios(summary: pd.DataFrame) -> pd.DataFrame:
    """FP of the model over the baseline's, per protocol, and their mean (ImageNet-P's mFR
    with the baseline in AlexNet's place)."""
    rows = []
    model = summary[summary["model"] == "model"].set_index("protocol")
    base = summary[summary["model"] == "baseline"].set_index("protocol")
    for protocol in model.index:
        fp, bfp = float(model.loc[protocol, "fp"]), float(base.loc[protocol, "fp"])
        fr = fp / bfp if bfp > 0 else float("nan")
        if not bfp > 0:
            log.warning(
                "shift: the flip rate FR on %s is undefined (the baseline never flips); it is NaN",
                protocol,
            )
        rows.append(
            {"protocol": protocol, "model": "model", "fp": fp, "baseline_fp": bfp, "fr": fr}
        )
    table = pd.DataFrame(rows)
    if len(table):
        mean = {
            "protocol": "mean",
            "model": "model",
            "fp": table["fp"].mean(),
            "baseline_fp": table["baseline_fp"].mean(),
            "fr": table["fr"].mean(),
        }
        table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    return table


# ------------------------------------------------------------------------- Python API


@dataclass
class ShiftResult:
    """What :func:`shift_stability` returns: the aggregate tables and the run directory."""

    summary: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    run_dir: Path | None = None


@renamed_arguments(steps="frames")
def shift_stability(
    model: nn.Module,
    dataset: Dataset,
    protocols: str | Sequence[str] = "embed",
    *,
    baseline: nn.Module | None = None,
    frames: int | None = None,
    direction: str = "vertical",
    factor: float = 0.5,
    fill: str = "inpaint",
    step: float | None = None,
    layers: Sequence[str] | None = None,
    consistency_pairs: int = 5,
    consistency_range: int | None = None,
    map_threshold: float = 0.1,
    images: int | Sequence[int] | None = None,
    classes: Sequence[str | int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    labels: Mapping[str, str] | None = None,
    **engine: Any,
) -> ShiftResult:
    """Small-shift stability of ``model`` (and ``baseline``) on ``dataset``, in one call.

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    Runs :class:`ShiftAnalysis` on the engine (resumable with ``out``, distributable
    under ``torchrun``). ``labels`` names the models in figures
    (``{"model": "blurpool", "baseline": "max-pool"}``).

    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> r = shift_stability(create_model("small-vgg", in_channels=3, num_classes=4, width=8),
    ...                     create_dataset("shapes"), "circular", images=8, frames=4,
    ...                     layers=(), consistency_pairs=1, progress=False)
    >>> sorted(r.summary.columns)[:3]
    ['accuracy', 'accuracy_high', 'accuracy_low']
    """
    analysis = ShiftAnalysis(
        protocols,
        protocol_options={
            "steps": frames,
            "direction": direction,
            "factor": factor,
            "fill": fill,
            "step": step,
        },
        baseline=baseline is not None,
        layers=layers,
        consistency_pairs=consistency_pairs,
        consistency_range=consistency_range,
        map_threshold=map_threshold,
    )
    models = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    options = {f"{k}_label": v for k, v in (labels or {}).items()}
    result = run_analysis(
        analysis,
        models,
        {"data": dataset},
        images=images,
        classes=classes,
        batch_size=batch_size,
        seed=seed,
        device=device,
        out=out,
        overwrite=overwrite,
        figures=figures,
        options={**options, **engine.pop("options", {})},
        **engine,
    )
    return ShiftResult(result.aggregates["shift_summary"], dict(result.aggregates), result.run_dir)


register_analysis(
    AnalysisEntry(
        name="shift",
        analysis=ShiftAnalysis,
        title="Small-shift stability",
        paper=(
            "Azulay & Weiss 2019, Why do deep convolutional networks generalize so poorly to "
            "small image transformations?; Zhang 2019, Making convolutional networks "
            "shift-invariant again; Hendrycks & Dietterich 2019 (ImageNet-P flip rates)"
        ),
        about=(
            "Each image is moved one pixel at a time (embedded in a canvas, cropped, rolled, "
            "rescaled or perturbed in small steps) and every frame is classified: an image is "
            "jagged when its true class enters or leaves the top-5 between adjacent frames, "
            "and consistency is the share of random shift pairs with the same top-1. "
            "Nonshiftability counts, per layer, the frames at which a feature map's global "
            "sum departs by more than 20% from its mean: zero for a representation that "
            "obeys the sampling theorem (intervals: 95%, Wilson or mean +- 1.96 SE)."
        ),
        command="shift",
        report_tables=("shift_summary", "mfr", "nonshiftability_mean"),
        figures="invariscope.plots.shift:render_shift_run",
        demo="invariscope.demo:shift_stage",
        conformance=(
            "--data",
            "digits",
            "--protocol",
            "embed,circular",
            "--frames",
            "5",
            "--consistency-pairs",
            "2",
            "--images",
            "24",
            "--batch-size",
            "8",
        ),
        figure_order=("pcorrect", "stability", "nonshiftability", "layer_sums", "flip_rate"),
        bad_inputs=(
            (("--data", "digits", "--protocol", "wobble"), "unknown shift protocol"),
            (("--data", "digits", "--protocol", "embed", "--frames", "30"), "frames"),
            (("--data", "digits", "--protocol", "sequence:hflip"), "hflip"),
            (("--data", "digits", "--consistency-pairs", "-1"), "consistency pairs"),
        ),
    )
)
