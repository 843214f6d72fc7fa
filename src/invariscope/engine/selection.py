"""Which images a run measures: class names, labels, the seeded subset, the batches.

The engine owns image selection (``--images``, ``--classes``, ``--batch-size``), so every
analysis measures the same images for the same settings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from invariscope.errors import InvariscopeError, unknown_name

log = logging.getLogger(__name__)

__all__ = [
    "check_images",
    "dataset_classes",
    "dataset_labels",
    "resolve_classes",
    "select_indices",
    "stored_labels",
]


def dataset_classes(dataset: Dataset) -> list[str]:
    """Class names of ``dataset`` (``dataset.classes``); an error when it has none."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise InvariscopeError(
            f"dataset {type(dataset).__name__} has no 'classes' attribute; give it a list of "
            "class names (index = label)"
        )
    return [str(c) for c in classes]


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
