"""Shared machinery of sweeps: input checks, image selection, batching, batched predictions,
and how the ranks of a distributed sweep meet (:class:`RankGroup`, :func:`init_distributed`).

Private to :mod:`invariscope.measure.sweep` and :mod:`invariscope.measure.worst_case`.
Everything here works on whole batches on the model's device; the only Python loops
run over batches and magnitude chunks, never over images.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from invariscope.data.batches import iter_index_batches as iter_batches  # noqa: F401
from invariscope.errors import InvariscopeError, unknown_name

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ model checks


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class name and ``state_dict`` (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_classes(dataset: Dataset) -> list[str]:
    """Class names of ``dataset`` (``dataset.classes``); an error when it has none."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise InvariscopeError(
            f"dataset {type(dataset).__name__} has no 'classes' attribute; give it a list of "
            "class names (index = label)"
        )
    return [str(c) for c in classes]


def check_logits(logits: object, batch: int, num_classes: int, where: str) -> torch.Tensor:
    """Return ``logits`` if it is a finite float tensor ``[batch, num_classes]``, else raise."""
    if not isinstance(logits, torch.Tensor):
        raise InvariscopeError(
            f"the model returned {type(logits).__name__}, not a logits tensor "
            f"[B, {num_classes}]; wrap it so that forward returns the logits only"
        )
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise InvariscopeError(
            f"the model output has shape {list(logits.shape)} for a batch of {batch}; it must be "
            f"logits [B, num_classes] = [{batch}, {num_classes}] (flatten or select the logits)"
        )
    if logits.shape[1] != num_classes:
        raise InvariscopeError(
            f"the model outputs {logits.shape[1]} classes but the dataset has {num_classes}; "
            "use a model trained on this dataset (or a dataset with matching classes)"
        )
    if not torch.isfinite(logits).all():
        bad = "NaN" if torch.isnan(logits).any() else "infinite"
        raise InvariscopeError(
            f"the model returned {bad} logits ({where}); check the model weights and its "
            "input normalisation"
        )
    return logits


# --------------------------------------------------------------------- image selection


def stored_labels(dataset: Dataset) -> np.ndarray | None:
    """The labels a dataset keeps in memory (``labels``, ``targets`` or ``samples`` of
    ``(path, label)`` pairs) as int64 ``[N]``, or None (without reading any image)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        samples = getattr(dataset, "samples", None)
        if isinstance(samples, Sequence) and len(samples) == len(dataset):
            try:
                labels = [int(s[1]) for s in samples]
            except (TypeError, ValueError, IndexError):
                labels = None
    if labels is None:
        return None
    out = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    return out if len(out) == len(dataset) else None


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """All labels of ``dataset`` as int64 ``[N]`` (reads every item if it keeps no label list)."""
    labels = stored_labels(dataset)
    if labels is not None:
        return labels
    log.info("reading every item of %s to find its labels", type(dataset).__name__)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def resolve_classes(spec: Sequence[str | int] | None, classes: Sequence[str]) -> list[int] | None:
    """Class indices for ``spec`` (class names or indices; a name wins over an index)."""
    if spec is None:
        return None
    if isinstance(spec, str | int):
        spec = [spec]
    out = []
    for item in spec:
        text = str(item).strip()
        if text in classes:
            out.append(list(classes).index(text))
            continue
        try:
            index = int(text)
        except ValueError:
            raise unknown_name("class", text, classes) from None
        if not 0 <= index < len(classes):
            raise InvariscopeError(
                f"class index {index} is outside 0..{len(classes) - 1}; pass a class name or index "
                f"of this dataset ({', '.join(list(classes)[:10])}{', ...' if len(classes) > 10 else ''})"
            )
        out.append(index)
    if not out:
        raise InvariscopeError("--classes is empty; name at least one class or leave it out")
    return sorted(set(out))


def select_indices(
    dataset: Dataset,
    *,
    images: int | Sequence[int] | None,
    classes: list[int] | None,
    seed: int,
) -> np.ndarray:
    """Dataset indices to measure, grouped by class.

    ``images`` is ``None`` (all), a count N (a seeded random subset of N of the images of
    the selected ``classes``; all of them if there are fewer) or explicit indices. The
    result is sorted by (label, index) when the dataset keeps its labels in memory, so
    that a batch holds few classes and the per-class softmax sums of a part stay small
    for 1000-class models; by index otherwise.
    """
    n = len(dataset)
    if n == 0:
        raise InvariscopeError("the dataset is empty; check --data (and its path or split)")
    if images is not None and not isinstance(images, int | np.integer):
        idx = np.unique(np.asarray(list(images), dtype=np.int64))
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= n:
            raise InvariscopeError(f"image indices must lie in 0..{n - 1}; got {list(images)[:5]}")
    else:
        idx = np.arange(n, dtype=np.int64)
    if classes is not None:
        labels = dataset_labels(dataset)
        idx = idx[np.isin(labels[idx], classes)]
        if len(idx) == 0:
            raise InvariscopeError(
                "no image of the selected --classes is in the dataset; check --classes"
            )
    if isinstance(images, int | np.integer) and not isinstance(images, bool):
        if images < 1:
            raise InvariscopeError(f"--images must be at least 1, got {images}")
        if images < len(idx):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
            idx = np.sort(rng.choice(idx, size=int(images), replace=False))
    labels = stored_labels(dataset)
    if labels is not None:
        idx = idx[np.argsort(labels[idx], kind="stable")]
    return idx


# ----------------------------------------------------------------------------- batches


def check_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Refuse images outside ``[0, 1]`` (with a hint) and labels outside the class range."""
    if images.dim() != 4:
        raise InvariscopeError(
            f"dataset images must be [C, H, W] tensors, got batch shape {list(images.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvariscopeError(
            f"dataset label {int(labels.max() if labels.max() >= num_classes else labels.min())} "
            f"is outside 0..{num_classes - 1}; the dataset's classes do not match its labels"
        )


