"""Which images a run measures: class names, labels, the seeded subset, the batches.

The engine owns image selection (``--images``, ``--classes``, ``--batch-size``), so every
analysis measures the same images for the same settings.

It also owns where each image's reference label comes from (``labels``):

* ``"dataset"`` (default): the dataset's own labels. When the model's class names are
  the ImageNet-1k classes and every class of the dataset names one by WordNet id or
  class name (an ImageNet-style folder, ``n01440764/``, ``tench/``), the labels are
  mapped onto the model's output indices (:func:`align_to_model`), so that a folder of
  10 ImageNet classes is scored against the right 10 of the model's 1000 outputs.
* ``"model"``: the model's own top-1 class on the untransformed image
  (:func:`label_by_model`), for unlabeled images: an analysis then measures how
  transformations change the model's own decision (accuracy on the untransformed
  images is 1 by construction).

Both give a :class:`RelabelledDataset`, a view of the dataset with other labels and the
model's class names, whose fingerprint covers the new labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from invariscope.data.base import digest
from invariscope.data.batches import iter_index_batches
from invariscope.data.imagenet import (
    imagenet_classes,
    imagenet_index,
    imagenet_label_map,
    is_imagenet_classes,
)
from invariscope.errors import InvariscopeError, hint, unknown_name

log = logging.getLogger(__name__)

__all__ = [
    "LABEL_MODES",
    "RelabelledDataset",
    "align_to_model",
    "check_class_count",
    "check_labels",
    "check_images",
    "dataset_classes",
    "dataset_labels",
    "imagenet_mismatch",
    "label_by_model",
    "mix_indices",
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


def mix_indices(indices: np.ndarray, seed: int) -> np.ndarray:
    """``indices`` in a random order drawn from ``seed`` (the same for every rank and
    every resumption), for batches whose statistic assumes i.i.d. images.

    :func:`select_indices` groups the images by class; cut into consecutive batches, a
    batch then holds one or two classes, and a per-batch statistic such as the unbiased
    HSIC of CKA measures within-class similarity instead of that of the data.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x313C]))
    return np.asarray(indices, dtype=np.int64)[rng.permutation(len(indices))]


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


# ------------------------------------------------------------------------------ labels

#: Where the reference label of each image comes from (``labels=`` / ``--labels``).
LABEL_MODES = ("dataset", "model")

#: Images per forward pass when labelling by the model (fixed: every rank and every
#: resumption computes the same labels in the same batches).
LABEL_CHUNK = 64


def check_labels(labels: Any) -> str:
    """``labels`` if it is one of :data:`LABEL_MODES`, else a one-line error."""
    if labels not in LABEL_MODES:
        raise InvariscopeError(
            f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}; "
            + hint("pass labels='dataset' or labels='model'", "pass --labels dataset|model")
        )
    return str(labels)


