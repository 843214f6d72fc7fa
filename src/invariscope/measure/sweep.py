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

Execution: images are read in batches of ``batch_size`` (a *part* per transformation
and batch, the unit of resumption), several magnitudes of a batch are stacked into one
forward pass of at most ``forward_batch`` images, everything runs under
``torch.inference_mode`` on the model's device, and only the top-5 classes and
per-class softmax sums leave the device. With ``out=RUN_DIR`` the parts go to an
:class:`invariscope.runs.store.RunStore`: an interrupted run resumes by skipping the
finished parts, and the aggregates are computed at the end by streaming over the parts.
Parts are also the unit of distribution: under ``torchrun`` (or with ``rank`` and
``world_size``) each rank computes its share of the parts into the same run directory
and rank 0 aggregates once all are done (see :func:`sweep`, "Distribution").

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

import invariscope
from invariscope.errors import InvariscopeError
from invariscope.measure import _sweep_core
from invariscope.measure import aggregate as agg
from invariscope.measure._sweep_core import (
    check_images,
    concat_columns,
    dataset_classes,
    iter_batches,
    model_device,
    model_fingerprint,
    predict_chunk,
    prediction_columns,
    resolve_classes,
    select_indices,
)
from invariscope.measure.worst_case import SpatialBudget, worst_case_batch

log = logging.getLogger(__name__)

__all__ = ["SweepResult", "demo_sweep", "resolve_magnitudes", "sweep", "sweep_2d"]

#: Noise seeds are ``(dataset index + seed * NOISE_SEED_MULTIPLIER) mod 2**32``: the dataset
#: indices themselves for ``seed=0``. (torch's CPU generator uses only the low 32 bits of a
#: seed, so seeds that differ above bit 32 would give the same noise.)
NOISE_SEED_MULTIPLIER = 0x9E3779B1

#: Default most images per forward pass, per device type.
DEFAULT_FORWARD_BATCH = {"cpu": 256, "cuda": 1024, "mps": 512}

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


# ---------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """What :func:`sweep` returns: aggregate tables in memory, per-image tables on demand.

    Attributes:
        aggregates: ``{name: DataFrame}`` for the names in :data:`AGGREGATE_TABLES` that
            the sweep produced (e.g. no ``accuracy_2d`` without pairs).
        run_dir: the run directory, or None for an in-memory sweep.
        summary: a few headline numbers (also stored in the run's manifest).
        figures: paths of the figures written (empty unless ``figures=True``).
        rank, world_size: this process's place in a distributed sweep (0 and 1 otherwise).
        aggregated: False on ranks other than 0 of a distributed sweep: they only write
            their share of the parts, and ``aggregates``, ``summary`` and ``figures``
            are empty (rank 0 aggregates; read its run directory with
            :meth:`invariscope.runs.RunStore.open`).
        parts_written: ids of the parts this process computed (not those it resumed).
    """

    aggregates: dict[str, pd.DataFrame]
    run_dir: Path | None
    summary: dict[str, Any]
    figures: list[Path] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    aggregated: bool = True
    parts_written: list[str] = field(default_factory=list)
    _store: Any = field(default=None, repr=False)

    def table(self, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """An aggregate, or a per-image table read from the parts (``records``, ...)."""
        if name in self.aggregates:
            frame = self.aggregates[name]
            return frame if columns is None else frame[list(columns)]
        if not self.aggregated and name in AGGREGATE_TABLES:
            raise InvariscopeError(
                f"rank {self.rank} of {self.world_size} does not aggregate, so it has no "
                f"'{name}' table; read it from rank 0's result or RunStore.open('{self.run_dir}')"
            )
        if name not in PART_TABLES:
            raise InvariscopeError(
                f"no table '{name}' in this sweep; known: "
                f"{', '.join(sorted(set(self.aggregates) | set(PART_TABLES)))}"
            )
        return self._store.read_table(name, columns=columns)

    def __getattr__(self, name: str) -> pd.DataFrame:
        if name.startswith("_") or name in SweepResult.__dataclass_fields__:
            raise AttributeError(name)
        if name in AGGREGATE_TABLES or name in PART_TABLES:
            return self.table(name)
        raise AttributeError(name)


class _MemoryStore:
    """The subset of :class:`RunStore` a sweep uses, kept in memory (``out=None``)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, pd.DataFrame]] = {}
        self.aggregates: dict[str, pd.DataFrame] = {}

    def pending(self, ids: Iterable[str]) -> list[str]:
        return [p for p in ids if p not in self.parts]

    def write_part(self, pid: str, tables: Mapping[str, pd.DataFrame]) -> None:
        self.parts[pid] = dict(tables)

    def iter_table(self, name: str, columns=None, filters=None):
        for pid in sorted(self.parts):
            frame = self.parts[pid].get(name)
            if frame is None:
                continue
            for column, op, value in filters or ():
                if op != "==":
                    raise ValueError(f"in-memory sweeps filter with == only, got {op!r}")
                frame = frame[frame[column] == value]
            yield pid, frame if columns is None else frame[list(columns)]

    def read_table(self, name: str, columns=None, filters=None) -> pd.DataFrame:
        frames = [f for _, f in self.iter_table(name, columns, filters)]
        if not frames:
            raise InvariscopeError(f"this sweep produced no '{name}' table")
        return pd.concat(frames, ignore_index=True)

    def write_aggregate(self, name: str, table: pd.DataFrame) -> None:
        self.aggregates[name] = table


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
    model: nn.Module,
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
            model, images, labels, num_classes, top_k, where
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
    model: nn.Module,
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
        pred, _, _, _ = predict_chunk(model, images, y.repeat(c), num_classes, top_k, where)
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


