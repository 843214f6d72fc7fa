"""``digits``: scikit-learn's bundled handwritten digits, made to look like MNIST.

The 1,797 8x8 digits of :func:`sklearn.datasets.load_digits` (values 0..16) are
scaled to ``[0, 1]``, resized with a smooth bicubic filter to 20x20, put in a 28x28
canvas with a zero border and shifted by whole pixels so that their centre of mass
is the image centre, as MNIST was made. White digit on black, ``[1, 28, 28]``.

The train/test split is fixed: stratified by class, 80/20, drawn once with
:data:`SPLIT_SEED` so that every user gets the same 1,437 training and 360 test
images whatever ``seed`` they pass (``seed`` only picks the subset when ``size`` is
smaller than the split).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from invariscope.data.base import (
    TensorImageDataset,
    centre_by_mass,
    check_seed,
    check_size,
    check_split,
    subset_indices,
)

SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SIZE = 28
DIGIT_BOX = 20
CLASSES = [str(d) for d in range(10)]


def upsample_digits(
    images: np.ndarray, *, box: int = DIGIT_BOX, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Resize 8x8 digits (values 0..16) to ``box`` x ``box`` centred in ``size`` x ``size``.

    Args:
        images: ``[N, 8, 8]`` array with values in ``[0, 16]``.
        box: side of the resized digit (MNIST: 20).
        size: side of the output canvas (MNIST: 28).

    Returns:
        float32 ``[N, 1, size, size]`` in ``[0, 1]``: bicubic resize (clamped), zero
        border, then a whole-pixel shift putting the centre of mass at the centre.
    """
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(box, box), mode="bicubic", align_corners=False).clamp(0, 1)
    pad = (size - box) // 2
    x = F.pad(x, (pad, size - box - pad, pad, size - box - pad))
    centred = centre_by_mass(x[:, 0].numpy(), max_shift=pad)
    return torch.from_numpy(centred)[:, None].contiguous()


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """All 1,797 images ``[N, 1, 28, 28]``, labels ``[N]``, train and test indices (cached)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = upsample_digits(bunch.images)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=bunch.target,
        random_state=SPLIT_SEED,
        shuffle=True,
    )
    return images, labels, np.asarray(train_idx), np.asarray(test_idx)


def split_indices(split: str) -> np.ndarray:
    """Indices into scikit-learn's 1,797 digits of the fixed ``split`` (shuffled order)."""
    _, _, train_idx, test_idx = _digits()
    return (train_idx if check_split(split) == "train" else test_idx).copy()


def load_digits(
    split: str = "train", *, size: int | None = None, seed: int = 0
) -> TensorImageDataset:
    """The ``digits`` dataset: ``[1, 28, 28]`` MNIST-like images of scikit-learn's digits.

    Args:
        split: ``"train"`` (1,437 images) or ``"test"`` (360 images); fixed, stratified.
        size: take a seeded random subset of this many images of the split (in split
            order); ``None`` for all of it.
        seed: picks the subset when ``size`` is given; it does not change the split.

    >>> ds = load_digits("test")
    >>> len(ds), tuple(ds[0][0].shape), ds.classes[:3]
    (360, (1, 28, 28), ['0', '1', '2'])
    """
    check_split(split)
    seed = check_seed(seed)
    size = check_size(size)
    images, labels, _, _ = _digits()
    idx = split_indices(split)
    idx = idx[subset_indices(len(idx), size, seed, "digits", split)]
    index = torch.as_tensor(idx)
    return TensorImageDataset(
        images[index].clone(),
        labels[index].clone(),
        classes=CLASSES,
        name="digits",
        split=split,
        seed=seed,
    )
