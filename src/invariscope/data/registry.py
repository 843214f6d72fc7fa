"""``create_dataset(name, split, ...)`` and ``list_datasets()``: one entry point for all data.

Names:

- generated: ``digits``, ``glyphs``, ``shapes`` (keyword ``image_size=32|64``);
- real photographs shipped with installed packages, with ImageNet-1k labels: ``photos``
  (keyword ``image_size``, default 224; see :mod:`invariscope.data.photos`);
- perturbed (Finnveden et al.): ``rotated-<base>``, ``translated-<base>``,
  ``scaled-<base>`` with base ``digits``, ``glyphs`` or ``mnist:<dir>`` (keyword
  ``clutter=False`` leaves the clutter out);
- files: ``mnist:<dir>``, ``cifar10:<dir>``, ``folder:<dir>`` (keywords ``image_size``,
  ``mode``, ``unlabeled``), and a bare existing directory path, read as ``folder:<dir>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invariscope.data.base import DatasetInfo, ImageDataset, check_seed, check_size, check_split
from invariscope.errors import InvariscopeError, hint, unknown_name

GENERATED = ("digits", "glyphs", "shapes")
PHOTOS = "photos"
PERTURBED_BASES = ("digits", "glyphs", "mnist:<dir>")
FILE_FORMATS = ("mnist", "cifar10", "folder")


def _load_digits(split: str, size: int | None, seed: int, **kw: Any) -> ImageDataset:
    from invariscope.data.digits import load_digits

    return load_digits(split, size=size, seed=seed, **kw)


def _load_glyphs(split: str, size: int | None, seed: int, **kw: Any) -> ImageDataset:
    from invariscope.data.glyphs import load_glyphs

    return load_glyphs(split, size=size, seed=seed, **kw)


def _load_shapes(split: str, size: int | None, seed: int, **kw: Any) -> ImageDataset:
    from invariscope.data.shapes import load_shapes

    return load_shapes(split, size=size, seed=seed, **kw)


def _load_photos(split: str, size: int | None, seed: int, **kw: Any) -> ImageDataset:
    from invariscope.data.photos import load_photos

    return load_photos(split, size=size, seed=seed, **kw)


def _load_mnist(root: str, split: str, size: int | None, seed: int, **kw: Any) -> ImageDataset:
    from invariscope.data.formats import load_mnist

    return load_mnist(root, split, size=size, seed=seed, **kw)


def _load_cifar10(root: str, split: str, size: int | None, seed: int, **kw: Any) -> ImageDataset:
    from invariscope.data.formats import load_cifar10

    return load_cifar10(root, split, size=size, seed=seed, **kw)


def _load_folder(root: str, split: str, size: int | None, seed: int, **kw: Any) -> ImageDataset:
    from invariscope.data.formats import ImageFolderDataset

    return ImageFolderDataset(root, split, size=size, seed=seed, name=f"folder:{root}", **kw)


_GENERATED: dict[str, tuple[Callable[..., ImageDataset], tuple[str, ...]]] = {
    "digits": (_load_digits, ()),
    "glyphs": (_load_glyphs, ()),
    "shapes": (_load_shapes, ("image_size",)),
    "photos": (_load_photos, ("image_size",)),
}
_FORMATS: dict[str, tuple[Callable[..., ImageDataset], tuple[str, ...]]] = {
    "mnist": (_load_mnist, ()),
    "cifar10": (_load_cifar10, ()),
    "folder": (_load_folder, ("image_size", "mode", "unlabeled")),
}
_PERTURBED_OPTIONS = ("clutter",)


def known_names() -> list[str]:
    """Every accepted name pattern (for error messages and the listing)."""
    perturbed = [f"{k}-{b}" for k in ("rotated", "translated", "scaled") for b in PERTURBED_BASES]
    return [*GENERATED, PHOTOS, *perturbed, *(f"{f}:<dir>" for f in FILE_FORMATS)]


def _check_options(name: str, kw: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(kw) - set(allowed))
    if extra:
        ok = ", ".join(allowed) if allowed else "none"
        if extra[0] == "image_size" and "image_size" not in allowed:
            raise InvariscopeError(
                f"dataset '{name}' has one image size; "
                + hint("leave out image_size", "leave out --image-size")
                + " (it applies to image folders, shapes and photos)"
            )
        raise InvariscopeError(
            f"dataset '{name}' does not take option '{extra[0]}'; it takes: {ok}"
        )


def is_folder_spec(name: str) -> bool:
    """True if ``create_dataset(name)`` reads an image folder (``folder:<dir>`` or a
    bare existing directory)."""
    if not isinstance(name, str):
        return False
    if name.startswith("folder:"):
        return True
    fmt, colon, _ = name.partition(":")
    known = name in _GENERATED or (colon and fmt in _FORMATS)
    return not known and Path(name).expanduser().is_dir()


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~"))


def create_dataset(
    name: str, split: str = "train", *, size: int | None = None, seed: int = 0, **kw: Any
) -> ImageDataset:
    """Create the dataset ``name`` (see the module docstring for the names).

    Args:
        name: a dataset name, ``<format>:<dir>``, or an existing directory.
        split: ``"train"`` or ``"test"``.
        size: number of images. Generated sets make this many (defaults: glyphs and
            shapes 10,000 train / 2,000 test); fixed sets (digits, files) take a seeded
            random subset; perturbed sets default to their base split's size and, if
            larger, reuse base images with fresh perturbations.
        seed: all randomness follows from it (the digits split is fixed whatever the seed).
        **kw: dataset options (``image_size`` for shapes, photos and folders, ``mode``
            and ``unlabeled`` for folders, ``clutter`` for translated/scaled sets).

    Returns:
        A dataset with ``ds[i] -> (image float32 [C, H, W] in [0, 1], label int)``,
        ``classes``, ``name``, ``fingerprint`` and, when held in memory, ``images`` and
        ``labels``.

    >>> ds = create_dataset("digits", "test", size=10)
    >>> len(ds), ds.name
    (10, 'digits')
    """
    if not isinstance(name, str) or not name:
        raise InvariscopeError(f"dataset name must be a non-empty string, got {name!r}")
    check_split(split)
    seed, size = check_seed(seed), check_size(size)

    if name in _GENERATED:
        loader, allowed = _GENERATED[name]
        _check_options(name, kw, allowed)
        return loader(split, size, seed, **kw)

    kind, dash, rest = name.partition("-")
    if dash and kind in ("rotated", "translated", "scaled") and rest:
        return _create_perturbed(name, kind, rest, split, size, seed, kw)

    fmt, colon, root = name.partition(":")
    if colon and fmt in _FORMATS:
        if not root:
            raise InvariscopeError(f"dataset '{name}' needs a directory: {fmt}:<dir>")
        loader, allowed = _FORMATS[fmt]
        _check_options(name, kw, allowed)
        return loader(root, split, size, seed, **kw)

    if Path(name).expanduser().is_dir():
        return create_dataset(f"folder:{name}", split, size=size, seed=seed, **kw)
    if _looks_like_path(name):
        raise InvariscopeError(
            f"dataset directory '{name}' does not exist; give an existing folder of "
            "<class>/*.png|jpg|jpeg, or mnist:<dir> / cifar10:<dir>"
        )
    raise unknown_name("dataset", name, known_names())


def _create_perturbed(
    name: str, kind: str, base_name: str, split: str, size: int | None, seed: int, kw: dict
) -> ImageDataset:
    from invariscope.data.perturbed import PerturbedDataset

    _check_options(name, kw, _PERTURBED_OPTIONS)
    if base_name == "glyphs":
        base = create_dataset("glyphs", split, size=size, seed=seed)
    elif base_name == "digits" or (base_name.startswith("mnist:") and len(base_name) > 6):
        base = create_dataset(base_name, split, seed=seed)
    else:
        raise unknown_name("dataset", name, known_names())
    return PerturbedDataset(kind, base, name=name, size=size, seed=seed, **kw)


def list_datasets() -> list[DatasetInfo]:
    """The datasets ``create_dataset`` knows, for ``invariscope datasets``."""
    digit_sources = {
        "digits": "scikit-learn's 8x8 digits resized to 28x28 like MNIST",
        "glyphs": "digits 0-9 from matplotlib's fonts, jittered",
        "mnist:<dir>": "MNIST IDX files in <dir>",
    }
    rows = [
        DatasetInfo(
            "digits",
            "scikit-learn's handwritten digits, 8x8 resized to 28x28 like MNIST; fixed 80/20 split (1437/360)",
            1,
            28,
            10,
        ),
        DatasetInfo(
            "glyphs",
            "digits 0-9 from matplotlib's bundled fonts, random stroke width, affine and elastic jitter (10000/2000)",
            1,
            28,
            10,
        ),
        DatasetInfo(
            "shapes",
            "10 synthetic RGB shapes on textured backgrounds; image_size=32 (default) or 64 (10000/2000)",
            3,
            32,
            10,
        ),
    ]
    what = {
        "rotated": ("rotated uniformly in +-90 deg", 28),
        "translated": ("at a random position on 60x60 with clutter", 60),
        "scaled": ("scaled 2^U(-1,2) in the middle of 112x112 with clutter", 112),
    }
    for kind, (text, canvas) in what.items():
        for base, source in digit_sources.items():
            rows.append(DatasetInfo(f"{kind}-{base}", f"{source}, {text}", 1, canvas, 10))
    rows.append(
        DatasetInfo(
            "photos",
            "real photographs shipped with scikit-image, scikit-learn and matplotlib, 7 with an "
            "ImageNet label, as 224 px crops at 3 scales (68/77); 1000 ImageNet classes",
            3,
            224,
            1000,
        )
    )
    rows += [
        DatasetInfo(
            "mnist:<dir>", "MNIST IDX files (train-/t10k-images-idx3-ubyte[.gz], labels)", 1, 28, 10
        ),
        DatasetInfo(
            "cifar10:<dir>", "CIFAR-10 python batches (data_batch_1..5, test_batch)", 3, 32, 10
        ),
        DatasetInfo(
            "folder:<dir>",
            "images in <dir>/<class>/*.png|jpg|jpeg (ImageNet val layout; classes named by "
            "ImageNet wnid or name map onto an ImageNet model's outputs); options image_size, "
            "mode, unlabeled (images directly in <dir>, for labels='model')",
            None,
            None,
            None,
        ),
    ]
    return rows