# --------------------------------------------------------------------------- the sweep


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


def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        return model_device(model)
    from invariscope.train import resolve_device

    return resolve_device(device)


@dataclass
class _Plan:
    transforms: dict[str, np.ndarray]
    identities: dict[str, float]
    units: dict[str, str]
    pairs: list[tuple[str, np.ndarray, str, np.ndarray]]
    budget: SpatialBudget | None
    indices: np.ndarray
    batches: list[np.ndarray]
    part_ids: list[tuple[str, str, Any]]  # (part id, kind, payload)


def _plan(
    transforms, magnitudes, pairs, worst_case, dataset, *, images, classes, batch_size, seed
) -> _Plan:
    from invariscope.runs.store import part_id
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
    if batch_size < 1:
        raise InvariscopeError(f"--batch-size must be at least 1, got {batch_size}")
    class_ids = resolve_classes(classes, dataset_classes(dataset))
    indices = select_indices(dataset, images=images, classes=class_ids, seed=seed)
    batches = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    ids: list[tuple[str, str, Any]] = []
    for b in range(len(batches)):
        for n in names:
            ids.append((part_id("sweep", n, b), "sweep", (n, b)))
        for k, (a, _, bb, _) in enumerate(pair_plan):
            ids.append((part_id("grid", f"{a}+{bb}", b), "pair", (k, b)))
        if budget is not None:
            ids.append((part_id("worst", b), "worst", (None, b)))
    return _Plan(mags, identities, units, pair_plan, budget, indices, batches, ids)


def _config(
    plan: _Plan,
    model: nn.Module,
    dataset: Dataset,
    *,
    seed,
    top_k,
    batch_size,
    forward_batch,
) -> dict[str, Any]:
    return {
        "analysis": "sweep",
        "version": 1,
        "model": {"class": type(model).__name__, "fingerprint": model_fingerprint(model)},
        "data": {
            "name": getattr(dataset, "name", type(dataset).__name__),
            "fingerprint": getattr(dataset, "fingerprint", None),
            "size": len(dataset),
        },
        "images": {"count": len(plan.indices), "indices_sha256": _indices_hash(plan.indices)},
        "transforms": {n: m.tolist() for n, m in plan.transforms.items()},
        "pairs": [[a, ma.tolist(), b, mb.tolist()] for a, ma, b, mb in plan.pairs],
        "worst_case": None if plan.budget is None else plan.budget.to_dict(),
        "seed": int(seed),
        "top_k": int(top_k),
        "batch_size": int(batch_size),
        "forward_batch": int(forward_batch),
    }


