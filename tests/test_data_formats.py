"""Readers for MNIST IDX, CIFAR-10 python batches and image folders, on files written here."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from invariscope.data import (
    ImageFolderDataset,
    create_dataset,
    load_cifar10,
    load_mnist,
    parse_idx,
    read_idx,
)
from invariscope.errors import InvariscopeError


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.tobytes()


@pytest.fixture
def mnist_dir(tmp_path):
    """Tiny MNIST: train 7 images raw, test 5 images gzip-compressed; ``(dir, arrays)``."""
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n, gz in (("train", 7, False), ("t10k", 5, True)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        arrays[prefix] = (images, labels)
        for kind, data in (("images-idx3", _idx(images)), ("labels-idx1", _idx(labels))):
            path = tmp_path / f"{prefix}-{kind}-ubyte"
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
            else:
                path.write_bytes(data)
    return tmp_path, arrays


def test_mnist_round_trip_raw_and_gz(mnist_dir):
    root, arrays = mnist_dir
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = create_dataset(f"mnist:{root}", split)
        images, labels = arrays[prefix]
        assert ds.images.shape == (len(images), 1, 28, 28) and ds.images.dtype == torch.float32
        assert np.array_equal((ds.images[:, 0] * 255).round().numpy().astype(np.uint8), images)
        assert ds.labels.tolist() == labels.tolist()
        assert ds.classes == [str(d) for d in range(10)] and ds.name == f"mnist:{root}"
    sub = load_mnist(root, "train", size=3, seed=1)
    assert len(sub) == 3 and sub.fingerprint != create_dataset(f"mnist:{root}").fingerprint


def test_parse_idx_other_types_by_hand():
    values = np.array([[1, -2], [300000, 4]], dtype=">i4")
    assert parse_idx(_idx(values, 0x0C)).tolist() == [[1, -2], [300000, 4]]
    floats = np.array([0.5, -1.25], dtype=">f8")
    assert parse_idx(_idx(floats, 0x0E)).tolist() == [0.5, -1.25]


def test_idx_errors_name_the_file(mnist_dir, tmp_path):
    root, _ = mnist_dir
    good = (root / "train-images-idx3-ubyte").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.idx").write_bytes(good[:-10])
    with pytest.raises(InvariscopeError, match=r"t\.idx' is truncated"):
        read_idx(bad / "t.idx")
    (bad / "m.idx").write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(InvariscopeError, match="bad magic"):
        read_idx(bad / "m.idx")
    (bad / "x.idx").write_bytes(good + b"\x00")
    with pytest.raises(InvariscopeError, match="longer than its header"):
        read_idx(bad / "x.idx")
    (bad / "z.gz").write_bytes(gzip.compress(good)[:50])
    with pytest.raises(InvariscopeError, match="not a valid gzip"):
        read_idx(bad / "z.gz")


def test_mnist_missing_and_mismatched_files(mnist_dir, tmp_path):
    root, arrays = mnist_dir
    with pytest.raises(InvariscopeError) as err:
        create_dataset(f"mnist:{tmp_path / 'nope'}")
    assert "train-images-idx3-ubyte" in str(err.value) and "\n" not in str(err.value)
    (root / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(InvariscopeError, match="missing .*train-labels-idx1-ubyte"):
        load_mnist(root, "train")
    (root / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(3, np.uint8)))
    with pytest.raises(InvariscopeError, match="must hold 7 labels"):
        load_mnist(root, "train")


# ---------------------------------------------------------------------------- CIFAR-10


def _write_cifar(root, protocol=pickle.HIGHEST_PROTOCOL):
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 2).tolist()
        batches[name] = (data, labels)
        with open(root / name, "wb") as f:
            pickle.dump(
                {b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol
            )
    names = [f"class{i}".encode() for i in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_round_trip(tmp_path, protocol):
    nested = tmp_path / "cifar-10-batches-py"
    nested.mkdir()
    batches = _write_cifar(nested, protocol)
    train = create_dataset(f"cifar10:{tmp_path}", "train")  # finds the nested folder
    test = load_cifar10(nested, "test")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(
        (train.images * 255).round().numpy().astype(np.uint8).reshape(10, -1), data
    )
    # channel-planar layout: value (c, y, x) of image n is data[n, 1024 c + 32 y + x]
    n, c, y, x = 3, 2, 5, 7
    assert round(float(train.images[n, c, y, x]) * 255) == data[n, 1024 * c + 32 * y + x]
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == labels
    assert test.labels.tolist() == batches["test_batch"][1]
    assert train.classes == [f"class{i}" for i in range(10)]


def test_cifar10_errors(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(InvariscopeError, match="missing .*data_batch_3"):
        load_cifar10(tmp_path, "train")
    (tmp_path / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(InvariscopeError, match="test_batch' is not a readable CIFAR batch"):
        load_cifar10(tmp_path, "test")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(str(marker)), b"labels": [0]}, f)
    with pytest.raises(InvariscopeError, match="refusing to load"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


# ------------------------------------------------------------------------ image folders


@pytest.fixture
def folder(tmp_path):
    """``root/<class>/*``: PNGs (lossless) in 'cat', PNG and JPEG in 'dog'; ``(root, arrays)``."""
    rng = np.random.default_rng(2)
    root = tmp_path / "imgs"
    arrays = {}
    for cls, names in (("dog", ["b.png", "a.JPEG"]), ("cat", ["x.png", "y.png", "notes.txt"])):
        (root / cls).mkdir(parents=True)
        for name in names:
            path = root / cls / name
            if name.endswith(".txt"):
                path.write_text("not an image")
                continue
            if name.endswith(".JPEG"):  # smooth, so that JPEG keeps it close
                ramp = np.linspace(0, 255, 16)[None, :, None] * np.ones((12, 1, 1))
                arr = np.concatenate([ramp, 255 - ramp, np.full_like(ramp, 90)], 2).astype(np.uint8)
                Image.fromarray(arr).save(path, quality=95)
            else:
                arr = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                Image.fromarray(arr).save(path)
            arrays[f"{cls}/{name}"] = arr
    return root, arrays


def test_folder_reads_sorted_classes_lazily_and_exactly(folder):
    root, arrays = folder
    ds = create_dataset(str(root), "test")  # a bare directory means folder:
    assert isinstance(ds, ImageFolderDataset) and ds.name == f"folder:{root}"
    assert ds.classes == ["cat", "dog"]
    rel = [str(f.relative_to(root)) for f in ds.files]
    assert rel == ["cat/x.png", "cat/y.png", "dog/a.JPEG", "dog/b.png"]
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.mode == "RGB"
    image, label = ds[1]
    assert label == 0 and image.shape == (3, 12, 16) and image.dtype == torch.float32
    assert np.array_equal((image * 255).round().permute(1, 2, 0).numpy(), arrays["cat/y.png"])
    jpeg, _ = ds[2]
    reference = torch.from_numpy(arrays["dog/a.JPEG"]).permute(2, 0, 1).float()
    assert float((jpeg * 255 - reference).abs().max()) < 12


def test_folder_modes_and_resize(folder, tmp_path):
    root, arrays = folder
    gray = create_dataset(f"folder:{root}", mode="L", image_size=8)
    image, _ = gray[0]
    assert image.shape == (1, 8, 8) and gray.mode == "L"
    # shorter side to 8 px and a centre crop: 12x16 -> 8x11 -> columns 1..8
    ref = (
        Image.fromarray(arrays["cat/x.png"]).convert("L").resize((11, 8), Image.Resampling.BILINEAR)
    )
    expected = torch.from_numpy(np.asarray(ref)[:, 1:9].astype(np.float32) / 255)
    assert torch.allclose(image[0], expected, atol=1e-6)
    # a folder of single-channel images is read as L without being told
    mono = tmp_path / "mono"
    (mono / "a").mkdir(parents=True)
    Image.fromarray(np.full((5, 5), 77, np.uint8)).save(mono / "a" / "p.png")
    ds = create_dataset(f"folder:{mono}")
    assert ds.mode == "L" and torch.allclose(ds[0][0], torch.full((1, 5, 5), 77 / 255))
    with pytest.raises(InvariscopeError, match="mode"):
        create_dataset(f"folder:{root}", mode="CMYK")


def test_folder_unreadable_image_names_the_file(folder):
    root, _ = folder
    broken = root / "dog" / "c.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = create_dataset(f"folder:{root}", mode="RGB")
    index = [f.name for f in ds.files].index("c.png")
    with pytest.raises(InvariscopeError, match=r"cannot read image file '.*c\.png'"):
        ds[index]


def test_folder_fingerprint_follows_the_files(folder):
    root, _ = folder
    first = create_dataset(f"folder:{root}").fingerprint
    assert create_dataset(f"folder:{root}").fingerprint == first
    path = root / "cat" / "x.png"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = create_dataset(f"folder:{root}").fingerprint
    assert second != first
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "cat" / "z.png")
    assert create_dataset(f"folder:{root}").fingerprint not in (first, second)


def test_folder_splits_and_errors(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "d" / split / "k").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "d" / split / "k" / "i.png")
    Image.fromarray(np.ones((4, 4, 3), np.uint8)).save(tmp_path / "d" / "train" / "k" / "j.png")
    assert len(create_dataset(f"folder:{tmp_path / 'd'}", "train")) == 2
    assert len(create_dataset(f"folder:{tmp_path / 'd'}", "test")) == 1  # val/ serves test
    (tmp_path / "empty" / "k").mkdir(parents=True)
    with pytest.raises(InvariscopeError, match=r"no images found .*<class>/\*\.png"):
        create_dataset(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(InvariscopeError, match="does not exist"):
        create_dataset(f"folder:{tmp_path / 'missing'}")