class RelabelledDataset(Dataset):
    """A view of ``base`` with other labels and class names; the images are base's.

    Args:
        base: the dataset (in memory or read from files).
        labels: int64 ``[len(base)]``; -1 marks an image without a label (one that was
            not selected for labelling by the model); reading it is an error.
        classes: the class names the labels index.
        how: what made the labels (part of the fingerprint).

    ``labels`` is a tensor (so batches of an in-memory base are sliced from ``images``
    and ``labels``); other attributes (``images``, ``split``, ``params``, ``files``, ...)
    are the base's. The fingerprint hashes the base's, ``how``, the classes and labels.
    """

    def __init__(
        self, base: Dataset, labels: np.ndarray, classes: Sequence[str], *, how: str
    ) -> None:
        self.base = base
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.classes = [str(c) for c in classes]
        self.how = how
        self.name = getattr(base, "name", type(base).__name__)
        self.labelled = True
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        label = int(self.labels[index])
        if label < 0:
            raise InvariscopeError(
                f"image {index} of {self.name} has no label: only the images selected for "
                "the run are labelled by the model"
            )
        return self.base[index][0], label

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("base", "labels", "classes", "how"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def fingerprint(self) -> str:
        """sha256 of the base's fingerprint, ``how``, the classes and the labels."""
        if self._fingerprint is None:
            base = getattr(self.base, "fingerprint", None)
            self._fingerprint = digest(base, self.how, self.classes, self.labels)
        return self._fingerprint

    def __repr__(self) -> str:
        return f"RelabelledDataset({self.base!r}, how={self.how!r})"


def _model_classes(model: nn.Module) -> list[str] | None:
    names = getattr(model, "class_names", None)
    return [str(c) for c in names] if names else None


def _preview(pairs: Sequence[str], limit: int = 4) -> str:
    return ", ".join(pairs[:limit]) + (f", ... ({len(pairs)} in all)" if len(pairs) > limit else "")


def align_to_model(dataset: Dataset, model: nn.Module) -> tuple[Dataset, str | None]:
    """Map an ImageNet-style dataset's labels onto an ImageNet model's outputs.

    When the model's class names are the ImageNet-1k classes and every class of
    ``dataset`` names one (WordNet id or class name; see
    :func:`invariscope.data.imagenet.imagenet_label_map`), returns a
    :class:`RelabelledDataset` whose labels are the model's indices and whose classes
    are the model's names, with a one-line note saying what was mapped. Otherwise
    returns ``(dataset, None)`` unchanged.
    """
    classes = getattr(dataset, "classes", None)
    names = _model_classes(model)
    if not classes or names is None:
        return dataset, None
    mapping = imagenet_label_map([str(c) for c in classes], names)
    if mapping is None:
        return dataset, None
    old = dataset_labels(dataset)
    table = np.asarray(mapping, dtype=np.int64)
    new = np.where(old >= 0, table[np.clip(old, 0, len(table) - 1)], -1)
    pairs = [f"{c} -> {m} ({names[m]})" for c, m in zip(classes, mapping, strict=True)]
    note = (
        f"mapped the {len(classes)} classes of dataset {getattr(dataset, 'name', '')} onto "
        f"the model's ImageNet outputs: {_preview(pairs)}"
    )
    how = "imagenet:" + ",".join(map(str, mapping))
    return RelabelledDataset(dataset, new, names, how=how), note


def imagenet_mismatch(dataset_classes: Sequence[str], model: nn.Module) -> str | None:
    """For an ImageNet model and a dataset of other classes: which dataset classes are
    not ImageNet WordNet ids or names (a hint for the class-count error), else None."""
    names = _model_classes(model)
    if names is None or not is_imagenet_classes(names):
        return None
    unknown = [str(c) for c in dataset_classes if imagenet_index(str(c)) is None]
    if not unknown:
        return None
    return (
        "name the class folders by ImageNet WordNet id or class name (e.g. n01440764 or "
        f"{imagenet_classes()[0]}) to map them onto the model's outputs (not: "
        f"{_preview(unknown)}), or take the model's own labels with "
        + hint("labels='model'", "--labels model")
    )


def check_class_count(model: nn.Module, classes: Sequence[str]) -> None:
    """Refuse a classifier whose class count (``model.num_classes``) is not the number of
    the dataset's ``classes`` (with a hint for ImageNet models and other class names)."""
    model_classes = getattr(model, "num_classes", None)
    k = len(classes)
    if isinstance(model_classes, int) and model_classes != k:
        fix = imagenet_mismatch(classes, model) or (
            "use a model trained on this dataset (or a dataset with matching classes)"
        )
        raise InvariscopeError(
            f"the model has {model_classes} classes but the dataset has {k}; {fix}"
        )


def label_by_model(
    dataset: Dataset,
    model: nn.Module,
    indices: np.ndarray,
    *,
    device: torch.device,
    num_workers: int = 0,
) -> RelabelledDataset:
    """The model's top-1 class on each untransformed image of ``indices`` as its label.

    The model runs in eval mode (restored after), float32, in batches of
    :data:`LABEL_CHUNK` images in ``indices`` order, so every rank and every resumption
    computes the same labels. Images not in ``indices`` get -1 (no label). The classes
    are the model's ``class_names`` (``"0" .. "K-1"`` for a network without names).
    """
    labels = np.full(len(dataset), -1, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    chunks = [indices[s : s + LABEL_CHUNK] for s in range(0, len(indices), LABEL_CHUNK)]
    k = None
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _, x, _, idx in iter_index_batches(dataset, chunks, num_workers=num_workers):
                logits = model(x.to(device))
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise InvariscopeError(
                        f"labels='model' needs a classifier returning logits [B, K], got "
                        f"{type(logits).__name__} {list(getattr(logits, 'shape', []))}"
                    )
                k = int(logits.shape[1])
                labels[idx.numpy()] = logits.float().argmax(dim=1).cpu().numpy()
    finally:
        model.train(training)
    names = _model_classes(model)
    if names is None or (k is not None and len(names) != k):
        names = [str(i) for i in range(k or 0)]
    return RelabelledDataset(dataset, labels, names, how="model-top1")