def _indices_hash(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _aggregate(store, plan: _Plan, classes: list[str], fraction: float) -> dict[str, pd.DataFrame]:
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


def _summary(
    aggregates: Mapping[str, pd.DataFrame], plan: _Plan, fraction: float
) -> dict[str, Any]:
    summary: dict[str, Any] = {"num_images": int(len(plan.indices)), "threshold_fraction": fraction}
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


def _preflight(
    model: nn.Module, dataset: Dataset, indices: np.ndarray, num_classes: int, dev: torch.device
) -> None:
    """One forward pass on the first images before anything is written.

    A model that does not fit the data (channels, size, output shape, class count) is
    refused here, so that no run directory is created for it.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _, x, y, _ in iter_batches(dataset, [indices]):
                check_images(x, y, num_classes)
                logits = model(x.to(dev))
                _sweep_core.check_logits(logits, len(indices), num_classes, "on the first images")
    finally:
        model.train(was_training)


def _check_rank(rank: Any, world_size: Any) -> None:
    for what, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvariscopeError(f"{what} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvariscopeError(
            f"rank {rank} is not in [0, world_size={world_size}); check rank and world_size "
            "(RANK and WORLD_SIZE under torchrun)"
        )


def _open_store(
    group,
    out,
    config,
    part_ids: Sequence[str],
    *,
    overwrite: bool,
    timeout: float,
    meta: dict[str, Any],
):
    """Open the run directory on every rank and list this rank's parts to compute.

    Rank 0 opens first (it creates, resumes or clears the directory), then, after a
    barrier when there is a process group, the other ranks. Each rank lists the pending
    parts right after opening, and a second barrier follows, so all ranks see the same
    pending parts (nobody writes before it) and take disjoint shares of them. Without
    a process group a rank takes its share of all parts, minus the done ones.

    Returns:
        ``(store, todo)``.
    """
    from invariscope.runs.store import RunStore

    def attempt(opening: bool):
        store, todo, error = None, None, None
        if opening:
            try:
                store = RunStore(
                    out,
                    config,
                    # the other ranks open after rank 0 has cleared the directory: a
                    # configuration that differs there is an error, not worth a wait
                    overwrite=overwrite and group.rank == 0,
                    rank=group.rank,
                    world_size=group.world_size,
                    timeout=timeout,
                )
                if group.rank == 0:
                    store.update_meta(meta)
                if group.collective:
                    todo = store.shard(store.pending(part_ids))
                else:
                    todo = store.pending(store.shard(part_ids))
            except Exception as exc:
                if not group.collective:
                    raise
                error = exc
        failed = group.failed_ranks(error is not None)
        if error is not None:
            raise error
        if failed:
            raise InvariscopeError(
                f"rank {failed[0]} could not open the run directory '{out}' (see its error); "
                "fix that and run the same command again"
            )
        return store, todo

    first = attempt(group.rank == 0)  # barrier: rank 0 has written config.json
    second = attempt(group.rank != 0)  # barrier: every rank listed its parts
    return first if group.rank == 0 else second


def _compute_parts(
    model: nn.Module,
    dataset: Dataset,
    store,
    plan: _Plan,
    todo: Sequence[str],
    *,
    dev: torch.device,
    num_classes: int,
    top_k: int,
    forward_batch: int,
    seed: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Compute and store the parts ``todo`` (batch by batch, each batch read once)."""
    from tqdm.auto import tqdm

    todo_set = set(todo)
    pending_batches = sorted({payload[1] for pid, _, payload in plan.part_ids if pid in todo_set})
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(todo), disable=None if progress else True, unit="part", leave=False)
    try:
        with torch.inference_mode():
            for pos, x, y, idx in iter_batches(
                dataset, [plan.batches[b] for b in pending_batches], num_workers=num_workers
            ):
                b = pending_batches[pos]
                check_images(x, y, num_classes)
                x, y_dev = x.to(dev), y.to(dev)
                for pid, kind, payload in plan.part_ids:
                    if payload[1] != b or pid not in todo_set:
                        continue
                    if kind == "sweep":
                        name = payload[0]
                        tables = _sweep_part(
                            model,
                            x,
                            y_dev,
                            idx,
                            name,
                            plan.transforms[name],
                            num_classes=num_classes,
                            top_k=top_k,
                            forward_batch=forward_batch,
                            seed=seed,
                            identity=plan.identities[name],
                        )
                    elif kind == "pair":
                        tables = _pair_part(
                            model,
                            x,
                            y_dev,
                            idx,
                            plan.pairs[payload[0]],
                            num_classes=num_classes,
                            top_k=top_k,
                            forward_batch=forward_batch,
                            seed=seed,
                        )
                    else:
                        tables = {
                            "worst_case": worst_case_batch(
                                model,
                                x,
                                y_dev,
                                idx,
                                plan.budget,
                                num_classes=num_classes,
                                forward_batch=forward_batch,
                                seed=seed,
                            )
                        }
                    store.write_part(pid, tables)
                    bar.update(1)
    finally:
        bar.close()
        model.train(was_training)


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
    forward_batch: int | None = None,
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
) -> SweepResult:
    """Sweep ``transforms`` over their magnitudes on ``dataset`` and summarise the predictions.

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
            magnitudes of one batch share a forward pass. Default: 256 on the CPU (small
            batches stay in cache), 1024 on a GPU.
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
        rank, world_size: this process's place in a distributed sweep (default:
            :func:`invariscope.runs.store.rank_from_env`, i.e. ``(0, 1)`` outside
            ``torchrun``). See "Distribution" below.
        timeout: distributed sweeps only: seconds a rank waits for the others (rank 0
            for parts: seconds without a new part; the other ranks for rank 0's
            ``config.json``).

    Returns:
        A :class:`SweepResult`. Raises :class:`InvariscopeError` for bad input (checked
        before anything is written where possible; a failure later leaves the run
        directory "running", without aggregates).

    Distribution:
        With ``world_size > 1`` (``torchrun``, or explicit ``rank``/``world_size``) every
        rank runs this same call with ``out`` set. Rank 0 opens (resumes, overwrites) the
        run directory, each rank computes its share of the pending parts into it
        (disjoint shares that cover all), and rank 0 alone aggregates, draws and
        finalizes once every part is done; the other ranks return a result with
        ``aggregated=False``. Parts hold the same numbers whoever computes them, so
        the tables equal those of a single-process run. Two ways to meet:

        - an initialised ``torch.distributed`` process group (``invariscope sweep``
          starts one under torchrun; see :func:`~invariscope.measure._sweep_core.init_distributed`):
          barriers after opening the directory and after the parts; the pending parts
          are listed once all ranks have opened it and dealt round-robin
          (:func:`invariscope.runs.store.shard`), so a resumed run is shared evenly too.
          If a rank fails, every rank learns it at the barrier and rank 0 raises
          instead of aggregating;
        - no process group: rank ``r`` takes ``shard(all part ids, r, world_size)``
          minus the done ones, and rank 0 polls the run directory until every part is
          done (:func:`~invariscope.measure._sweep_core.wait_for_parts`, ``timeout``
          seconds without progress). ``overwrite`` then needs a process group.

        Either way a failure on any rank leaves the run "running" without aggregates
        (:meth:`RunStore.finalize` refuses missing parts), and running the same
        command again resumes it.
    """
    if not 0.0 < threshold_fraction <= 1.0:
        raise InvariscopeError(f"--threshold must be in (0, 1], got {threshold_fraction}")
    if forward_batch is not None and forward_batch < 1:
        raise InvariscopeError(f"--forward-batch must be at least 1, got {forward_batch}")
    if top_k < 1:
        raise InvariscopeError(f"top_k must be at least 1, got {top_k}")
    class_names = dataset_classes(dataset)
    num_classes = len(class_names)
    model_classes = getattr(model, "num_classes", None)
    if isinstance(model_classes, int) and model_classes != num_classes:
        raise InvariscopeError(
            f"the model has {model_classes} classes but the dataset has {num_classes}; use a "
            "model trained on this dataset (or a dataset with matching classes)"
        )
    plan = _plan(
        transforms,
        magnitudes,
        pairs,
        worst_case,
        dataset,
        images=images,
        classes=classes,
        batch_size=batch_size,
        seed=seed,
    )
    from invariscope.runs.store import rank_from_env

    env = rank_from_env()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    _check_rank(rank, world_size)
    distributed = world_size > 1
    if distributed and out is None:
        raise InvariscopeError(
            f"a distributed sweep (world size {world_size}) needs a run directory that all "
            "ranks share; pass out=RUN_DIR (--out)"
        )
    dev = _sweep_core.rank_device(_resolve_device(device, model), rank, world_size)
    group = _sweep_core.RankGroup(rank, world_size, dev)
    if distributed and overwrite and not group.collective:
        raise InvariscopeError(
            "overwrite in a distributed sweep needs torch.distributed (launch "
            "'invariscope sweep' with torchrun, or call torch.distributed.init_process_group "
            "first) so that no rank writes before rank 0 has cleared the run directory; or "
            "remove the directory and run without overwrite"
        )
    if device is not None:
        model.to(dev)
    if forward_batch is None:
        forward_batch = DEFAULT_FORWARD_BATCH.get(dev.type, 1024)
    _preflight(model, dataset, plan.indices[:2], num_classes, dev)
    config = _config(
        plan,
        model,
        dataset,
        seed=seed,
        top_k=top_k,
        batch_size=batch_size,
        forward_batch=forward_batch,
    )
    all_ids = [pid for pid, _, _ in plan.part_ids]
    if out is not None:
        store, todo = _open_store(
            group,
            out,
            config,
            all_ids,
            overwrite=overwrite,
            timeout=timeout,
            meta={
                "invariscope": invariscope.__version__,
                "torch": torch.__version__,
                "device": str(dev),
                "world_size": world_size,
                "threshold_fraction": threshold_fraction,
                "model_spec": model_spec,
                "data_spec": data_spec,
            },
        )
    else:
        store = _MemoryStore()
        todo = store.pending(all_ids)
    error: Exception | None = None
    try:
        _compute_parts(
            model,
            dataset,
            store,
            plan,
            todo,
            dev=dev,
            num_classes=num_classes,
            top_k=top_k,
            forward_batch=forward_batch,
            seed=seed,
            num_workers=num_workers,
            progress=progress and rank == 0,
        )
    except Exception as exc:  # the other ranks must still reach the barrier
        if not group.collective:
            raise
        error = exc
    failed = group.failed_ranks(error is not None)
    if error is not None:
        raise error
    run_dir = Path(out) if out is not None else None
    if rank != 0:
        return SweepResult({}, run_dir, {}, [], rank, world_size, False, list(todo), store)
    if failed:
        raise InvariscopeError(
            f"rank {', '.join(map(str, failed))} of {world_size} failed (see its error), so "
            f"run '{out}' stays incomplete; fix that and run the same command again to resume"
        )
    if distributed and not group.collective:
        _sweep_core.wait_for_parts(store, all_ids, timeout=timeout)
    aggregates = _aggregate(store, plan, class_names, threshold_fraction)
    summary = _summary(aggregates, plan, threshold_fraction)
    for name, table in aggregates.items():
        store.write_aggregate(name, table)
    written: list[Path] = []
    if figures if figures is not None else out is not None:
        if out is None:
            raise InvariscopeError("figures need a run directory; pass out=RUN_DIR")
        from invariscope.plots.sweep import render_sweep_figures

        stored = {name: store.read_aggregate(name) for name in aggregates}
        written = render_sweep_figures(
            stored,
            store.path("figures"),
            fraction=threshold_fraction,
            budget=None if plan.budget is None else plan.budget.describe(),
        )
    if out is not None:
        store.finalize(summary, expected_parts=all_ids)
    return SweepResult(
        aggregates, run_dir, summary, written, rank, world_size, True, list(todo), store
    )


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