# ------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """Predictions of one forward chunk, on the CPU: ``n`` rows, ``k`` top classes, K classes."""

    pred: torch.Tensor  # [n] int64
    p_true: torch.Tensor  # [n] float32
    correct: torch.Tensor  # [n] bool
    top_class: torch.Tensor  # [n, k] int64
    top_prob: torch.Tensor  # [n, k] float32


def predict_chunk(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    top_k: int,
    where: str,
) -> tuple[Predictions, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass: ``(Predictions on the CPU, probabilities [n, K], correct [n] bool,
    p_true [n])``, the last three on the device."""
    logits = check_logits(model(images), images.shape[0], num_classes, where)
    probs = torch.softmax(logits.float(), dim=1)
    k = min(top_k, num_classes)
    top_prob, top_class = probs.topk(k, dim=1)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    pred = top_class[:, 0]
    correct = pred == labels
    out = Predictions(
        pred=pred.cpu(),
        p_true=p_true.cpu(),
        correct=correct.cpu(),
        top_class=top_class.cpu(),
        top_prob=top_prob.cpu(),
    )
    return out, probs, correct, p_true


def prediction_columns(p: Predictions) -> dict[str, np.ndarray]:
    """Record columns ``pred, p_true, correct, top{i}_class, top{i}_prob`` from predictions."""
    cols: dict[str, np.ndarray] = {
        "pred": p.pred.numpy().astype(np.int64),
        "p_true": p.p_true.numpy().astype(np.float32),
        "correct": p.correct.numpy().astype(bool),
    }
    classes = p.top_class.numpy().astype(np.int32)
    probs = p.top_prob.numpy().astype(np.float32)
    for i in range(classes.shape[1]):
        cols[f"top{i + 1}_class"] = classes[:, i]
        cols[f"top{i + 1}_prob"] = probs[:, i]
    return cols


def concat_columns(chunks: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """One DataFrame from column dictionaries with the same keys."""
    if not chunks:
        return pd.DataFrame()
    return pd.DataFrame({key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]})


# ------------------------------------------------------------------------ random draws

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def uniform_per_image(seed: int, indices: np.ndarray, count: int, stream: int = 0) -> np.ndarray:
    """Uniform ``[0, 1)`` draws ``[B, count]`` that depend only on (seed, stream, index, draw).

    A counter-based generator (SplitMix64 hashing), so an image gets the same draws
    whichever batch it is in and whether or not the run was resumed.
    """
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed, stream], dtype=np.uint64)).astype(np.uint64)
        key = _splitmix64(base[0] ^ _splitmix64(np.asarray(indices, dtype=np.uint64) ^ base[1]))
        draws = np.arange(count, dtype=np.uint64)
        h = _splitmix64(key[:, None] ^ _splitmix64(draws + np.uint64(0x632BE59BD9B4E019))[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ------------------------------------------------------------------------- distribution


def rank_device(device: torch.device, rank: int, world_size: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a bare ``cuda`` in a distributed job.

    One process per GPU, as ``torchrun`` starts them: ``LOCAL_RANK`` (set by torchrun;
    ``rank`` modulo the number of GPUs without it) picks the GPU. An explicit index
    (``cuda:1``) and other devices are kept; a GPU index that does not exist is an error.
    """
    if device.type != "cuda" or world_size <= 1 or device.index is not None:
        return device
    count = torch.cuda.device_count()
    local = os.environ.get("LOCAL_RANK", "")
    index = int(local) if local.strip().isdigit() else rank % max(count, 1)
    if index >= count:
        raise InvariscopeError(
            f"rank {rank} needs GPU cuda:{index} (LOCAL_RANK) but this machine has {count}; "
            f"start at most {count} processes per node (torchrun --nproc_per_node {count})"
        )
    return torch.device("cuda", index)


def init_distributed(device: torch.device, *, timeout: float = 1800.0) -> bool:
    """Start ``torch.distributed`` for a ``torchrun`` launch; True when this call started it.

    Only when the environment describes a job of several processes (``WORLD_SIZE > 1``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` set, as torchrun does) and no process group
    exists yet: ``nccl`` for a CUDA ``device`` (made the current device first), ``gloo``
    otherwise. ``timeout`` (seconds) bounds every collective, i.e. how long a rank waits
    for the slowest one. Whoever gets True calls
    ``torch.distributed.destroy_process_group()`` at the end.
    """
    import torch.distributed as dist

    from invariscope.runs.store import rank_from_env

    info = rank_from_env()
    if info.world_size <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        return False  # not a torchrun launch: the ranks meet through the run directory
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return True


class RankGroup:
    """How the ranks of a distributed sweep meet.

    With an initialised ``torch.distributed`` process group of ``world_size`` processes
    (``collective`` True) :meth:`failed_ranks` is a collective (an ``all_reduce``, i.e. a
    barrier that also tells every rank which ranks failed). Without one (``collective``
    False) it is local: the ranks meet only through the run directory, where rank 0
    waits for the other ranks' parts (:func:`wait_for_parts`).

    Args:
        rank, world_size: this process's place in the job.
        device: the sweep's device (the collectives of an ``nccl`` group run there).
    """

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size = rank, world_size
        self.collective = False
        self._device = torch.device("cpu")
        if world_size <= 1:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise InvariscopeError(
                f"rank={rank}, world_size={world_size} do not match the torch.distributed "
                f"process group (rank {dist.get_rank()} of {dist.get_world_size()}); leave "
                "rank and world_size unset under torchrun"
            )
        self.collective = True
        if "nccl" in str(dist.get_backend()).lower():
            self._device = (
                device
                if device.type == "cuda"
                else torch.device("cuda", torch.cuda.current_device())
            )

    def failed_ranks(self, failed: bool) -> list[int]:
        """The ranks that report ``failed`` (every rank must call it: a barrier)."""
        if not self.collective:
            return [self.rank] if failed else []
        import torch.distributed as dist

        flags = torch.zeros(self.world_size, dtype=torch.int64, device=self._device)
        flags[self.rank] = int(failed)
        dist.all_reduce(flags)
        return [int(r) for r in torch.nonzero(flags.cpu()).flatten()]


def wait_for_parts(store, part_ids: Sequence[str], *, timeout: float, poll: float = 0.2) -> None:
    """Rank 0 without a process group: wait until every part of ``part_ids`` is done.

    ``timeout`` counts seconds without progress: the clock restarts whenever another
    part is done, so a long sweep does not time out while the ranks still make headway.
    A timeout is an :class:`InvariscopeError` naming the first missing part (the run
    stays incomplete; running the same command again resumes it).
    """
    missing = store.pending(part_ids)
    deadline = time.monotonic() + timeout
    while missing:
        if time.monotonic() > deadline:
            raise InvariscopeError(
                f"rank 0 waited {timeout:g} s without a new part from the other ranks: "
                f"{len(missing)} of {len(part_ids)} parts are not done (first: {missing[0]}); "
                "check the other ranks' errors, then run the same command again on all ranks "
                "to resume"
            )
        time.sleep(poll)
        now_missing = store.pending(missing)
        if len(now_missing) < len(missing):
            deadline = time.monotonic() + timeout
        missing = now_missing
