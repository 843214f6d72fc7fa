"""Transformation-sensitivity screening: magnitude sweeps of a classifier (Bunne et al. 2018).

Strategy 1 of Bunne et al. 2018 ("Studying invariances of trained convolutional neural
networks"): apply each transformation at increasing magnitude to a set of test images,
record the predictions, and summarise them as accuracy curves, class-wise mean softmax
curves and thresholds beyond which the network stops recognising a class. On top of the
paper: per-image breaking magnitudes, two-parameter sweeps (heatmaps, as the paper's
figure 2d) and the worst-case spatial search of Engstrom et al. 2019
(:mod:`invariscope.measure.worst_case`).

Tables (tidy pandas DataFrames; see :mod:`invariscope.measure.aggregate` for the measures):

- ``records`` (per image, transformation, magnitude): ``transform, magnitude, index,
  label, pred, p_true, correct, top1_class, top1_prob, ..., top5_class, top5_prob``
  (``index`` is the dataset index; ``p_true`` the softmax probability of the true class);
- ``softmax_sums`` (per part, class and magnitude): ``transform, magnitude, label,
  count, softmax_sum`` (a length-K array: the sum of the softmax vectors);
- ``breaking`` (per image): ``transform, index, label, pred_identity, break_low, break_high``;
- aggregates ``accuracy``, ``class_accuracy``, ``softmax_curves`` (top 3 + "others"),
  ``thresholds``, ``breaking_summary``; with pairs ``records_2d``, ``accuracy_2d``,
  ``class_accuracy_2d``; with the worst case ``worst_case``, ``worst_case_summary``;
  and ``classes`` (``label, name``), ``transforms`` (``transform, identity, unit,
  n_magnitudes``) for the figures.

Convention:
    Images are ``[B, C, H, W]`` in ``[0, 1]`` and every transformation acts on them
    before the model (which normalises). Magnitudes are in the transformation's own unit
    (``invariscope transforms`` lists them); the identity magnitude is always swept.
    Gaussian noise is seeded per image by the dataset index (shifted by ``seed``, see
    :data:`NOISE_SEED_MULTIPLIER`), with the same noise image at every magnitude. Geometric warps fill with zeros.

Execution: :class:`SweepAnalysis` is a registered analysis of the engine
(:mod:`invariscope.engine`), which reads images in batches of ``batch_size`` (a *part*
per transformation and batch, the unit of resumption and of distribution), resumes,
distributes under ``torchrun`` and draws the figures. Several magnitudes of a batch are
stacked into one forward pass of at most ``forward_batch`` images (timed on the real
model by default), everything runs under ``torch.inference_mode`` on the model's
device, and only the top-5 classes and per-class softmax sums leave the device. The
aggregates are computed at the end by streaming over the parts.

Example:
    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> result = sweep(create_model("simple-cnn"), create_dataset("digits", "test"),
    ...                ["rotation"], {"rotation": (-90, 90, 45)}, images=20)
    >>> result.accuracy["magnitude"].tolist()
    [-90.0, -45.0, 0.0, 45.0, 90.0]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from invariscope.engine import (
    Analysis,
    AnalysisEntry,
    Batch,
    Part,
    RunResult,
    part_id,
    register_analysis,
)
from invariscope.engine import run as run_analysis
from invariscope.engine.analysis import default_headline
from invariscope.engine.runner import DEFAULT_MAX_WORK
from invariscope.errors import InvariscopeError
from invariscope.measure import aggregate as agg
from invariscope.measure._present import ci, with_unit
from invariscope.measure._present import pivot as tidy_pivot
from invariscope.measure._sweep_core import concat_columns, predict_chunk, prediction_columns
from invariscope.measure.worst_case import (
    SpatialBudget,
    budget_text,
    worst_case_batch,
    worst_case_headline,
    worst_case_pivots,
)

log = logging.getLogger(__name__)

__all__ = ["SweepAnalysis", "SweepResult", "resolve_magnitudes", "sweep", "sweep_2d"]

#: Noise seeds are ``(dataset index + seed * NOISE_SEED_MULTIPLIER) mod 2**32``: the dataset
#: indices themselves for ``seed=0``. (torch's CPU generator uses only the low 32 bits of a
#: seed, so seeds that differ above bit 32 would give the same noise.)
NOISE_SEED_MULTIPLIER = 0x9E3779B1

#: Per-image tables (stored as parts) and aggregate tables (stored at the end).
PART_TABLES = ("records", "softmax_sums", "breaking", "records_2d", "worst_case")
AGGREGATE_TABLES = (
    "accuracy",
    "class_accuracy",
    "softmax_curves",
    "thresholds",
    "breaking_summary",
    "accuracy_2d",
    "class_accuracy_2d",
    "worst_case_summary",
    "classes",
    "transforms",
)


class SweepResult(RunResult):
    """What :func:`sweep` returns (a :class:`~invariscope.engine.RunResult`).

    Attributes:
        aggregates: ``{name: DataFrame}`` for the names in :data:`AGGREGATE_TABLES` that
            the sweep produced (e.g. no ``accuracy_2d`` without pairs).
        run_dir: the run directory, or None for an in-memory sweep.
        summary: a few headline numbers (also stored in the run's manifest).
        figures: paths of the figures written (empty when none were drawn).
        rank, world_size: this process's place in a distributed sweep (0 and 1 otherwise).
        aggregated: False on ranks other than 0 of a distributed sweep: they only write
            their share of the parts, and ``aggregates``, ``summary`` and ``figures``
            are empty (rank 0 aggregates; read its run directory with
            :meth:`invariscope.runs.RunStore.open`).
        parts_written: ids of the parts this process computed (not those it resumed).

    Per-image tables (``records``, ``breaking``, ...) are read on demand:
    ``result.table("records")`` or ``result.records``.
    """


# ------------------------------------------------------------------------ magnitudes


def _transform_names(transforms: str | Sequence[str] | None) -> list[str]:
    if transforms is None:
        return []
    if isinstance(transforms, str):
        transforms = [t for t in transforms.split(",")]
    names = [str(t).strip() for t in transforms]
    if any(not n for n in names):
        raise InvariscopeError(
            "empty transformation name in --transforms; separate names by commas"
        )
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvariscopeError(f"transformation '{dup}' is listed twice; list each once")
    return names


def resolve_magnitudes(name: str, spec: Any = None) -> np.ndarray:
    """Sorted float64 magnitudes of ``name`` for a sweep, always including the identity.

    Args:
        spec: ``None`` (the registry's default range), a range ``(start, stop[, step])``
            tuple or ``"start:stop[:step]"`` string, or explicit values (list, array,
            tensor). Every value is checked against the transformation's domain.
    """
    from invariscope.transforms import get_transform

    tspec = get_transform(name)
    if spec is None or isinstance(spec, str | tuple):
        values = tspec.magnitudes(spec).numpy()
    else:
        values = torch.as_tensor(np.asarray(spec, dtype=np.float64).reshape(-1))
        tspec.check(values)
        values = values.numpy()
    identity = float(tspec.identity)
    values = np.unique(np.concatenate([values.astype(np.float64), [identity]]))
    if len(values) < 2:
        raise InvariscopeError(
            f"{name}: the sweep has only the identity magnitude {identity:g}; give a range, "
            f"e.g. --range {name}={tspec._example_range()}"
        )
    return values


def _magnitude_lookup(magnitudes: Mapping[str, Any] | None, name: str) -> Any:
    if magnitudes is None:
        return None
    return magnitudes.get(name)


# ------------------------------------------------------------------------- part kernels


def _noise_seeds(idx: torch.Tensor, seed: int) -> torch.Tensor:
    offset = (int(seed) * NOISE_SEED_MULTIPLIER) % (1 << 32)
    return (idx.to(torch.int64) + offset) % (1 << 32)


def _apply(
    name: str, images: torch.Tensor, mags: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    from invariscope.transforms import get_transform

    spec = get_transform(name)
    options = {"seed": seeds} if "seed" in spec.options else {}
    return spec(images, mags.to(images.dtype), **options)


def _apply_pair(
    a: str, b: str, images: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    """``b`` after ``a``; two geometric steps are fused into one warp by ``compose``."""
    from invariscope.transforms import compose, get_transform

    if get_transform(a).kind != "photometric" and get_transform(b).kind != "photometric":
        return compose(images, [(a, ma.to(images.dtype)), (b, mb.to(images.dtype))])
    return _apply(b, _apply(a, images, ma, seeds), mb, seeds)


def _chunks(n_mags: int, batch: int, forward_batch: int) -> list[slice]:
    per = max(1, forward_batch // max(batch, 1))
    return [slice(s, min(s + per, n_mags)) for s in range(0, n_mags, per)]


def _sweep_part(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    name: str,
    mags: np.ndarray,
    *,
    num_classes: int,
    top_k: int,
    forward_batch: int,
    seed: int,
    identity: float,
) -> dict[str, pd.DataFrame]:
    """Records, softmax sums and breaking magnitudes of one (transformation, batch)."""
    dev = x.device
    b = x.shape[0]
    mags_t = torch.as_tensor(mags, dtype=torch.float64)
    seeds = _noise_seeds(idx, seed).to(dev)
    uniq, inverse = torch.unique(y, return_inverse=True)
    n_uniq = len(uniq)
    sums = torch.zeros(len(mags) * n_uniq, num_classes, dtype=torch.float64, device=dev)
    # per (magnitude, class): number correct and summed p(true class)
    tallies = torch.zeros(len(mags) * n_uniq, 2, dtype=torch.float64, device=dev)
    columns = []
    idx_np = idx.cpu().numpy().astype(np.int64)
    y_np = y.cpu().numpy().astype(np.int64)
    for sl in _chunks(len(mags), b, forward_batch):
        c = sl.stop - sl.start
        m = mags_t[sl].repeat_interleave(b).to(dev)
        images = _apply(name, x.repeat(c, 1, 1, 1), m, seeds.repeat(c))
        labels = y.repeat(c)
        where = f"{name} at magnitude {mags[sl.start]:g}" + (
            f"..{mags[sl.stop - 1]:g}" if c > 1 else ""
        )
        pred, probs, correct, p_true = predict_chunk(
            forward, images, labels, num_classes, top_k, where
        )
        mag_pos = torch.arange(sl.start, sl.stop, device=dev).repeat_interleave(b)
        cell = mag_pos * n_uniq + inverse.repeat(c)
        sums.index_add_(0, cell, probs.double())
        tallies.index_add_(0, cell, torch.stack([correct.double(), p_true.double()], dim=1))
        cols = {
            "magnitude": np.repeat(mags[sl], b),
            "index": np.tile(idx_np, c),
            "label": np.tile(y_np, c),
        }
        cols.update(prediction_columns(pred))
        columns.append(cols)
    records = concat_columns(columns)
    records.insert(0, "transform", name)
    counts = torch.bincount(inverse, minlength=n_uniq).cpu().numpy()
    sums_np = sums.cpu().numpy()
    tallies_np = tallies.cpu().numpy()
    uniq_np = uniq.cpu().numpy().astype(np.int64)
    softmax_sums = pd.DataFrame(
        {
            "transform": name,
            "magnitude": np.repeat(mags, n_uniq),
            "label": np.tile(uniq_np, len(mags)),
            "count": np.tile(counts, len(mags)).astype(np.int64),
            "softmax_sum": list(sums_np),
            "n_correct": np.rint(tallies_np[:, 0]).astype(np.int64),
            "sum_p_true": tallies_np[:, 1],
        }
    )
    # records are magnitude-major: [M * B] -> [B, M]
    pred = records["pred"].to_numpy().reshape(len(mags), b).T
    i0 = int(np.flatnonzero(np.isclose(mags, identity, rtol=0.0, atol=1e-9))[0])
    low, high = agg.breaking_from_predictions(pred, mags, i0)
    breaking = pd.DataFrame(
        {
            "transform": name,
            "index": idx_np,
            "label": y_np,
            "pred_identity": pred[:, i0],
            "break_low": low,
            "break_high": high,
        }
    )
    return {"records": records, "softmax_sums": softmax_sums, "breaking": breaking}


def _pair_part(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    pair: tuple[str, np.ndarray, str, np.ndarray],
    *,
    num_classes: int,
    top_k: int,
    forward_batch: int,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """Records of one (pair of transformations, batch) over the full magnitude grid."""
    a, mags_a, b_name, mags_b = pair
    dev = x.device
    b = x.shape[0]
    grid_a = np.repeat(mags_a, len(mags_b))
    grid_b = np.tile(mags_b, len(mags_a))
    seeds = _noise_seeds(idx, seed).to(dev)
    idx_np = idx.cpu().numpy().astype(np.int64)
    y_np = y.cpu().numpy().astype(np.int64)
    columns = []
    for sl in _chunks(len(grid_a), b, forward_batch):
        c = sl.stop - sl.start
        ma = torch.as_tensor(grid_a[sl]).repeat_interleave(b).to(dev)
        mb = torch.as_tensor(grid_b[sl]).repeat_interleave(b).to(dev)
        images = _apply_pair(a, b_name, x.repeat(c, 1, 1, 1), ma, mb, seeds.repeat(c))
        where = f"{a} x {b_name} at ({grid_a[sl.start]:g}, {grid_b[sl.start]:g})"
        pred, _, _, _ = predict_chunk(forward, images, y.repeat(c), num_classes, top_k, where)
        cols = {
            "magnitude_a": np.repeat(grid_a[sl], b),
            "magnitude_b": np.repeat(grid_b[sl], b),
            "index": np.tile(idx_np, c),
            "label": np.tile(y_np, c),
        }
        cols.update(prediction_columns(pred))
        columns.append(cols)
    records = concat_columns(columns)
    records.insert(0, "transform_a", a)
    records.insert(2, "transform_b", b_name)
    return {"records_2d": records}


def _pairs(pairs: Iterable[Any] | None) -> list[tuple[str, str]]:
    out = []
    for pair in pairs or ():
        items = pair.split(",") if isinstance(pair, str) else list(pair)
        items = [str(p).strip() for p in items]
        if len(items) != 2 or not all(items):
            raise InvariscopeError(
                f"a pair must name two transformations, e.g. translate_x,translate_y; got {pair!r}"
            )
        if items[0] == items[1]:
            raise InvariscopeError(f"pair {pair!r} names the same transformation twice; pick two")
        out.append((items[0], items[1]))
    return out


def _budget(worst_case: SpatialBudget | bool | Mapping[str, Any] | None) -> SpatialBudget | None:
    if worst_case is None or worst_case is False:
        return None
    if worst_case is True:
        return SpatialBudget()
    if isinstance(worst_case, Mapping):
        return SpatialBudget(**worst_case)
    if isinstance(worst_case, SpatialBudget):
        return worst_case
    raise InvariscopeError(
        f"worst_case must be True, a SpatialBudget or a dict, got {worst_case!r}"
    )


# ------------------------------------------------------------------------ the analysis


@dataclass
class _Spec:
    """What is swept: resolved from the arguments before any image is read."""

    transforms: dict[str, np.ndarray]
    identities: dict[str, float]
    units: dict[str, str]
    pairs: list[tuple[str, np.ndarray, str, np.ndarray]]
    budget: SpatialBudget | None


def _spec(transforms, magnitudes, pairs, worst_case) -> _Spec:
    from invariscope.transforms import get_transform

    names = _transform_names(transforms)
    pair_names = _pairs(pairs)
    budget = _budget(worst_case)
    if not names and not pair_names and budget is None:
        raise InvariscopeError(
            "nothing to sweep: give --transforms (e.g. rotation,translate_x), --pair or --worst-case"
        )
    if magnitudes is not None:
        if not isinstance(magnitudes, Mapping):
            if len(names) != 1:
                raise InvariscopeError(
                    "magnitudes must map transformation names to ranges when sweeping several "
                    "transformations, e.g. {'rotation': (-180, 180, 5)}"
                )
            magnitudes = {names[0]: magnitudes}
        wanted = set(names) | {n for p in pair_names for n in p}
        for key in magnitudes:
            if key not in wanted:
                get_transform(key)  # unknown names get the usual error
                raise InvariscopeError(
                    f"a range is given for '{key}', which is not swept; add it to --transforms "
                    "or drop its --range"
                )
    mags = {n: resolve_magnitudes(n, _magnitude_lookup(magnitudes, n)) for n in names}
    pair_plan = [
        (
            a,
            resolve_magnitudes(a, _magnitude_lookup(magnitudes, a)),
            b,
            resolve_magnitudes(b, _magnitude_lookup(magnitudes, b)),
        )
        for a, b in pair_names
    ]
    all_names = list(dict.fromkeys([*names, *(n for p in pair_names for n in p)]))
    identities = {n: float(get_transform(n).identity) for n in all_names}
    units = {n: str(get_transform(n).unit) for n in all_names}
    return _Spec(mags, identities, units, pair_plan, budget)


class SweepAnalysis(Analysis):
    """Magnitude sweeps, 2-D grids and the worst-case search as one engine analysis.

    Parts: one per (transformation, batch) (``sweep-<name>-<batch>``), per (pair,
    batch) (``grid-<a>+<b>-<batch>``) and, with a budget, per batch (``worst-<batch>``).
    Arguments as in :func:`sweep`.
    """

    name = "sweep"
    part_tables = PART_TABLES
    aggregate_tables = AGGREGATE_TABLES

    def __init__(
        self,
        transforms: str | Sequence[str] | None = ("rotation",),
        magnitudes: Mapping[str, Any] | Any | None = None,
        *,
        pairs: Iterable[Any] | None = None,
        worst_case: SpatialBudget | bool | Mapping[str, Any] | None = None,
        top_k: int = 5,
        threshold_fraction: float = 0.5,
    ) -> None:
        if not 0.0 < threshold_fraction <= 1.0:
            raise InvariscopeError(f"--threshold must be in (0, 1], got {threshold_fraction}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvariscopeError(f"top_k must be at least 1, got {top_k}")
        self.spec = _spec(transforms, magnitudes, pairs, worst_case)
        self.top_k = top_k
        self.threshold_fraction = float(threshold_fraction)

    def config(self) -> dict[str, Any]:
        s = self.spec
        return {
            "transforms": {n: m.tolist() for n, m in s.transforms.items()},
            "pairs": [[a, ma.tolist(), b, mb.tolist()] for a, ma, b, mb in s.pairs],
            "worst_case": None if s.budget is None else s.budget.to_dict(),
            "top_k": int(self.top_k),
        }

    def max_forward_batch(self, ctx) -> int:
        s = self.spec
        batch = max(len(b) for b in ctx.batches["data"])
        most = [len(m) for m in s.transforms.values()]
        most += [len(ma) * len(mb) for _, ma, _, mb in s.pairs]
        if s.budget is not None:
            most.append(1 + s.budget.k + s.budget.points)
        return batch * max(most)

    def work(self, ctx) -> int:
        s = self.spec
        per_image = sum(len(m) for m in s.transforms.values())
        per_image += sum(len(ma) * len(mb) for _, ma, _, mb in s.pairs)
        if s.budget is not None:
            per_image += 1 + s.budget.k + s.budget.points
        return len(ctx.indices["data"]) * per_image

    def plan(self, ctx) -> list[Part]:
        parts = []
        for b in range(len(ctx.batches["data"])):
            for n in self.spec.transforms:
                parts.append(Part(part_id("sweep", n, b), batch=b, key=("sweep", n)))
            for k, (a, _, bb, _) in enumerate(self.spec.pairs):
                parts.append(Part(part_id("grid", f"{a}+{bb}", b), batch=b, key=("pair", k)))
            if self.spec.budget is not None:
                parts.append(Part(part_id("worst", b), batch=b, key=("worst", None)))
        return parts

    def compute(self, part: Part, ctx, batch: Batch) -> dict[str, pd.DataFrame]:
        kind, what = part.key
        common = dict(num_classes=ctx.num_classes, forward_batch=ctx.forward_batch, seed=ctx.seed)
        if kind == "sweep":
            return _sweep_part(
                ctx.forward,
                batch.x,
                batch.y,
                batch.index,
                what,
                self.spec.transforms[what],
                top_k=self.top_k,
                identity=self.spec.identities[what],
                **common,
            )
        if kind == "pair":
            return _pair_part(
                ctx.forward,
                batch.x,
                batch.y,
                batch.index,
                self.spec.pairs[what],
                top_k=self.top_k,
                **common,
            )
        return {
            "worst_case": worst_case_batch(
                ctx.forward, batch.x, batch.y, batch.index, self.spec.budget, **common
            )
        }

    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        return _aggregate(ctx.results, self.spec, ctx.classes["data"], self.threshold_fraction)

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        return _summary(aggregates, len(ctx.indices["data"]), self.threshold_fraction)

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        return _headline(summary, aggregates, config)

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        return _pivots(aggregates)

    @classmethod
    def section_title(cls, title: str, config) -> str:
        kinds = []
        transforms = config.get("transforms")
        if isinstance(transforms, Mapping) and transforms:
            kinds.append(", ".join(str(t) for t in transforms))
        for pair in config.get("pairs") or ():
            if isinstance(pair, Sequence) and len(pair) == 4:
                kinds.append(f"{pair[0]} x {pair[2]} grid")
        if config.get("worst_case"):
            budget = budget_text(config)
            kinds.append(
                f"worst case ({', '.join(budget.split(', ')[:2])})" if budget else "worst case"
            )
        return f"{title}: {'; '.join(kinds)}" if kinds else title


register_analysis(
    AnalysisEntry(
        name="sweep",
        analysis=SweepAnalysis,
        title="Transformation sweeps",
        paper=(
            "Bunne et al. 2018, Studying invariances of trained convolutional neural networks; "
            "worst case: Engstrom et al. 2019, Exploring the landscape of spatial robustness"
        ),
        about=(
            "Each transformation is applied at increasing magnitude to the test images and "
            "every prediction is recorded: accuracy and class-wise mean softmax curves show "
            "where the network stops recognising each class. A threshold is the first "
            "magnitude on each side of the identity where class accuracy falls below a "
            "fraction of its identity accuracy (intervals: 95% Wilson, over images)."
        ),
        command="sweep",
        report_tables=(
            "thresholds",
            "accuracy",
            "breaking_summary",
            "accuracy_2d",
            "worst_case_summary",
        ),
        figures="invariscope.plots.sweep:render_sweep_run",
        demo="invariscope.demo:sweep_stage",
        conformance=(
            "--data",
            "digits",
            "--transforms",
            "rotation,gaussian_noise",
            "--range",
            "rotation=-90:90:45",
            "--range",
            "gaussian_noise=0:0.6:0.3",
            "--pair",
            "translate_x,translate_y",
            "--range",
            "translate_x=-0.1:0.1:0.1",
            "--range",
            "translate_y=-0.1:0.1:0.1",
            "--images",
            "40",
            "--batch-size",
            "8",
        ),
        figure_order=("accuracy", "softmax_curves", "thresholds", "worst_case"),
        bad_inputs=(
            (("--data", "digits", "--transforms", "spin"), "unknown transform 'spin'"),
            (
                ("--data", "digits", "--transforms", "zoom", "--range", "zoom=-1:2:0.5"),
                "zoom",
            ),
            (("--data", "digits", "--transforms", "rotation", "--threshold", "2"), "--threshold"),
        ),
    )
)


# --------------------------------------------------------------------------- the sweep


def sweep(
    model: nn.Module,
    dataset: Dataset,
    transforms: str | Sequence[str] | None = ("rotation",),
    magnitudes: Mapping[str, Any] | Any | None = None,
    *,
    pairs: Iterable[Any] | None = None,
    worst_case: SpatialBudget | bool | Mapping[str, Any] | None = None,
    images: int | Sequence[int] | None = None,
    classes: Sequence[str | int] | None = None,
    batch_size: int = 128,
    forward_batch: int | str | None = "auto",
    top_k: int = 5,
    seed: int = 0,
    threshold_fraction: float = 0.5,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    progress: bool = False,
    num_workers: int = 0,
    model_spec: str | None = None,
    data_spec: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout: float = 1800.0,
    memory_format: str = "auto",
    amp: bool = False,
    max_work: int | None = DEFAULT_MAX_WORK,
    labels: str = "dataset",
) -> SweepResult:
    """Sweep ``transforms`` over their magnitudes on ``dataset`` and summarise the predictions.

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    Runs :class:`SweepAnalysis` on the engine (:func:`invariscope.engine.run`), which
    owns resumption, distribution, the device and the figures.

    Args:
        model: a classifier: ``[B, C, H, W]`` images in ``[0, 1]`` -> logits ``[B, K]``,
            ``K = len(dataset.classes)``. Put in eval mode for the sweep (restored after).
        dataset: yields ``(image [C, H, W] in [0, 1], label)``; has ``classes``.
        transforms: registered names (list or ``"rotation,zoom"``); may be empty with
            ``pairs`` or ``worst_case``.
        magnitudes: ``{name: spec}`` with spec a range ``(start, stop[, step])`` or
            ``"start:stop[:step]"``, or explicit values (list / array); missing names use
            the registry's default range. The identity magnitude is always added.
        pairs: two-parameter sweeps, e.g. ``[("translate_x", "translate_y")]``, over the
            full grid of both transformations' magnitudes (geometric pairs in ONE warp).
        worst_case: ``True`` or a :class:`~invariscope.measure.worst_case.SpatialBudget`
            for the rotation x translation worst-case search (Engstrom et al. 2019).
        images: N (a seeded random subset of N images, sorted) or explicit indices.
        classes: only images of these classes (names or indices).
        batch_size: images per part (unit of resumption and of the per-part tables).
        forward_batch: most images per forward pass; ``forward_batch // batch_size``
            magnitudes of one batch share a forward pass. ``"auto"`` (default): timed on
            the real model and device before the run (recorded in the run directory).
        top_k: number of top classes recorded per image (at most K).
        seed: seeds the image subset, the noise (per image: the dataset index shifted by
            ``seed``; exactly the index for ``seed=0``) and the worst-case random draws.
        threshold_fraction: see :func:`invariscope.measure.aggregate.thresholds`.
        device: where to run (the model is moved there); default: the model's device.
        out: run directory; parts are stored there and a rerun resumes. A directory
            holding another configuration is refused unless ``overwrite``.
        figures: render the figures into ``out/figures`` (default: True when ``out``).
        model_spec, data_spec: how the model and data were named (stored in the run's
            ``meta.json``; the configuration holds their fingerprints, so the same model
            named differently still resumes).
        rank, world_size, timeout: see :mod:`invariscope.engine.runner` ("Distribution").
        memory_format: ``"auto"`` (channels_last where it is faster), ``"contiguous"``
            or ``"channels_last"``. amp: autocast the forward passes.
        max_work: refuse a sweep that would forward more transformed images than this
            (None: no limit).
        labels: ``"dataset"`` (the data's labels) or ``"model"`` (each image's label is
            the model's own top-1 on the untransformed image: an audit of unlabelled
            images).

    Returns:
        A :class:`SweepResult`. Raises :class:`InvariscopeError` for bad input (checked
        before anything is written where possible; a failure later leaves the run
        directory "running", without aggregates).
    """
    analysis = SweepAnalysis(
        transforms,
        magnitudes,
        pairs=pairs,
        worst_case=worst_case,
        top_k=top_k,
        threshold_fraction=threshold_fraction,
    )
    result = run_analysis(
        analysis,
        {"model": model},
        {"data": dataset},
        images=images,
        classes=classes,
        batch_size=batch_size,
        seed=seed,
        device=device,
        forward_batch=forward_batch,
        memory_format=memory_format,
        amp=amp,
        max_work=max_work,
        out=out,
        overwrite=overwrite,
        figures=figures,
        progress=progress,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        labels=labels,
        meta={
            "threshold_fraction": threshold_fraction,
            "model_spec": model_spec,
            "data_spec": data_spec,
        },
    )
    return SweepResult(**{f: getattr(result, f) for f in RunResult.__dataclass_fields__})


def sweep_2d(
    model: nn.Module,
    dataset: Dataset,
    pair: tuple[str, str] | str,
    magnitudes: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Two-parameter sweep of ``pair`` (e.g. ``("translate_x", "translate_y")``).

    The same as ``sweep(model, dataset, [], magnitudes, pairs=[pair], **kwargs)``; the
    tables are ``records_2d``, ``accuracy_2d`` and ``class_accuracy_2d``.
    """
    return sweep(model, dataset, [], magnitudes, pairs=[pair], **kwargs)


# ------------------------------------------------------------------------ aggregation


def _aggregate(store, plan: _Spec, classes: list[str], fraction: float) -> dict[str, pd.DataFrame]:
    """Aggregate tables, streaming over the parts (one part in memory at a time)."""
    out: dict[str, pd.DataFrame] = {}
    out["classes"] = pd.DataFrame(
        {"label": np.arange(len(classes), dtype=np.int64), "name": classes}
    )
    out["transforms"] = pd.DataFrame(
        {
            "transform": list(plan.identities),
            "identity": [plan.identities[n] for n in plan.identities],
            "unit": [plan.units[n] for n in plan.identities],
        }
    )
    if plan.transforms:
        counts, curves, over = [], [], []
        for name, mags in plan.transforms.items():
            # one transformation at a time: memory is [classes, magnitudes, K] at most
            acc = agg.SoftmaxSumAccumulator(name, mags)
            for _, part in store.iter_table("softmax_sums", filters=[("transform", "==", name)]):
                acc.add(part)
            sums = acc.frame()
            counts.append(acc.counts())
            curves.append(agg.softmax_curves(sums))
            over.append(agg.overtaken(sums, plan.identities))
        counts = pd.concat(counts, ignore_index=True)
        out["accuracy"] = agg.accuracy_curve(counts)
        out["class_accuracy"] = agg.class_accuracy_curve(counts)
        out["softmax_curves"] = pd.concat(curves, ignore_index=True)
        th = agg.thresholds(out["class_accuracy"], identities=plan.identities, fraction=fraction)
        over_df = pd.concat(over, ignore_index=True)
        th = th.merge(over_df, on=["transform", "label"], how="left")
        th["overtaken_by_low"] = th["overtaken_by_low"].fillna(-1).astype("int64")
        th["overtaken_by_high"] = th["overtaken_by_high"].fillna(-1).astype("int64")
        out["thresholds"] = th
        summaries = []
        for name in plan.transforms:  # one transformation's per-image numbers at a time
            breaking = store.read_table(
                "breaking",
                columns=["label", "break_low", "break_high"],
                filters=[("transform", "==", name)],
            )
            summaries.append(agg.breaking_summary(breaking.assign(transform=name)))
        out["breaking_summary"] = pd.concat(summaries, ignore_index=True)
        order = {n: i for i, n in enumerate(plan.transforms)}
        for key in (
            "accuracy",
            "class_accuracy",
            "softmax_curves",
            "thresholds",
            "breaking_summary",
        ):
            frame = out[key]
            out[key] = frame.sort_values(
                "transform", key=lambda s: s.map(order), kind="stable"
            ).reset_index(drop=True)
    swept = {n: m for n, m in plan.transforms.items()}
    for a, ma, b, mb in plan.pairs:
        swept.setdefault(a, ma)
        swept.setdefault(b, mb)
    names = out["transforms"]["transform"]
    out["transforms"]["n_magnitudes"] = [len(plan.transforms.get(n, [])) for n in names]
    out["transforms"]["min_magnitude"] = [float(swept[n].min()) for n in names]
    out["transforms"]["max_magnitude"] = [float(swept[n].max()) for n in names]
    if plan.pairs:
        counts = None
        for _, part in store.iter_table(
            "records_2d", columns=[*agg.KEYS_2D, "label", "correct", "p_true"]
        ):
            part_counts = agg.class_counts(part, agg.KEYS_2D)
            counts = (
                part_counts
                if counts is None
                else agg.class_counts(
                    pd.concat([counts, part_counts], ignore_index=True), agg.KEYS_2D
                )
            )
        out["accuracy_2d"] = agg.accuracy_curve(counts, agg.KEYS_2D)
        out["class_accuracy_2d"] = agg.class_accuracy_curve(counts, agg.KEYS_2D)
    if plan.budget is not None:
        per_image = store.read_table(
            "worst_case", columns=["label", *(f"{s}_correct" for s in agg.WORST_CASE_SETTINGS)]
        )
        out["worst_case_summary"] = agg.worst_case_summary(per_image)
    return out


def _units(aggregates: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    tr = aggregates.get("transforms")
    if tr is None or "unit" not in tr.columns:
        return {}
    return {str(t): str(u) for t, u in zip(tr["transform"], tr["unit"], strict=True)}


def _headline(
    summary: Mapping[str, Any], aggregates: Mapping[str, pd.DataFrame], config: Mapping[str, Any]
) -> str:
    """Identity accuracy, where accuracy falls to the threshold fraction of it (per
    transformation), the weakest cell of each 2-D grid and the worst case."""
    sentences = []
    units = _units(aggregates)
    n = summary.get("num_images")
    th = aggregates.get("thresholds") if "thresholds" in aggregates else None
    if th is not None and len(th):
        overall = th[th["label"] == agg.ALL_CLASSES]
        first = overall.iloc[0]
        fraction = summary.get("threshold_fraction", 0.5)
        sides, never = [], []
        tr = aggregates.get("transforms")
        lowest = (
            dict(zip(tr["transform"], tr["min_magnitude"], strict=True))
            if tr is not None and "min_magnitude" in tr.columns
            else {}
        )
        for r in overall.itertuples(index=False):
            values = [r.threshold_low, r.threshold_high]
            if lowest.get(r.transform, r.identity - 1) >= r.identity:  # nothing below identity
                values = [r.threshold_high]
            if all(math.isnan(v) for v in values):
                never.append(r.transform)
                continue
            text = "/".join("none" if math.isnan(v) else f"{v:+g}" for v in values)
            sides.append(f"{r.transform} {text} {units.get(r.transform, '')}".rstrip())
        text = (
            f"On {n} images the identity accuracy is "
            f"{ci(first.identity_accuracy, first.identity_accuracy_low, first.identity_accuracy_high)}"
        )
        if sides:
            text += f"; it falls to {fraction:g} of that at " + ", ".join(sides)
            text += " (below/above identity; none = not within the swept range)"
        if never:
            text += f"; under {', '.join(never)} it stays above that within the swept range"
        sentences.append(text + ".")
    grid = aggregates.get("accuracy_2d") if "accuracy_2d" in aggregates else None
    if grid is not None and len(grid):
        for (a, b), g in grid.groupby(["transform_a", "transform_b"], sort=False):
            w = g.loc[g["accuracy"].idxmin()]
            sentences.append(
                f"On the {a} x {b} grid the lowest accuracy is "
                f"{ci(w.accuracy, w.accuracy_low, w.accuracy_high)} at {a} "
                f"{w.magnitude_a:+g}, {b} {w.magnitude_b:+g}."
            )
    wc = aggregates.get("worst_case_summary") if "worst_case_summary" in aggregates else None
    if wc is not None and len(wc):
        budget = config.get("worst_case") if isinstance(config.get("worst_case"), Mapping) else {}
        text = worst_case_headline(wc, None, budget_text(config), budget.get("k"))
        sentences.append(f"Worst case: {text[:1].lower()}{text[1:]}")
    return " ".join(sentences) or default_headline(summary)


def _pivots(aggregates: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Thresholds (transformation x side), accuracy per magnitude of each transformation,
    each 2-D grid (magnitude x magnitude) and the worst case."""
    out: dict[str, pd.DataFrame] = {}
    units = _units(aggregates)
    th = aggregates.get("thresholds") if "thresholds" in aggregates else None
    if th is not None and len(th):
        overall = th[th["label"] == agg.ALL_CLASSES]
        out["Where accuracy falls to the threshold fraction of the identity accuracy"] = (
            pd.DataFrame(
                {
                    "unit": [units.get(t, "") for t in overall["transform"]],
                    "identity accuracy (fraction correct)": overall["identity_accuracy"].to_numpy(),
                    "below identity": overall["threshold_low"].to_numpy(),
                    "above identity": overall["threshold_high"].to_numpy(),
                },
                index=pd.Index(overall["transform"].to_numpy(), name="transformation"),
            )
        )
    acc = aggregates.get("accuracy") if "accuracy" in aggregates else None
    if acc is not None and len(acc):
        for name, g in acc.groupby("transform", sort=False):
            out[f"Accuracy under {name}"] = pd.DataFrame(
                {
                    "accuracy (fraction correct)": g["accuracy"].to_numpy(),
                    "95% low": g["accuracy_low"].to_numpy(),
                    "95% high": g["accuracy_high"].to_numpy(),
                    "mean p(true class)": g["mean_p_true"].to_numpy(),
                },
                index=pd.Index(g["magnitude"].to_numpy(), name=with_unit(name, units.get(name))),
            )
    grid = aggregates.get("accuracy_2d") if "accuracy_2d" in aggregates else None
    if grid is not None and len(grid):
        for (a, b), g in grid.groupby(["transform_a", "transform_b"], sort=False):
            g = g.sort_values(["magnitude_a", "magnitude_b"])
            pivot = tidy_pivot(g, "magnitude_a", "magnitude_b", "accuracy")
            pivot.index.name = with_unit(a, units.get(a))
            pivot.columns = [f"{b} {v:+g}" for v in pivot.columns]
            out[
                f"Accuracy (fraction correct) on the {a} x {b} grid ({b} in {units.get(b, '')})"
            ] = pivot
    wc = aggregates.get("worst_case_summary") if "worst_case_summary" in aggregates else None
    if wc is not None and len(wc):
        out.update(worst_case_pivots(wc, aggregates.get("classes")))
    return out


def _summary(
    aggregates: Mapping[str, pd.DataFrame], num_images: int, fraction: float
) -> dict[str, Any]:
    summary: dict[str, Any] = {"num_images": int(num_images), "threshold_fraction": fraction}
    th = aggregates.get("thresholds")
    if th is not None:
        overall = th[th["label"] == agg.ALL_CLASSES]
        summary["identity_accuracy"] = (
            float(overall["identity_accuracy"].iloc[0]) if len(overall) else None
        )
        summary["thresholds"] = {
            r.transform: [
                None if math.isnan(r.threshold_low) else float(r.threshold_low),
                None if math.isnan(r.threshold_high) else float(r.threshold_high),
            ]
            for r in overall.itertuples(index=False)
        }
    wc = aggregates.get("worst_case_summary")
    if wc is not None:
        overall = wc[wc["label"] == agg.ALL_CLASSES]
        summary["worst_case"] = {
            r.setting: float(r.accuracy) for r in overall.itertuples(index=False)
        }
    return summary