# ------------------------------------------------------------------------------- demo


def _fmt_side(value: float) -> str:
    """A threshold for the demo summary; NaN (not reached in the swept range) reads 'none'."""
    return (
        "none"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:g}"
    )


def demo_sweep(model: nn.Module, dataset: Dataset, out_dir: str | Path) -> str:
    """The sweep stage of ``invariscope demo``: a short screening with figures (~10 s on 2 cores).

    Two runs under ``out_dir``: ``screening/`` sweeps rotation, horizontal translation
    and Gaussian noise on the whole dataset; ``spatial/`` runs a translate_x x
    translate_y grid and the worst-case rotation x translation search (+-30 deg, +-3 px
    scaled to the image size, grid 7x3x3, k=10) on 100 images. Returns a short summary.
    """
    out_dir = Path(out_dir)
    h = int(dataset[0][0].shape[-1])
    shift = 3.0 * h / 28.0
    ranges = {
        "rotation": (-180, 180, 20),
        "translate_x": (-0.4, 0.4, 0.1),
        "gaussian_noise": (0.0, 1.0, 0.2),
    }
    screening = sweep(
        model,
        dataset,
        list(ranges),
        ranges,
        out=out_dir / "screening",
        overwrite=True,
        figures=True,
        rank=0,
        world_size=1,
    )
    spatial = sweep(
        model,
        dataset,
        [],
        {"translate_x": (-0.3, 0.3, 0.075), "translate_y": (-0.3, 0.3, 0.075)},
        pairs=[("translate_x", "translate_y")],
        worst_case=SpatialBudget(max_angle=30.0, max_shift=shift, angles=7, shifts=3, k=10),
        images=min(100, len(dataset)),
        out=out_dir / "spatial",
        overwrite=True,
        figures=True,
        rank=0,
        world_size=1,
    )
    th = screening.aggregates["thresholds"]
    overall = th[th["label"] == agg.ALL_CLASSES].set_index("transform")
    units = screening.aggregates["transforms"].set_index("transform")["unit"]
    identities = screening.aggregates["transforms"].set_index("transform")["identity"]
    parts = []
    for name, r in overall.iterrows():
        sides = [_fmt_side(r.threshold_low), _fmt_side(r.threshold_high)]
        if ranges[name][0] >= identities.get(name, ranges[name][0]):  # nothing below identity
            sides = [sides[1]]
        parts.append(f"{name} {'/'.join(sides)} [{units.get(name, '')}]")
    wc = spatial.summary.get("worst_case", {})
    figures = len(screening.figures + spatial.figures) // 2
    return (
        f"{screening.summary['num_images']} images, identity accuracy "
        f"{screening.summary['identity_accuracy']:.3f}; accuracy halves at (low/high; "
        "none = not within the swept range) "
        + "; ".join(parts)
        + f".\nWorst case on {spatial.summary['num_images']} images (+-30 deg, +-{shift:g} px): "
        f"natural {wc.get('natural', 0):.3f}, random {wc.get('random', 0):.3f}, worst-of-10 "
        f"{wc.get('worst_of_k', 0):.3f}, grid {wc.get('grid', 0):.3f}; {figures} figures in "
        f"{out_dir}/*/figures"
    )
