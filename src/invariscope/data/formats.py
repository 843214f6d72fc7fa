"""Readers for real data on disk: MNIST IDX files, CIFAR-10 python batches, image folders.

Nothing is downloaded: each reader takes a directory the user already has.

- ``mnist:<dir>``: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or ``.gz``
  (also the ``train-images.idx3-ubyte`` spelling). Any IDX image size is read
  (Fashion-MNIST, KMNIST have the same format); ``[1, H, W]``.
- ``cifar10:<dir>``: the python version (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``, ``batches.meta``) in ``<dir>`` or ``<dir>/cifar-10-batches-py``;
  ``[3, 32, 32]``. The pickles are read with an unpickler that only builds numpy
  arrays, lists, dicts and strings, so a tampered file cannot run code.
- ``folder:<dir>``: ``<dir>/<class>/*.png|jpg|jpeg`` (the ImageNet val layout),
  classes in sorted order, images read lazily with PIL. If ``<dir>`` has ``train``,
  ``test`` or ``val`` sub-folders, the split's folder is used (``val`` for ``test`` when
  there is no ``test``); otherwise the folder itself serves both splits. Class folders
  named by ImageNet WordNet id (``n01440764``) or class name are mapped onto an ImageNet
  model's outputs by the engine (:mod:`invariscope.data.imagenet`). With
  ``unlabeled=True`` a folder without class sub-folders is read too: its images have no
  label (``labelled`` is False, ``classes`` empty, labels -1), for runs that take each
  image's label from the model (``labels="model"``).

Every reader raises :class:`~invariscope.errors.InvariscopeError` with a one-line
message naming the file that is missing, truncated or unreadable.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from invariscope.data.base import (
    ImageDataset,
    TensorImageDataset,
    check_seed,
    check_size,
    check_split,
    digest,
    subset_indices,
)
from invariscope.errors import InvariscopeError, hint

# ----------------------------------------------------------------------------- IDX

IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file is gzip (by its magic bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InvariscopeError(f"cannot read '{path}': {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as e:
            raise InvariscopeError(
                f"'{path}' is not a valid gzip file ({e}); re-download it"
            ) from None
    return raw


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file (the MNIST format) into a numpy array.

    Layout: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions, one big-endian uint32 per
    dimension, then the data, big-endian, C order. The data must have exactly the size
    the header states.

    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])).tolist()
    [7, 8, 9]
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise InvariscopeError(f"'{source}' is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InvariscopeError(f"'{source}' is truncated: the IDX header needs {header} bytes")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise InvariscopeError(
            f"'{source}' is {state}: {len(data)} bytes for shape {list(shape)} (expected {expected})"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed; see :func:`parse_idx`."""
    path = Path(path)
    return parse_idx(_read_bytes(path), source=str(path))


