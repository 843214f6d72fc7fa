"""The runner: plan -> parts -> store -> ranks -> aggregate -> figures, for every analysis.

:func:`run` owns everything an analysis does not say: the run directory
(:class:`~invariscope.runs.RunStore`) and resume, the ranks under ``torchrun`` and their
barriers, disjoint shares of the pending parts, the device, the pre-flight check before
anything is written, the forward batch and memory format, the progress bar, reading
each batch of images once for all the parts that share it, aggregation on rank 0,
figures and finalize.

Distribution:
    With ``world_size > 1`` (``torchrun``, or explicit ``rank``/``world_size``) every
    rank makes the same call with ``out`` set. Rank 0 opens (resumes, overwrites) the
    run directory and records the execution settings; then, stage by stage, each rank
    computes its share of the pending parts into it, and rank 0 alone aggregates, draws
    and finalizes once every part is done; the other ranks return a result with
    ``aggregated=False``. Parts hold the same numbers whoever computes them, so the
    tables equal those of a single-process run. With an initialised
    ``torch.distributed`` process group the ranks meet at barriers (a failure on any
    rank is known to all at the next one, and rank 0 raises instead of aggregating);
    without one they meet through the run directory only (rank ``r`` takes
    ``shard(ids, r, world_size)`` and waits for the others' parts, ``timeout`` seconds
    without progress). Either way a failure leaves the run "running", and the same
    command resumes it, with any number of ranks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

import invariscope
from invariscope.data.batches import iter_index_batches
from invariscope.engine import distributed
from invariscope.engine.analysis import Analysis, Batch, Part, PartOutput
from invariscope.engine.context import Context, MemoryStore
from invariscope.engine.execution import (
    Execution,
    Forward,
    check_logits,
    model_device,
    model_fingerprint,
    resolve_device,
    tune,
)
from invariscope.engine.selection import (
    align_to_model,
    check_class_count,
    check_images,
    check_labels,
    dataset_classes,
    label_by_model,
    mix_indices,
    resolve_classes,
    select_indices,
)
from invariscope.errors import InvariscopeError, hint
from invariscope.models import check_class_names
from invariscope.runs.store import RunStore, config_hash, rank_from_env

log = logging.getLogger(__name__)

__all__ = ["RunResult", "run"]

MEMORY_FORMATS = ("auto", "contiguous", "channels_last")

#: The most transformed images a run may forward unless the user raises it (``--max-work``).
DEFAULT_MAX_WORK = 10**8

#: Forward batch when it is not tuned, per device type.
DEFAULT_FORWARD_BATCH = {"cpu": 256, "cuda": 1024, "mps": 512}

#: Runs that need fewer forward FLOPs than this are not tuned: tuning costs a few seconds,
#: which only runs of about 10 s of forward passes or more win back (2 CPU cores: 40-100
#: GFLOP/s on small convolutional nets).
MIN_TUNING_FLOPS = {"cpu": 1e12, "cuda": 1e13, "mps": 1e12}


def _flops_per_image(model: nn.Module, image: torch.Tensor) -> float:
    """Forward FLOPs of one image in the model's convolutions and linear layers.

    Counted with forward hooks (2 x multiply-adds: a convolution's output elements times
    its ``in_channels / groups x kernel size``, a linear layer's output elements times
    ``in_features``): exact for those layers, deterministic, and one forward pass of one
    image. Only the tuning decision uses it.
    """
    total = [0.0]

    def count(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            per_output = module.in_features
        total[0] += 2.0 * output.numel() * per_output

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    ]
    try:
        with torch.inference_mode():
            model(image)
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


# ---------------------------------------------------------------------------- result


@dataclass
class RunResult:
    """What :func:`run` returns: aggregate tables in memory, per-part tables on demand.

    Attributes:
        aggregates: ``{name: DataFrame}``: the aggregate tables (empty on ranks other
            than 0, which do not aggregate).
        run_dir: the run directory, or None for an in-memory run.
        summary: a few headline numbers (also stored in the run's manifest).
        figures: paths of the figures written.
        rank, world_size: this process's place in the run (0 and 1 otherwise).
        aggregated: False on ranks other than 0 of a distributed run.
        parts_written: ids of the parts this process computed (not those it resumed).
        config: the run's full configuration; execution: how forward passes ran.
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
    analysis: str = ""
    part_tables: tuple[str, ...] = ()
    aggregate_tables: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    execution: Execution | None = None

    def table(self, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """An aggregate, or a per-part table read from the parts (``records``, ...)."""
        if name in self.aggregates:
            frame = self.aggregates[name]
            return frame if columns is None else frame[list(columns)]
        if not self.aggregated and name in self.aggregate_tables:
            raise InvariscopeError(
                f"rank {self.rank} of {self.world_size} does not aggregate, so it has no "
                f"'{name}' table; read it from rank 0's result or RunStore.open('{self.run_dir}')"
            )
        if name not in self.part_tables:
            raise InvariscopeError(
                f"no table '{name}' in this {self.analysis or 'run'}; known: "
                f"{', '.join(sorted(set(self.aggregates) | set(self.part_tables)))}"
            )
        return self._store.read_table(name, columns=columns)

    def __getattr__(self, name: str) -> pd.DataFrame:
        if name.startswith("_") or name in RunResult.__dataclass_fields__:
            raise AttributeError(name)
        if name in self.aggregate_tables or name in self.part_tables:
            return self.table(name)
        raise AttributeError(name)


# ---------------------------------------------------------------------------- checks


def _check_int(name: str, value: Any, low: int) -> int:
    """``name`` as the option is spelled (``batch-size``); the API says ``batch_size``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        what = hint(name.replace("-", "_"), f"--{name}")
        raise InvariscopeError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_rank(rank: Any, world_size: Any) -> None:
    for what, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvariscopeError(f"{what} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvariscopeError(
            f"rank {rank} is not in [0, world_size={world_size}); check rank and world_size "
            "(RANK and WORLD_SIZE under torchrun)"
        )


def _named(kind: str, given: Any, wanted: tuple[str, ...], analysis: str) -> dict[str, Any]:
    """``{name: object}`` for the models / datasets an analysis declares."""
    if given is None:
        given = {}
    elif not isinstance(given, Mapping):
        given = {wanted[0]: given} if len(wanted) == 1 else {"": given}
    missing = [n for n in wanted if n not in given]
    extra = [n for n in given if n not in wanted]
    if missing or extra:
        raise InvariscopeError(
            f"the {analysis} analysis takes {kind} {list(wanted)}, got {sorted(given)}; "
            f"pass {kind} named {', '.join(wanted) or 'none'}"
        )
    return dict(given)


def _indices_hash(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _preflight(ctx: Context) -> torch.Tensor:
    """One forward pass of ``model`` on the first images of ``data``, before anything is
    written: a model that does not fit the data (channels, size, output shape, class
    count) is refused here. Returns the first batch (for tuning)."""
    first = ctx.batches["data"][0]
    with torch.inference_mode():
        for _, x, y, _ in iter_index_batches(ctx.dataset, [first[:2]]):
            check_images(x, y, ctx.num_classes)
            x = x.to(ctx.device)
            logits = ctx.model(x[:2])
            check_logits(logits, min(2, len(x)), ctx.num_classes, "on the first images")
            mismatch = check_class_names(ctx.model, ctx.dataset)
            if mismatch:
                log.warning(mismatch)
            return x
    raise InvariscopeError("the dataset is empty; check --data (and its path or split)")


def _choose_execution(
    analysis: Analysis, ctx: Context, sample, forward_batch, memory_format, amp
) -> Execution:
    """Tune the forward batch and memory format, unless the run is too small to gain.

    Tuning costs a few forward passes; it is skipped (defaults: contiguous, the
    device's default forward batch) when the whole run needs fewer floating-point
    operations than :data:`MIN_TUNING_FLOPS` (the analysis's ``work`` times the FLOPs of
    one image, see :func:`_flops_per_image`). The count, unlike a timing, is
    the same in every process, so two runs of the same small configuration always run
    alike.
    """
    default = (
        forward_batch
        if isinstance(forward_batch, int)
        else DEFAULT_FORWARD_BATCH.get(ctx.device.type, 256)
    )
    plain = Execution(default, memory_format == "channels_last", bool(amp))
    if sample is None or (forward_batch != "auto" and memory_format != "auto"):
        return plain
    work = analysis.work(ctx)
    if work is not None:
        flops = work * _flops_per_image(ctx.model, sample[:1])
        if flops < MIN_TUNING_FLOPS.get(ctx.device.type, 1e13):
            return plain
    return tune(
        ctx.model,
        sample,
        forward_batch=forward_batch,
        memory_format=memory_format,
        amp=amp,
        cap=analysis.max_forward_batch(ctx),
        work=work,
    )


# ------------------------------------------------------------------------ the store


def _stored_execution(out: Path, config_hash: str) -> Execution | None:
    """The execution recorded by an earlier start of the same run, if any."""
    try:
        stored = json.loads((out / "config.json").read_text())
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    execution = meta.get("execution")
    if stored.get("config_hash") != config_hash or not isinstance(execution, dict):
        return None
    if execution.get("config_hash") != config_hash:
        return None
    try:
        return Execution.from_dict(execution)
    except TypeError:
        return None


def _wait_for_execution(store, config_hash: str, timeout: float) -> Execution:
    """Ranks > 0 without a process group: wait for rank 0 to record the execution."""
    deadline = time.monotonic() + timeout
    while True:
        found = _stored_execution(store.run_dir, config_hash)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise InvariscopeError(
                f"rank {store.rank} waited {timeout:g} s for rank 0 to record how it runs "
                f"in {store.run_dir}/meta.json; start rank 0 or raise the timeout"
            )
        time.sleep(0.05)


def _collective(group, fn, what: str = ""):
    """Run ``fn`` on this rank, then meet the others (a barrier when there is a process
    group); if any rank failed, every rank learns it and raises."""
    value, error = None, None
    try:
        value = fn()
    except Exception as exc:  # the other ranks must still reach the barrier
        if not group.collective:
            raise
        error = exc
    failed = group.failed_ranks(error is not None)
    if error is not None:
        raise error
    if failed:
        raise InvariscopeError(
            f"rank {', '.join(map(str, failed))} of {group.world_size} failed"
            f"{' ' + what if what else ''} (see its error), so the run stays incomplete; fix "
            "that and run the same command again to resume"
        )
    return value


# ------------------------------------------------------------------------- compute


def _store_output(store, part: Part, output: Any, analysis: Analysis) -> None:
    if isinstance(output, PartOutput):
        store.write_part(part.id, output.tables, output.blobs, stage=part.stage)
    elif isinstance(output, Mapping):
        store.write_part(part.id, dict(output), stage=part.stage)
    else:
        raise TypeError(
            f"{type(analysis).__name__}.compute returned {type(output).__name__}; return a "
            "dict of DataFrames or a PartOutput"
        )


def _compute(
    analysis: Analysis,
    ctx: Context,
    store,
    parts: list[Part],
    todo: Sequence[str],
    bar,
) -> list[str]:
    """Compute and store the parts ``todo`` of one stage, reading each batch once."""
    wanted = set(todo)
    mine = [p for p in parts if p.id in wanted]
    by_batch: dict[tuple[str, int], list[Part]] = defaultdict(list)
    jobs = []
    for part in mine:
        if part.batch is None:
            jobs.append(part)
        else:
            by_batch[(part.dataset, part.batch)].append(part)
    written: list[str] = []
    mode = torch.enable_grad() if analysis.grad else torch.inference_mode()
    with mode:
        for name in analysis.datasets:
            numbers = sorted(b for d, b in by_batch if d == name)
            if not numbers:
                continue
            dataset = ctx.datasets[name]
            num_classes = len(ctx.classes[name])
            chosen = [ctx.batches[name][b] for b in numbers]
            for pos, x, y, idx in iter_index_batches(dataset, chosen, num_workers=ctx.num_workers):
                number = numbers[pos]
                check_images(x, y, num_classes)
                batch = Batch(x.to(ctx.device), y.to(ctx.device), idx, number, name)
                for part in by_batch[(name, number)]:
                    _store_output(store, part, analysis.compute(part, ctx, batch), analysis)
                    written.append(part.id)
                    bar.update(1)
        for part in jobs:
            _store_output(store, part, analysis.compute(part, ctx, None), analysis)
            written.append(part.id)
            bar.update(1)
    return written


# ------------------------------------------------------------------------------ run


def run(
    analysis: Analysis,
    models: Mapping[str, nn.Module] | nn.Module | None = None,
    datasets: Mapping[str, Dataset] | Dataset | None = None,
    *,
    images: int | Sequence[int] | None = None,
    classes: Sequence[str | int] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    forward_batch: int | str | None = "auto",
    memory_format: str = "auto",
    amp: bool = False,
    max_work: int | None = DEFAULT_MAX_WORK,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    progress: bool = False,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    timeout: float = 1800.0,
    meta: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    labels: str = "dataset",
) -> RunResult:
    """Run ``analysis`` on ``models`` and ``datasets``; see the module docstring.

    Args:
        analysis: an :class:`~invariscope.engine.analysis.Analysis` instance.
        models, datasets: by the names the analysis declares (``{"model": net}``); a
            single module / dataset stands for ``"model"`` / ``"data"``.
        images: N (a seeded random subset of N images) or explicit dataset indices.
        classes: only images of these classes (names or indices).
        batch_size: images per batch part (the unit of resumption).
        seed: seeds the image subset and, through the analysis, its random draws.
        device: where to run (models are moved there); default: the model's device.
        forward_batch: most images per forward pass, or ``"auto"`` (timed on the real
            model and device; see :func:`invariscope.engine.execution.tune`).
        memory_format: ``"auto"``, ``"contiguous"`` or ``"channels_last"``.
        amp: autocast the forward passes (float16 on CUDA, bfloat16 on the CPU).
        max_work: refuse a run whose analysis would forward more images than this
            (``Analysis.work``), before anything is written; None: no limit.
        out: run directory; parts are stored there and a rerun resumes. A directory
            holding another configuration is refused unless ``overwrite``.
        figures: draw the analysis's figures into ``out/figures`` (default: when ``out``).
        progress: show a progress bar (rank 0, on a terminal).
        num_workers: DataLoader workers for datasets read from files.
        rank, world_size: this process's place (default: the ``torchrun`` environment).
        timeout: seconds a rank waits for the others.
        meta: free-form facts stored in ``meta.json`` (how the model was named, ...).
        options: settings that change aggregates but not parts (``ctx.options``).
        labels: where each image's reference label comes from (stored in the run's
            configuration): ``"dataset"`` (its own labels; an ImageNet-style folder's
            WordNet-id or class-name folders are mapped onto an ImageNet model's
            outputs) or ``"model"`` (the model's own top-1 class on the untransformed
            image, for unlabeled images; computed before any part runs, in float32).
            See :mod:`invariscope.engine.selection`.
    """
    name = analysis.name
    labels = check_labels(labels)
    batch_size = _check_int("batch-size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    if forward_batch is None:
        forward_batch = "auto"
    if forward_batch != "auto":
        forward_batch = _check_int("forward-batch", forward_batch, 1)
    if memory_format not in MEMORY_FORMATS:
        raise InvariscopeError(
            f"memory format '{memory_format}' is not one of {', '.join(MEMORY_FORMATS)}"
        )
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise InvariscopeError(f"{hint('timeout', '--timeout')} must be positive, got {timeout!r}")
    num_workers = _check_int("workers", num_workers, 0)
    if max_work is not None:
        max_work = _check_int("max-work", max_work, 1)
    models = _named("models", models, analysis.models, name)
    datasets = _named("datasets", datasets, analysis.datasets, name)

    env = rank_from_env()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    _check_rank(rank, world_size)
    distributed_run = world_size > 1
    if distributed_run and out is None:
        raise InvariscopeError(
            f"a distributed {name} (world size {world_size}) needs a run directory that all "
            "ranks share; pass " + hint("out=RUN_DIR", "--out RUN_DIR")
        )
    if figures and out is None:
        raise InvariscopeError(
            "figures need a run directory; pass " + hint("out=RUN_DIR", "--out RUN_DIR")
        )
    primary = next(iter(models.values()), None)
    dev = resolve_device(device) if device is not None else None
    if dev is None:
        dev = model_device(primary) if primary is not None else torch.device("cpu")
    dev = distributed.rank_device(dev, rank, world_size)
    group = distributed.RankGroup(rank, world_size, dev)
    if distributed_run and overwrite and not group.collective:
        raise InvariscopeError(
            f"overwrite in a distributed {name} needs torch.distributed (launch the command "
            "with torchrun, or call torch.distributed.init_process_group first) so that no "
            "rank writes before rank 0 has cleared the run directory; or remove the "
            "directory and run without overwrite"
        )
    if device is not None:
        for m in models.values():
            m.to(dev)

    # the labels, the images, the plan and the configuration: all before anything is written
    datasets = _label(datasets, models, labels, images, classes, seed, dev, num_workers)
    class_names = {n: dataset_classes(d) for n, d in datasets.items()}
    indices, batches = {}, {}
    for n, d in datasets.items():
        ids = resolve_classes(classes, class_names[n])
        indices[n] = select_indices(d, images=images, classes=ids, seed=seed)
        if analysis.mixed_batches:
            indices[n] = mix_indices(indices[n], seed)
        batches[n] = [indices[n][s : s + batch_size] for s in range(0, len(indices[n]), batch_size)]
    if analysis.classifier:
        check_class_count(models["model"], class_names["data"])
    placeholder = Execution(forward_batch if isinstance(forward_batch, int) else 256)
    ctx = Context(
        models=models,
        datasets=datasets,
        device=dev,
        seed=seed,
        indices=indices,
        batches=batches,
        classes=class_names,
        execution=placeholder,
        forward=Forward(models, placeholder),
        rank=rank,
        world_size=world_size,
        options=dict(options or {}),
        num_workers=num_workers,
    )
    training = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        return _run(
            analysis,
            ctx,
            group,
            out=out,
            overwrite=overwrite,
            figures=figures,
            progress=progress,
            timeout=timeout,
            forward_batch=forward_batch,
            memory_format=memory_format,
            amp=amp,
            batch_size=batch_size,
            meta=meta,
            max_work=max_work,
            labels=labels,
        )
    finally:
        for n, m in models.items():
            m.train(training[n])


def _label(
    datasets: dict[str, Dataset],
    models: dict[str, nn.Module],
    labels: str,
    images,
    classes,
    seed: int,
    device: torch.device,
    num_workers: int,
) -> dict[str, Dataset]:
    """The datasets with the labels that ``labels`` asks for (see ``engine.selection``).

    ``"model"``: each dataset is labelled by the primary model (``"model"``, else the
    first) on the images the run selects (on every image when ``classes`` selects by
    the model's classes). ``"dataset"``: unlabeled datasets are refused, and
    ImageNet-style classes are mapped onto an ImageNet model's outputs.
    """
    if not datasets:
        return datasets
    primary = models.get("model", next(iter(models.values()), None))
    out = {}
    for n, d in datasets.items():
        if labels == "model":
            if primary is None:
                raise InvariscopeError(
                    "labels='model' takes each image's label from the model, but this "
                    "analysis has no model; use labels='dataset'"
                )
            if classes is None:
                needed = select_indices(d, images=images, classes=None, seed=seed)
            else:
                needed = np.arange(len(d))
            out[n] = label_by_model(d, primary, needed, device=device, num_workers=num_workers)
            log.info(
                "labelled %d images of %s by the model's top-1 class",
                len(needed),
                getattr(d, "name", n),
            )
            continue
        if getattr(d, "labelled", True) is False:
            raise InvariscopeError(
                f"dataset {getattr(d, 'name', n)} has no labels (images without class "
                "folders); take each image's label from the model with "
                + hint("labels='model'", "--labels model")
                + ", or sort the images into class folders"
            )
        if primary is not None:
            d, note = align_to_model(d, primary)
            if note:
                log.warning(note)
        out[n] = d
    return out


def _run(
    analysis: Analysis,
    ctx: Context,
    group,
    *,
    out,
    overwrite,
    figures,
    progress,
    timeout,
    forward_batch,
    memory_format,
    amp,
    batch_size,
    meta,
    max_work,
    labels="dataset",
) -> RunResult:
    analysis.check(ctx)
    work = analysis.work(ctx)
    if max_work is not None and work is not None and work > max_work:
        raise InvariscopeError(
            f"this {analysis.name.replace('_', '-')} run would forward {work:,} transformed images, over the limit "
            f"of {max_work:,}; use coarser ranges or fewer images, or raise the limit with "
            + hint(f"max_work={work}", f"--max-work {work}")
        )
    sample = _preflight(ctx) if analysis.classifier else None
    parts = analysis.plan(ctx)
    ids = [p.id for p in parts]
    if len(set(ids)) != len(ids):
        dup = next(p for p in ids if ids.count(p) > 1)
        raise InvariscopeError(f"{analysis.name}: part id {dup!r} is planned twice")
    config: dict[str, Any] = {"analysis": analysis.name, "version": analysis.version}
    config.update(analysis.config())
    fingerprints = {
        n: {"class": type(m).__name__, "fingerprint": model_fingerprint(m)}
        for n, m in ctx.models.items()
    }
    data = {
        n: {
            "name": getattr(d, "name", type(d).__name__),
            "fingerprint": getattr(d, "fingerprint", None),
            "size": len(d),
        }
        for n, d in ctx.datasets.items()
    }
    chosen = {
        n: {"count": len(ctx.indices[n]), "indices_sha256": _indices_hash(ctx.indices[n])}
        for n in ctx.datasets
    }
    if tuple(ctx.models) == ("model",):
        config["model"] = fingerprints["model"]
    elif ctx.models:
        config["models"] = fingerprints
    if tuple(ctx.datasets) == ("data",):
        config["data"], config["images"] = data["data"], chosen["data"]
    elif ctx.datasets:
        config["data"], config["images"] = data, chosen
    config.update(
        labels=labels,
        seed=ctx.seed,
        batch_size=batch_size,
        forward_batch=forward_batch,
        memory_format=memory_format,
        amp=bool(amp),
    )
    digest = config_hash(config)

    # how forward passes run: recorded once, reused on resume and by every rank
    execution = None
    if out is not None and ctx.rank == 0 and not overwrite:
        execution = _stored_execution(Path(out), digest)
    if execution is None and (ctx.rank == 0 or out is None):
        execution = _choose_execution(analysis, ctx, sample, forward_batch, memory_format, amp)

    run_meta = {
        "invariscope": invariscope.__version__,
        "torch": torch.__version__,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        **dict(meta or {}),
    }
    if out is not None:

        def open_rank0():
            store = RunStore(
                out, config, overwrite=overwrite, rank=0, world_size=ctx.world_size, lock=True
            )
            store.update_meta(
                {**run_meta, "execution": {**execution.to_dict(), "config_hash": digest}}
            )
            return store

        def open_other():
            store = RunStore(out, config, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)
            return store

        store = _collective(group, open_rank0 if ctx.rank == 0 else (lambda: None), "to open")
        if ctx.rank != 0:
            store = _collective(group, open_other, "to open")
            if group.collective:
                execution = _stored_execution(store.run_dir, digest)
            else:
                execution = _wait_for_execution(store, digest, timeout)
            if execution is None:
                raise InvariscopeError(
                    f"rank {ctx.rank} found no execution settings of rank 0 in {out}/meta.json; "
                    "run the same command again"
                )
        else:
            _collective(group, lambda: None, "to open")
    else:
        store = MemoryStore()
    try:
        return _compute_and_finish(
            analysis, ctx, group, store, parts, execution, config, out, figures, progress, timeout
        )
    finally:
        if isinstance(store, RunStore):
            store.close()


def _compute_and_finish(
    analysis: Analysis,
    ctx: Context,
    group,
    store,
    parts: list[Part],
    execution: Execution,
    config: dict[str, Any],
    out,
    figures,
    progress,
    timeout,
) -> RunResult:
    """Every stage's parts on every rank, then (rank 0) aggregates, figures, finalize."""
    from tqdm.auto import tqdm

    ids = [p.id for p in parts]
    ctx.execution = execution
    ctx.forward = Forward(ctx.models, execution)
    ctx.results = store

    stages = sorted({p.stage for p in parts})
    written: list[str] = []
    show = progress and ctx.rank == 0
    bar = tqdm(total=0, disable=None if show else True, unit="part", leave=False)
    ctx.forward.set_format(True)
    try:
        for stage in stages:
            stage_ids = [p.id for p in parts if p.stage == stage]

            def listing(stage_ids=stage_ids):
                if group.collective:
                    return store.shard(store.pending(stage_ids))
                if isinstance(store, MemoryStore):
                    return store.pending(stage_ids)
                return store.pending(store.shard(stage_ids))

            todo = _collective(group, listing, "to list its parts")
            if bar.total is not None:
                bar.total += len(todo)
                bar.refresh()
            done = _collective(
                group, lambda todo=todo: set(_compute(analysis, ctx, store, parts, todo, bar))
            )
            written += [pid for pid in todo if pid in done]
            if ctx.world_size > 1 and not group.collective and stage != stages[-1]:
                distributed.wait_for_parts(store, stage_ids, timeout=timeout)
    finally:
        bar.close()
        ctx.forward.set_format(False)

    run_dir = Path(out) if out is not None else None
    common = dict(
        analysis=analysis.name,
        part_tables=analysis.part_tables,
        aggregate_tables=analysis.aggregate_tables,
        config=config,
        execution=execution,
    )
    if ctx.rank != 0:
        return RunResult(
            {}, run_dir, {}, [], ctx.rank, ctx.world_size, False, written, store, **common
        )
    if ctx.world_size > 1 and not group.collective:
        distributed.wait_for_parts(store, ids, timeout=timeout)
    with torch.inference_mode():
        aggregates = analysis.aggregate(ctx)
    summary = analysis.summary(aggregates, ctx)
    for table_name, table in aggregates.items():
        store.write_aggregate(table_name, table)
    drawn: list[Path] = []
    if out is not None and (figures if figures is not None else True):
        from invariscope.engine.registry import find_analysis

        entry = find_analysis(analysis.name)  # an unregistered analysis has no figures
        render = None if entry is None else entry.render()
        if render is not None:
            drawn = list(render(Path(out), store.path("figures")))
    if out is not None:
        store.finalize(summary, expected_parts=ids)
    return RunResult(
        aggregates, run_dir, summary, drawn, 0, ctx.world_size, True, written, store, **common
    )
