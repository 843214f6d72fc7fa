"""``photos``: real photographs that ship with installed packages, with ImageNet labels.

Nothing is downloaded: the photos are files inside the wheels of scikit-image
(``skimage/data``: only those bundled, none fetched through pooch), scikit-learn
(``sklearn/datasets/images``) and matplotlib (``mpl-data/sample_data``).

Labelled photos (their label is the single ImageNet-1k class that fits best):

==================  =============  ==========================================================
photo               source         ImageNet label
==================  =============  ==========================================================
``chelsea``         scikit-image   281 tabby (a brown tabby cat; 282-285 are the other cats)
``coffee``          scikit-image   967 espresso (a cup of coffee on a saucer; 968 is "cup")
``rocket``          scikit-image   657 missile (a launch vehicle on its pad: ImageNet has no
                                   space-rocket class, and its "missile" images include them)
``motorcycle``      scikit-image   665 moped (``motorcycle_left``; ImageNet has no motorcycle
                                   class, its "moped" images are mostly small motorcycles)
``camera``          scikit-image   872 tripod (the grayscale "cameraman"; given as RGB)
``china``           scikit-learn   698 palace (the Tower of Buddhist Incense, Summer Palace)
``grace_hopper``    matplotlib     652 military uniform
==================  =============  ==========================================================

Excluded, as no ImageNet class fits (listed in :data:`PHOTOS` with ``label=None``;
:func:`load_photo` still reads them): ``astronaut`` (a portrait in a space suit),
``flower`` (scikit-learn; a dahlia: ImageNet's only flowers are daisy and yellow lady's
slipper). ``motorcycle_right`` is the stereo twin of ``motorcycle_left`` and is left out
so that one scene is not counted twice. The other pictures in scikit-image are textures,
micrographs, astronomy or synthetic images, not photographs of ImageNet objects.

Crops: for statistics each photo gives many views. Its shorter side is resized (PIL,
bilinear, anti-aliased) to ``s x image_size`` for each scale ``s`` in ``(1, 1.25,
1.5)``, and ``image_size`` square crops are taken at a 3 x 3 grid of positions ``u_y,
u_x in {-1, 0, 1}`` (-1: top / left edge, 0: centred, 1: bottom / right edge; one
position on an axis without room). The **test** split holds the crops with ``u_y +
u_x`` even (the centre and the corners: every photo's centred full view at scale 1 is a
test image), the **train** split the others (the edge midpoints): disjoint views. With
the default ``image_size=224``: 77 test and 68 train images, ``[3, 224, 224]`` float32
in ``[0, 1]``. Classes are the 1000 ImageNet names (:func:`invariscope.data.imagenet.
imagenet_classes`), so labels index the outputs of a 1000-class ImageNet model. The
dataset is deterministic (``seed`` only picks a ``size`` subset) and its crop positions
are in ``ds.crops`` (a DataFrame: ``photo, scale, u_y, u_x, top, left``, in pixels of the
resized photo).

Measured with ``efficientnet-lite0``: its top-1 is the label on 13 of the 19 scale-1
views (both splits; chelsea's three go to "Egyptian cat", 285) and on 86 of all 145
crops (the larger scales' corner crops often miss the object: they are views of the
photo, not of the object).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from invariscope.data.base import (
    TensorImageDataset,
    check_seed,
    check_size,
    check_split,
    subset_indices,
)
from invariscope.data.imagenet import imagenet_classes
from invariscope.errors import InvariscopeError, unknown_name

__all__ = [
    "PHOTOS",
    "PHOTO_SCALES",
    "Photo",
    "PhotoDataset",
    "load_photo",
    "load_photos",
    "photo_crops",
]

#: Shorter side of the resized photo, in units of ``image_size``.
PHOTO_SCALES = (1.0, 1.25, 1.5)


@dataclass(frozen=True)
class Photo:
    """A photograph inside an installed package.

    Attributes:
        name: the dataset's name for it.
        package: the Python package whose data directory holds it.
        path: the file's path inside that package.
        label: its ImageNet-1k class, or None when no class fits (then it is not in
            the dataset).
        what: what the photo shows (and why the label, or why none).
    """

    name: str
    package: str
    path: str
    label: int | None
    what: str


PHOTOS: tuple[Photo, ...] = (
    Photo("chelsea", "skimage", "data/chelsea.png", 281, "a brown tabby cat"),
    Photo("coffee", "skimage", "data/coffee.png", 967, "a cup of espresso on a saucer"),
    Photo("rocket", "skimage", "data/rocket.jpg", 657, "a launch vehicle on its pad"),
    Photo("motorcycle", "skimage", "data/motorcycle_left.png", 665, "a red motorcycle"),
    Photo("camera", "skimage", "data/camera.png", 872, "a cameraman at his tripod (gray)"),
    Photo("china", "sklearn", "datasets/images/china.jpg", 698, "a Summer Palace tower"),
    Photo(
        "grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", 652,
        "Grace Hopper in uniform",
    ),
    Photo("astronaut", "skimage", "data/astronaut.png", None, "portrait in a space suit"),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", None, "a dahlia"),
)  # fmt: skip


def _photo_path(photo: Photo) -> Path:
    """The photo's file, found without importing its package (only its location)."""
    spec = importlib.util.find_spec(photo.package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise InvariscopeError(
            f"photo '{photo.name}' ships with {photo.package}, which is not installed; "
            f"install it: pip install -c constraints.txt {photo.package}"
        )
    path = Path(roots[0]) / photo.path
    if not path.is_file():
        raise InvariscopeError(
            f"photo '{photo.name}' is missing from the installed {photo.package} ({path}); "
            f"reinstall {photo.package}"
        )
    return path


def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` of :data:`PHOTOS` as uint8 RGB ``[H, W, 3]`` (gray replicated).

    >>> load_photo("coffee").shape
    (400, 600, 3)
    """
    from PIL import Image

    by_name = {p.name: p for p in PHOTOS}
    if name not in by_name:
        raise unknown_name("photo", name, by_name)
    path = _photo_path(by_name[name])
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except OSError as exc:
        raise InvariscopeError(f"cannot read photo '{name}' ({path}): {exc}") from None


def _positions(slack: int) -> list[tuple[int, int]]:
    """``(u, offset)`` along one axis with ``slack`` pixels of room."""
    if slack <= 0:
        return [(0, 0)]
    return [(-1, 0), (0, slack // 2), (1, slack)]


def photo_crops(
    image: np.ndarray, image_size: int, scales: tuple[float, ...] = PHOTO_SCALES
) -> tuple[np.ndarray, list[dict]]:
    """Square crops of one photo at several scales and a 3 x 3 grid of positions.

    Args:
        image: uint8 ``[H, W, 3]``.
        image_size: side of the crops.
        scales: shorter side of the resized photo in units of ``image_size``.

    Returns:
        ``(crops uint8 [N, image_size, image_size, 3], rows)``: one dict per crop with
        ``scale, u_y, u_x, top, left`` (see the module docstring).
    """
    from PIL import Image

    pil = Image.fromarray(image)
    w, h = pil.size
    crops, rows = [], []
    for scale in scales:
        short = round(scale * image_size)
        k = short / min(w, h)
        nw, nh = max(short, round(w * k)), max(short, round(h * k))
        resized = pil if (nw, nh) == (w, h) else pil.resize((nw, nh), Image.Resampling.BILINEAR)
        arr = np.asarray(resized)
        for u_y, top in _positions(nh - image_size):
            for u_x, left in _positions(nw - image_size):
                crops.append(arr[top : top + image_size, left : left + image_size])
                rows.append({"scale": scale, "u_y": u_y, "u_x": u_x, "top": top, "left": left})
    return np.stack(crops), rows


class PhotoDataset(TensorImageDataset):
    """The ``photos`` dataset (see the module docstring); ``crops`` says where each image is."""

    crops: pd.DataFrame


def load_photos(
    split: str = "train", *, size: int | None = None, seed: int = 0, image_size: int = 224
) -> PhotoDataset:
    """The labelled photos of :data:`PHOTOS` as crops (see the module docstring).

    Args:
        split: ``"train"`` (edge-midpoint crops) or ``"test"`` (centre and corners).
        size: a seeded random subset of this many crops (order kept).
        seed: picks the subset; the crops themselves do not depend on it.
        image_size: side of the square crops (16 to 1024).

    Returns:
        A :class:`PhotoDataset`: ``images`` ``[N, 3, S, S]`` float32 in ``[0, 1]``,
        ``labels`` (ImageNet indices), ``classes`` (the 1000 ImageNet names), ``crops``.
    """
    check_split(split)
    seed, size = check_seed(seed), check_size(size)
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or not (16 <= image_size <= 1024)
    ):
        raise InvariscopeError(
            f"photos: image_size must be an integer in 16..1024, got {image_size!r}"
        )
    want = 0 if split == "test" else 1
    chunks, labels, rows = [], [], []
    for photo in PHOTOS:
        if photo.label is None:
            continue
        crops, info = photo_crops(load_photo(photo.name), image_size)
        keep = [i for i, r in enumerate(info) if (r["u_y"] + r["u_x"]) % 2 == want]
        chunks.append(crops[keep])
        labels += [photo.label] * len(keep)
        rows += [{"photo": photo.name, **info[i]} for i in keep]
    images = np.concatenate(chunks)
    idx = subset_indices(len(images), size, seed, "photos", split)
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div_(255.0)
    ds = PhotoDataset(
        x,
        torch.as_tensor(np.asarray(labels)[idx], dtype=torch.int64),
        classes=imagenet_classes(),
        name="photos",
        split=split,
        seed=seed,
    )
    ds.crops = pd.DataFrame([rows[i] for i in idx]).reset_index(drop=True)
    return ds
