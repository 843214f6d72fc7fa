"""Dataset base classes, the dataset record, seeding and fingerprint helpers.

Every dataset of :mod:`invariscope.data` is a :class:`torch.utils.data.Dataset` whose
items are ``(image, label)``: ``image`` a float32 tensor ``[C, H, W]`` in ``[0, 1]``,
``label`` a Python ``int``. Each also has ``classes`` (list of class names, index =
label), ``name``, ``split`` (``"train"`` or ``"test"``), ``seed`` and ``fingerprint``
(a sha256 hex digest that changes whenever the data could differ).

Convention:
    Images are ``[C, H, W]``, channel first, values in ``[0, 1]``; grayscale sets have
    ``C = 1`` with a white (1) foreground on a black (0) background, as MNIST. Pixel
    coordinates have their origin at the centre of the top-left pixel, x to the right,
    y down (see ``shared/DESIGN.md``).

All randomness comes from explicit generators made by :func:`make_rng` from the
user's seed and fixed tags, never from the global RNG, so a dataset is a pure
function of its arguments.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset

from invariscope.errors import InvariscopeError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """One row of the ``invariscope datasets`` listing.

    ``channels``, ``image_size`` (side of the square images) and ``num_classes`` are
    ``None`` where they depend on the files read (image folders).
    """

    name: str
    description: str
    channels: int | None
    image_size: int | None
    num_classes: int | None


def check_split(split: str) -> str:
    """Return ``split`` if it is ``"train"`` or ``"test"``, else raise InvariscopeError."""
    if split not in SPLITS:
        raise InvariscopeError(f"unknown split '{split}'; use 'train' or 'test'")
    return split


def check_seed(seed: int) -> int:
    """Return ``seed`` as an int if it is a non-negative integer, else raise."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InvariscopeError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_size(size: int | None) -> int | None:
    """Return ``size`` if it is ``None`` or a positive integer, else raise."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise InvariscopeError(f"dataset size must be a positive integer, got {size!r}")
    return int(size)


def make_rng(seed: int, *tags: str | int) -> np.random.Generator:
    """A numpy Generator determined by ``seed`` and the ``tags`` only.

    Tags (strings are reduced with CRC32, which is stable across processes and
    platforms) give independent streams for, e.g., the train and test split of the
    same seed.

    >>> bool(make_rng(0, "glyphs", "train").random() == make_rng(0, "glyphs", "train").random())
    True
    """
    words = [check_seed(seed)]
    for tag in tags:
        words.append(zlib.crc32(tag.encode()) if isinstance(tag, str) else int(tag))
    return np.random.default_rng(np.random.SeedSequence(words))


def subset_indices(n: int, size: int | None, seed: int, *tags: str) -> np.ndarray:
    """Indices (ascending) of a seeded random subset of ``size`` of ``n`` items.

    ``size=None`` or ``size == n`` selects everything in order; ``size > n`` raises
    InvariscopeError (a fixed dataset cannot be enlarged).
    """
    if size is None or size == n:
        return np.arange(n)
    if size > n:
        what = " ".join(str(t) for t in tags)
        raise InvariscopeError(f"{what} has only {n} images; ask for size <= {n}")
    return np.sort(make_rng(seed, "subset", *tags).choice(n, size=size, replace=False))


def digest(*parts: object) -> str:
    """sha256 hex digest of ``parts`` (str/int/float/None as text, arrays as bytes).

    Arrays and tensors contribute their dtype, shape and raw bytes, so two arrays with
    the same bytes but different shapes hash differently.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            arr = np.ascontiguousarray(part)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(memoryview(arr).cast("B"))
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


class ImageDataset(Dataset):
    """Base class: ``ds[i] -> (image float32 [C, H, W] in [0, 1], label int)``.

    Subclasses set ``name``, ``split``, ``seed``, ``classes`` and implement
    ``__len__``, ``__getitem__`` and ``_fingerprint``.
    """

    name: str
    split: str
    seed: int
    classes: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex digest of the name, split, seed, size and the data."""
        return self._fingerprint()

    def _fingerprint(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"seed={self.seed}, len={len(self)}, classes={len(self.classes)})"
        )


class TensorImageDataset(ImageDataset):
    """An in-memory dataset: ``images`` ``[N, C, H, W]`` float32 in ``[0, 1]``, ``labels`` ``[N]``.

    Args:
        images: float32 tensor ``[N, C, H, W]`` with values in ``[0, 1]``.
        labels: integer tensor ``[N]`` with values in ``[0, len(classes))``; stored as int64.
        classes: class names, index = label.
        name, split, seed: recorded as given and part of the fingerprint.

    The fingerprint hashes ``name``, ``split``, ``seed``, ``N`` and the bytes of
    ``images`` and ``labels``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: list[str],
        name: str,
        split: str,
        seed: int = 0,
    ) -> None:
        if images.ndim != 4 or images.dtype != torch.float32:
            raise ValueError(
                f"images must be float32 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be [N] with N={images.shape[0]}, got {tuple(labels.shape)}"
            )
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def _fingerprint(self) -> str:
        return digest(
            self.name, self.split, self.seed, len(self), self.classes, self.images, self.labels
        )


def centre_by_mass(images: np.ndarray, max_shift: int) -> np.ndarray:
    """Shift each image by whole pixels so that its centre of mass is the image centre.

    As MNIST was made: the digit's intensity-weighted centre is moved to the centre
    ``((W - 1) / 2, (H - 1) / 2)`` (rounded to the nearest whole-pixel shift, at most
    ``max_shift`` pixels per axis, so that nothing is pushed out of a zero border of
    that width). Pixels moved in from outside are zero.

    Args:
        images: ``[N, H, W]`` non-negative array.
        max_shift: largest shift per axis in pixels.

    Returns:
        ``[N, H, W]`` array of the same dtype.
    """
    n, h, w = images.shape
    out = np.zeros_like(images)
    ys, xs = np.arange(h), np.arange(w)
    mass = images.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    cy = (images.sum(axis=2) * ys).sum(axis=1) / safe
    cx = (images.sum(axis=1) * xs).sum(axis=1) / safe
    dy = np.clip(np.rint((h - 1) / 2 - cy), -max_shift, max_shift).astype(int)
    dx = np.clip(np.rint((w - 1) / 2 - cx), -max_shift, max_shift).astype(int)
    dy[mass <= 0] = 0
    dx[mass <= 0] = 0
    for i in range(n):
        sy, sx = dy[i], dx[i]
        src = images[i, max(0, -sy) : h - max(0, sy), max(0, -sx) : w - max(0, sx)]
        out[i, max(0, sy) : max(0, sy) + src.shape[0], max(0, sx) : max(0, sx) + src.shape[1]] = src
    return out
