"""Rotated / translated / scaled digit sets: parameters agree with the images."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from kornia.geometry.transform import rotate as kornia_rotate

from invariscope.data import PARAM_COLUMNS, PerturbedDataset, TensorImageDataset, create_dataset
from invariscope.data.perturbed import CLUTTER_PIECES, PIECE_SIZE, paste_max
from invariscope.errors import InvariscopeError
from invariscope.transforms import rotation, zoom


def _centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` -> ``[N, 2]`` (x, y) intensity-weighted centres in pixels."""
    h, w = x.shape[-2:]
    m = x.sum((1, 2, 3))
    cx = (x.sum(2)[:, 0] * torch.arange(w)).sum(1) / m
    cy = (x.sum(3)[:, 0] * torch.arange(h)).sum(1) / m
    return torch.stack([cx, cy], 1)


def _base_of(ds: PerturbedDataset) -> torch.Tensor:
    return ds.base.images[ds.base_indices]


def test_rotated_reproduces_rotating_the_base_image():
    ds = create_dataset("rotated-digits", "test", size=64, seed=1)
    angles = torch.tensor(ds.params["angle_deg"].to_numpy(), dtype=torch.float32)
    assert torch.equal(ds.images, rotation(_base_of(ds), angles).clamp(0, 1))
    # and kornia's own rotate (positive = counter-clockwise about the centre) agrees
    assert torch.allclose(ds.images, kornia_rotate(_base_of(ds), angles), atol=1e-4)
    assert ds.labels.tolist() == ds.base.labels[ds.base_indices].tolist()
    assert float(angles.abs().max()) <= 90 and float(angles.abs().max()) > 45
    assert (ds.params[["tx_px", "ty_px", "log2_scale"]] == 0).all().all()


def test_rotation_sign_counter_clockwise_as_displayed():
    x = torch.zeros(8, 1, 28, 28)
    x[:, 0, 13:15, 21:23] = 1.0  # a blob 8 px right of the centre (13.5, 13.5)
    base = TensorImageDataset(
        x, torch.zeros(8, dtype=torch.long), classes=["dot"], name="dot", split="test"
    )
    ds = PerturbedDataset("rotated", base, name="rotated-dot", seed=3)
    theta = np.deg2rad(ds.params["angle_deg"].to_numpy())
    expected = torch.tensor(np.stack([13.5 + 8 * np.cos(theta), 13.5 - 8 * np.sin(theta)], 1))
    assert torch.allclose(_centre_of_mass(ds.images).double(), expected, atol=0.05)


def test_translated_places_the_digit_at_centre_plus_offset():
    ds = create_dataset("translated-digits", "train", size=48, seed=2, clutter=False)
    base = _base_of(ds)
    tx = torch.tensor(ds.params["tx_px"].to_numpy())
    ty = torch.tensor(ds.params["ty_px"].to_numpy())
    assert torch.equal(tx, tx.round()) and int(tx.abs().max()) <= 16 and int(ty.abs().max()) <= 16
    for i in range(len(ds)):
        canvas = torch.zeros(1, 60, 60)
        y0, x0 = 16 + int(ty[i]), 16 + int(tx[i])
        canvas[:, y0 : y0 + 28, x0 : x0 + 28] = base[i]
        assert torch.equal(ds.images[i], canvas)
    # the digit's centre of mass moves by exactly (tx, ty) relative to the canvas centre
    shift = (_centre_of_mass(ds.images) - 29.5) - (_centre_of_mass(base) - 13.5)
    assert torch.allclose(shift, torch.stack([tx, ty], 1).float(), atol=1e-4)
    assert (ds.params[["angle_deg", "log2_scale"]] == 0).all().all()


def test_translated_clutter_comes_from_other_digits():
    clean = create_dataset("translated-digits", "train", size=40, seed=4, clutter=False)
    noisy = create_dataset("translated-digits", "train", size=40, seed=4)
    assert noisy.params.equals(clean.params)  # same digits, same positions
    assert bool((noisy.images >= clean.images).all())  # clutter is added by maximum
    changed = (noisy.images != clean.images).flatten(1).sum(1)
    assert int(changed.max()) <= CLUTTER_PIECES * PIECE_SIZE**2 and int(changed.sum()) > 0
    c = noisy.clutter
    assert c.sources.shape == (40, CLUTTER_PIECES)
    assert not (c.sources == noisy.base_indices.numpy()[:, None]).any()
    assert c.crop_yx.min() >= 4 and c.crop_yx.max() <= 28 - 4 - PIECE_SIZE