def _find(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise InvariscopeError(f"{what}: missing {root / names[0]}[.gz] in '{root}'")


def _check_dir(root: str | os.PathLike, kind: str, expected: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise InvariscopeError(
            f"{kind} directory '{root}' does not exist; expected {expected} in it"
        )
    return path


def load_mnist(
    root: str | os.PathLike, split: str = "train", *, size: int | None = None, seed: int = 0
) -> TensorImageDataset:
    """MNIST (or any IDX image/label pair) from ``root``: ``[1, H, W]`` in ``[0, 1]``, labels 0-9.

    Args:
        root: directory holding ``train-images-idx3-ubyte[.gz]`` etc.
        split: ``"train"`` (``train-*``) or ``"test"`` (``t10k-*``).
        size: a seeded random subset of this many images (file order kept).
        seed: picks the subset.
    """
    check_split(split)
    seed, size = check_seed(seed), check_size(size)
    prefix = MNIST_PREFIX[split]
    path = _check_dir(root, "mnist", f"{prefix}-images-idx3-ubyte[.gz]")
    img_path = _find(path, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"], "mnist")
    lbl_path = _find(path, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"], "mnist")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise InvariscopeError(
            f"'{img_path}' must hold uint8 images [N, H, W], got {images.dtype} {list(images.shape)}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise InvariscopeError(
            f"'{lbl_path}' must hold {len(images)} labels (one per image), got shape {list(labels.shape)}"
        )
    if len(labels) and labels.max() > 9:
        raise InvariscopeError(f"'{lbl_path}' has label {int(labels.max())}; MNIST labels are 0-9")
    idx = subset_indices(len(images), size, seed, "mnist", split)
    x = torch.from_numpy(images[idx]).float().div_(255.0).unsqueeze(1)
    return TensorImageDataset(
        x,
        torch.from_numpy(labels[idx].astype(np.int64)),
        classes=[str(d) for d in range(10)],
        name=f"mnist:{root}",
        split=split,
        seed=seed,
    )


# -------------------------------------------------------------------------- CIFAR-10

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The few callables a pickled numpy array needs, under both numpy 1 and 2 module names."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = __import__("codecs").encode
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays and plain containers (no arbitrary code)."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_cifar_batch(path: str | os.PathLike) -> dict:
    """Load one CIFAR python pickle (keys decoded to ``str``), refusing anything but data."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any failure to parse is a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvariscopeError(f"'{path}' is not a readable CIFAR batch ({msg})") from None
    if not isinstance(obj, dict):
        raise InvariscopeError(f"'{path}' is not a CIFAR batch (a pickled dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_root(root: str | os.PathLike) -> Path:
    path = _check_dir(root, "cifar10", "data_batch_1 .. data_batch_5, test_batch")
    nested = path / "cifar-10-batches-py"
    return nested if nested.is_dir() and not (path / "test_batch").exists() else path


def load_cifar10(
    root: str | os.PathLike, split: str = "train", *, size: int | None = None, seed: int = 0
) -> TensorImageDataset:
    """CIFAR-10 from its python batches: ``[3, 32, 32]`` in ``[0, 1]``.

    Each batch holds ``data`` uint8 ``[N, 3072]`` (1024 red, then green, then blue
    values, each row-major 32x32) and ``labels``; ``batches.meta`` gives the class names
    (the standard ten when it is absent).
    """
    check_split(split)
    seed, size = check_seed(seed), check_size(size)
    path = _cifar_root(root)
    datas, labels = [], []
    for name in CIFAR10_FILES[split]:
        file = path / name
        if not file.is_file():
            raise InvariscopeError(
                f"cifar10: missing {file}; expected the python version's batches"
            )
        batch = read_cifar_batch(file)
        data = np.asarray(batch.get("data"))
        lab = np.asarray(batch.get("labels", batch.get("fine_labels")))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise InvariscopeError(
                f"'{file}': 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
            )
        if lab.ndim != 1 or len(lab) != len(data):
            raise InvariscopeError(
                f"'{file}': needs {len(data)} labels, got shape {list(lab.shape)}"
            )
        datas.append(data)
        labels.append(lab.astype(np.int64))
    classes = CIFAR10_CLASSES
    meta = path / "batches.meta"
    if meta.is_file():
        names = read_cifar_batch(meta).get("label_names")
        if names is not None:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    data, lab = np.concatenate(datas), np.concatenate(labels)
    if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
        raise InvariscopeError(f"cifar10 '{path}': labels must be in 0..{len(classes) - 1}")
    idx = subset_indices(len(data), size, seed, "cifar10", split)
    x = torch.from_numpy(data[idx].reshape(-1, 3, 32, 32)).float().div_(255.0)
    return TensorImageDataset(
        x,
        torch.from_numpy(lab[idx]),
        classes=classes,
        name=f"cifar10:{root}",
        split=split,
        seed=seed,
    )


# ---------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L"}


class ImageFolderDataset(ImageDataset):
    """Images in ``root/<class>/*.png|jpg|jpeg``, read lazily with PIL.

    Args:
        root: the folder (or one with ``train``/``test``/``val`` sub-folders, see module).
        split: ``"train"`` or ``"test"``.
        size: a seeded random subset of this many files (sorted order kept).
        seed: picks the subset.
        image_size: if given, each image is resized (bilinear, antialiased) so that its
            shorter side is ``image_size`` and centre-cropped to ``image_size`` square;
            if ``None`` images keep their own size.
        mode: ``"RGB"``, ``"L"`` or ``None``: every image is converted to this mode;
            ``None`` looks at up to 16 files spread over the list and picks ``"L"`` if all
            are single-channel, else ``"RGB"``.
        unlabeled: accept a folder with images directly in it and no class sub-folders
            (see the module docstring); a folder with class sub-folders is read as usual.

    Attributes: ``files`` (paths), ``labels`` (int64 ``[N]`` tensor; -1 when
    unlabeled), ``classes``, ``labelled``, ``mode``. No ``images`` tensor: images are
    decoded on access. The fingerprint hashes name, split, seed, size, mode, image_size
    and every file's relative path, size and modification time.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        size: int | None = None,
        seed: int = 0,
        image_size: int | None = None,
        mode: str | None = None,
        name: str | None = None,
        unlabeled: bool = False,
    ) -> None:
        check_split(split)
        self.seed, self.split = check_seed(seed), split
        self.name = name or f"folder:{root}"
        top = _check_dir(root, "folder", "<class>/*.png|jpg|jpeg")
        self.root = _split_dir(top, split)
        self.classes = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            for f in sorted((self.root / cls).iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                    files.append(f)
                    labels.append(label)
        self.labelled = True
        if not files:
            loose = sorted(
                f
                for f in self.root.iterdir()
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            )
            if not loose:
                raise InvariscopeError(
                    f"no images found in '{self.root}'; expected {self.root}/<class>/*.png|jpg|jpeg"
                )
            if not unlabeled:
                raise InvariscopeError(
                    f"no class folders in '{self.root}': its {len(loose)} images lie directly "
                    f"in it, so they have no labels; sort them into {self.root}/<class>/ "
                    "folders, or label each by the model's top-1 with "
                    + hint("unlabeled=True and labels='model'", "--labels model")
                )
            self.classes, self.labelled = [], False
            files, labels = loose, [-1] * len(loose)
        idx = subset_indices(len(files), check_size(size), self.seed, "folder", split)
        self.files = [files[i] for i in idx]
        self.labels = torch.as_tensor([labels[i] for i in idx], dtype=torch.int64)
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise InvariscopeError(f"image_size must be a positive integer, got {image_size!r}")
        self.image_size = image_size
        if mode not in (None, "RGB", "L"):
            raise InvariscopeError(f"folder mode must be 'RGB' or 'L', got {mode!r}")
        self.mode = mode or self._guess_mode()

    def _guess_mode(self) -> str:
        from PIL import Image

        n = len(self.files)
        picks = sorted({round(i * (n - 1) / 15) for i in range(16)}) if n > 1 else [0]
        for i in picks:
            try:
                with Image.open(self.files[i]) as im:
                    if im.mode not in _GRAY_MODES:
                        return "RGB"
            except OSError as e:
                raise InvariscopeError(f"cannot read image file '{self.files[i]}': {e}") from None
        return "L"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image(self.files[index], mode=self.mode, image_size=self.image_size), int(
            self.labels[index]
        )

    def _fingerprint(self) -> str:
        entries = []
        for f in self.files:
            st = f.stat()
            entries.append((str(f.relative_to(self.root)), st.st_size, st.st_mtime_ns))
        return digest(
            self.name,
            self.split,
            self.seed,
            len(self),
            self.mode,
            self.image_size,
            self.classes,
            entries,
        )


def _split_dir(top: Path, split: str) -> Path:
    subdirs = {d.name for d in top.iterdir() if d.is_dir()}
    if not subdirs & {"train", "test", "val"}:
        return top
    for candidate in SPLIT_DIRS[split]:
        if candidate in subdirs:
            return top / candidate
    raise InvariscopeError(
        f"folder '{top}' has split folders but no {' or '.join(SPLIT_DIRS[split])}/ for split '{split}'"
    )


def load_image(
    path: str | os.PathLike, *, mode: str = "RGB", image_size: int | None = None
) -> torch.Tensor:
    """Read one image file as float32 ``[C, H, W]`` in ``[0, 1]`` (``C`` = 3 for RGB, 1 for L).

    With ``image_size``, the shorter side is resized to it (bilinear, antialiased) and
    the centre ``image_size`` x ``image_size`` is cropped. An unreadable file raises
    InvariscopeError naming it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if image_size is not None:
                im = _resize_crop(im, image_size)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvariscopeError(f"cannot read image file '{path}': {msg}") from None
    x = torch.from_numpy(arr.copy()).float().div_(255.0)
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


def _resize_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    k = size / min(w, h)
    nw, nh = max(size, round(w * k)), max(size, round(h * k))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


__all__ = [
    "CIFAR10_CLASSES",
    "ImageFolderDataset",
    "load_cifar10",
    "load_image",
    "load_mnist",
    "parse_idx",
    "read_cifar_batch",
    "read_idx",
]
