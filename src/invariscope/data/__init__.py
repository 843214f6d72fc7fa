"""Datasets: built-in generated sets, perturbed digit sets and readers for files on disk.

Every dataset yields ``(image float32 [C, H, W] in [0, 1], label int)`` and has
``classes``, ``name``, ``split``, ``seed`` and ``fingerprint``; in-memory ones also have
``images`` ``[N, C, H, W]`` and ``labels`` ``[N]``. Perturbed sets add ``params`` and
``sample(i)``. See :func:`create_dataset` for the names and :func:`list_datasets`.

Convention:
    Images in ``[0, 1]``, channel first; grayscale digits are white on black. Pixel
    coordinates: origin at the centre of the top-left pixel, x right, y down. All
    randomness comes from generators seeded by ``seed`` (never the global RNG).

>>> from invariscope.data import create_dataset
>>> ds = create_dataset("glyphs", "train", size=50, seed=0)
>>> image, label = ds[0]
>>> tuple(image.shape), image.dtype, 0 <= label < 10
((1, 28, 28), torch.float32, True)
"""

from invariscope.data.base import DatasetInfo, ImageDataset, TensorImageDataset
from invariscope.data.digits import load_digits
from invariscope.data.formats import (
    ImageFolderDataset,
    load_cifar10,
    load_image,
    load_mnist,
    parse_idx,
    read_cifar_batch,
    read_idx,
)
from invariscope.data.glyphs import GlyphJitter, base_glyphs, digit_fonts, load_glyphs
from invariscope.data.perturbed import PARAM_COLUMNS, PerturbedDataset
from invariscope.data.registry import create_dataset, known_names, list_datasets
from invariscope.data.shapes import load_shapes

__all__ = [
    "PARAM_COLUMNS",
    "DatasetInfo",
    "GlyphJitter",
    "ImageDataset",
    "ImageFolderDataset",
    "PerturbedDataset",
    "TensorImageDataset",
    "base_glyphs",
    "create_dataset",
    "digit_fonts",
    "known_names",
    "list_datasets",
    "load_cifar10",
    "load_digits",
    "load_glyphs",
    "load_image",
    "load_mnist",
    "load_shapes",
    "parse_idx",
    "read_cifar_batch",
    "read_idx",
]