def test_scaled_reproduces_zooming_the_base_image():
    ds = create_dataset("scaled-digits", "test", size=40, seed=5, clutter=False)
    base = _base_of(ds)
    u = torch.tensor(ds.params["log2_scale"].to_numpy())
    assert float(u.min()) >= -1 and float(u.max()) <= 2 and float(u.max() - u.min()) > 1.5
    factor = torch.exp2(u).float()
    expected = zoom(F.pad(base, (42, 42, 42, 42)), factor).clamp(0, 1)
    assert torch.allclose(ds.images, expected, atol=1e-4)
    # the digit stays centred: centre of mass moves by the scale about the centre, and
    # the ink grows with the area
    com = _centre_of_mass(ds.images) - 55.5
    assert torch.allclose(com, factor[:, None] * (_centre_of_mass(base) - 13.5), atol=0.3)
    ink = ds.images.sum((1, 2, 3)) / base.sum((1, 2, 3))
    assert torch.allclose(ink, factor**2, rtol=0.1)


def test_scaled_clutter_is_scaled_with_the_digit():
    ds = create_dataset("scaled-digits", "test", size=60, seed=6)
    clean = create_dataset("scaled-digits", "test", size=60, seed=6, clutter=False)
    extra = (ds.images - clean.images).clamp_min(0).flatten(1).gt(0.05).sum(1).float()
    factor = torch.exp2(torch.tensor(ds.params["log2_scale"].to_numpy())).float()
    big, small = factor > 2.5, factor < 0.8
    assert big.any() and small.any()
    # six 6x6 pieces magnified s times cover at most 6 * (6 s + 2)^2 pixels
    assert bool((extra <= CLUTTER_PIECES * (PIECE_SIZE * factor + 2) ** 2).all())
    assert float(extra[big].mean()) > 4 * float(extra[small].mean())


def test_params_frame_and_sample():
    ds = create_dataset("scaled-glyphs", "train", size=12, seed=0)
    assert isinstance(ds.params, pd.DataFrame)
    assert list(ds.params.columns) == PARAM_COLUMNS and len(ds.params) == 12
    image, label, params = ds.sample(7)
    assert torch.equal(image, ds.images[7]) and label == int(ds.labels[7])
    assert params == {c: float(ds.params[c].iloc[7]) for c in PARAM_COLUMNS}
    assert ds.base.name == "glyphs" and len(ds.base) == 12  # a generated base gets the size
    assert torch.equal(ds.base_indices, torch.arange(12))


def test_perturbed_sets_are_deterministic_and_size_can_exceed_the_base():
    a = create_dataset("rotated-digits", "test", size=500, seed=1)
    b = create_dataset("rotated-digits", "test", size=500, seed=1)
    c = create_dataset("rotated-digits", "test", size=500, seed=2)
    assert torch.equal(a.images, b.images) and a.params.equals(b.params)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    counts = np.bincount(a.base_indices.numpy(), minlength=360)
    assert counts.min() >= 1 and counts.max() <= 2  # every test digit, some twice
    full = create_dataset("rotated-digits", "test")
    assert len(full) == 360 and torch.equal(full.base_indices, torch.arange(360))


def test_base_must_be_28px_digits():
    shapes = create_dataset("shapes", size=4)
    with pytest.raises(InvariscopeError, match=r"\[1, 28, 28\]"):
        PerturbedDataset("rotated", shapes, name="rotated-shapes")
    with pytest.raises(InvariscopeError, match="has one image size; leave out image_size"):
        create_dataset("rotated-digits", image_size=64)


def test_paste_max_by_hand():
    canvas = torch.zeros(1, 1, 4, 4)
    canvas[0, 0, 0, 0] = 0.5
    patch = torch.tensor([[0.2, 0.9], [0.3, 0.4]]).reshape(1, 1, 1, 2, 2)
    paste_max(canvas, patch, torch.tensor([[-1]]), torch.tensor([[-1]]))  # only 0.4 lands
    paste_max(canvas, patch, torch.tensor([[3]]), torch.tensor([[2]]))  # bottom row cut
    expected = torch.zeros(4, 4)
    expected[0, 0] = 0.5
    expected[3, 2:] = torch.tensor([0.2, 0.9])
    assert torch.equal(canvas[0, 0], expected)


def test_perturbed_mnist_files(tmp_path):
    rng = np.random.default_rng(0)
    images = np.zeros((12, 28, 28), np.uint8)
    images[:, 6:22, 8:20] = rng.integers(100, 256, (12, 16, 12))
    labels = np.arange(12, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        header = bytes([0, 0, 8, 3]) + np.array([12, 28, 28], ">u4").tobytes()
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(header + images.tobytes())
        )
        label_header = bytes([0, 0, 8, 1]) + np.array([12], ">u4").tobytes()
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(label_header + labels.tobytes())
    ds = create_dataset(f"translated-mnist:{tmp_path}", "test", seed=0, clutter=False)
    assert ds.images.shape == (12, 1, 60, 60) and ds.labels.tolist() == labels.tolist()
    mass = ds.images.sum((1, 2, 3))
    assert torch.allclose(mass, torch.tensor(images.sum((1, 2)) / 255.0, dtype=torch.float32))
    assert ds.name == f"translated-mnist:{tmp_path}"
    assert math.isclose(float(ds.images.max()), float(images.max()) / 255.0, rel_tol=1e-6)
