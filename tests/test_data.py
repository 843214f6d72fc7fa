"""Built-in datasets (digits, glyphs, shapes), create_dataset and list_datasets."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from invariscope.data import (
    DatasetInfo,
    base_glyphs,
    create_dataset,
    digit_fonts,
    list_datasets,
)
from invariscope.data.base import centre_by_mass, subset_indices
from invariscope.data.digits import split_indices, upsample_digits
from invariscope.data.glyphs import (
    MIN_DISTANCE,
    _render_font,
    font_dir,
    font_has_digits,
    stroke_variants,
    stroke_width,
)
from invariscope.data.shapes import (
    CLASSES as SHAPE_CLASSES,
)
from invariscope.data.shapes import (
    MIN_COLOUR_DISTANCE,
    _colours,
    _segment_distance,
    polygon_sdf,
    render_shapes,
)
from invariscope.errors import InvariscopeError

# name, kwargs, (C, H, W)
BUILTINS = [
    ("digits", {"size": 40}, (1, 28, 28)),
    ("glyphs", {"size": 40}, (1, 28, 28)),
    ("shapes", {"size": 40}, (3, 32, 32)),
    ("shapes", {"size": 20, "image_size": 64}, (3, 64, 64)),
    ("rotated-digits", {"size": 30}, (1, 28, 28)),
    ("translated-glyphs", {"size": 30}, (1, 60, 60)),
    ("scaled-digits", {"size": 30}, (1, 112, 112)),
]


def _centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` -> ``[N, 2]`` (x, y) intensity-weighted centres in pixels."""
    h, w = x.shape[-2:]
    m = x.sum((1, 2, 3))
    cx = (x.sum(2)[:, 0] * torch.arange(w)).sum(1) / m
    cy = (x.sum(3)[:, 0] * torch.arange(h)).sum(1) / m
    return torch.stack([cx, cy], 1)


@pytest.mark.parametrize(("name", "kw", "shape"), BUILTINS, ids=lambda v: str(v))
def test_builtin_contract(name, kw, shape):
    ds = create_dataset(name, "train", seed=0, **kw)
    n = kw["size"]
    assert len(ds) == n
    assert ds.images.shape == (n, *shape) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert float(ds.images.max()) > 0.5  # something is drawn
    assert len(ds.classes) == 10 and all(isinstance(c, str) for c in ds.classes)
    assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < 10
    image, label = ds[3]
    assert type(label) is int and label == int(ds.labels[3])
    assert torch.equal(image, ds.images[3]) and image.shape == shape
    assert ds.name == name and ds.split == "train" and ds.seed == 0
    assert re.fullmatch(r"[0-9a-f]{64}", ds.fingerprint)


@pytest.mark.parametrize(("name", "kw"), [("glyphs", {}), ("shapes", {}), ("rotated-glyphs", {})])
def test_generated_sets_are_deterministic(name, kw):
    a = create_dataset(name, "train", size=24, seed=5, **kw)
    b = create_dataset(name, "train", size=24, seed=5, **kw)
    c = create_dataset(name, "train", size=24, seed=6, **kw)
    t = create_dataset(name, "test", size=24, seed=5, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.fingerprint == b.fingerprint
    assert not torch.equal(a.images, c.images) and a.fingerprint != c.fingerprint
    assert not torch.equal(a.images, t.images) and a.fingerprint != t.fingerprint


def test_generation_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    expected_torch, expected_np = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    create_dataset("glyphs", size=10, seed=1)
    create_dataset("shapes", size=10, seed=1)
    create_dataset("translated-digits", size=10, seed=1)
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.rand(3), expected_np)


# ------------------------------------------------------------------------------ digits


def test_digits_split_is_fixed_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, test = split_indices("train"), split_indices("test")
    assert len(train) == 1437 and len(test) == 360
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    counts_all = np.bincount(target, minlength=10)
    counts_test = np.bincount(target[test], minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)
    # the same split whatever the seed; labels follow the indices
    a = create_dataset("digits", "test", seed=0)
    b = create_dataset("digits", "test", seed=9)
    assert torch.equal(a.images, b.images)
    assert a.labels.tolist() == target[test].tolist()


def test_digits_look_like_mnist():
    ds = create_dataset("digits", "train")
    x = ds.images
    # a zero border and the centre of mass at the centre, white on black
    ring = torch.ones(28, 28, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert float(x[:, 0, ring].max()) == 0
    ring[2:-2, 2:-2] = False
    assert float((x[:, 0, ring].amax(1) > 0).float().mean()) < 0.01
    assert float((_centre_of_mass(x) - 13.5).abs().max()) <= 0.5 + 1e-5
    assert 0.08 < float(x.mean()) < 0.3  # mostly black background, like MNIST (0.13)
    assert float(x.amax((1, 2, 3)).min()) > 0.9


def test_upsample_digits_by_hand():
    full = np.full((1, 8, 8), 16.0)
    out = upsample_digits(full)
    expected = torch.zeros(1, 1, 28, 28)
    expected[..., 4:24, 4:24] = 1.0
    assert torch.allclose(out, expected, atol=1e-6)


def test_digits_subset_and_size_errors():
    ds = create_dataset("digits", "train", size=100, seed=3)
    full = create_dataset("digits", "train")
    idx = subset_indices(1437, 100, 3, "digits", "train")
    assert torch.equal(ds.images, full.images[torch.as_tensor(idx)])
    with pytest.raises(InvariscopeError, match="only 1437"):
        create_dataset("digits", "train", size=5000)


def test_centre_by_mass_shifts_whole_pixels():
    x = np.zeros((1, 9, 9), np.float32)
    x[0, 1, 1] = 1.0
    out = centre_by_mass(x, max_shift=2)
    assert out[0, 3, 3] == 1.0 and out.sum() == 1.0  # moved by the 2 px limit
    out = centre_by_mass(x, max_shift=5)
    assert out[0, 4, 4] == 1.0


# ------------------------------------------------------------------------------ glyphs


def test_every_kept_font_has_ten_distinct_nonempty_digits():
    fonts = digit_fonts()
    bank = base_glyphs()
    assert len(fonts) >= 10 and bank.shape == (len(fonts), 10, 1, 28, 28)
    for f, name in enumerate(fonts):
        flat = bank[f].reshape(10, -1).double()
        assert bool((flat.sum(1) > 5).all()), name
        dist = torch.cdist(flat, flat) + torch.eye(10) * 1e9
        assert float(dist.min()) > MIN_DISTANCE, name
    for missing in (
        "DejaVuSansDisplay",
        "cmex10",
        "cmsy10",
        "LastResortHE-Regular",
        "STIXSizOneSymReg",
    ):
        assert missing not in fonts


def test_font_filters():
    assert not font_has_digits(np.zeros((10, 28, 28)))
    same = np.zeros((10, 28, 28))
    same[:, 8:20, 8:20] = 1.0  # ten identical "missing glyph" boxes
    assert not font_has_digits(same)
    # cmsy10 maps the digit code points to ten distinct symbols: non-empty and distinct,
    # so only the cross-font check drops it
    assert font_has_digits(_render_font(font_dir() / "cmsy10.ttf", 28))
    assert "cmsy10" not in digit_fonts()


def test_glyph_jitter_keeps_digits_recognisable_and_classes_balanced():
    ds = create_dataset("glyphs", "test", size=200, seed=2)
    assert np.bincount(ds.labels.numpy(), minlength=10).tolist() == [20] * 10
    templates = base_glyphs().reshape(-1, 28 * 28)
    template_labels = torch.arange(10).repeat(templates.shape[0] // 10)
    nearest = torch.cdist(ds.images.reshape(len(ds), -1), templates).argmin(1)
    accuracy = (template_labels[nearest] == ds.labels).float().mean()
    assert accuracy > 0.6  # nearest base glyph still names the digit for most samples
    assert float(ds.images.sum((1, 2, 3)).min()) > 10  # nothing erased


def test_stroke_variants_by_hand():
    line = torch.zeros(2, 1, 15, 15)
    line[0, 0, 7, 2:13] = 1.0  # 1 px wide line
    line[1, 0, 3:12, 2:13] = 1.0  # 9 px wide bar
    variants, safe = stroke_variants(line, (-1, 0, 1))
    assert torch.equal(variants[:, 1], line)
    assert variants[0, 2, 0, :, 7].sum() == 3  # dilation: 3 px wide
    assert variants[1, 0, 0, :, 7].sum() == 7  # erosion: 9 -> 7 px
    assert variants[0, 0].sum() == 0  # the thin line would vanish ...
    assert safe.tolist() == [[False, True, True], [True, True, True]]  # ... so it is unsafe
    # 2 * area / perimeter: 2 * 99 / 40 for the bar (one corner is cut by the TV estimate)
    assert abs(float(stroke_width(line)[1]) - 2 * 99 / 40) < 0.1


# ------------------------------------------------------------------------------ shapes


def test_polygon_sdf_by_hand():
    square = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    q = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.5, 0.25], [2.0, 2.0]])
    sd = polygon_sdf(q, square)
    assert torch.allclose(sd, torch.tensor([-1.0, 2.0, -0.5, math.sqrt(2)]), atol=1e-6)


def test_render_shapes_coverage():
    s = 32
    labels = torch.tensor([SHAPE_CLASSES.index("circle"), SHAPE_CLASSES.index("square")])
    centres = torch.tensor([[15.5, 15.5], [15.5, 15.5]])
    radii = torch.tensor([10.0, 10.0])
    masks = render_shapes(labels, centres, radii, torch.tensor([0.0, 0.0]), s)
    circle, square = masks[0, 0], masks[1, 0]
    assert abs(float(circle.sum()) - math.pi * 9.5**2) < 0.01 * math.pi * 9.5**2
    assert float(circle[15, 15]) == 1.0 and float(circle[0, 0]) == 0.0
    # axis-aligned square of half-side 10 cos(45 deg) = 7.07 px around 15.5
    half = 10 * math.cos(math.pi / 4)
    assert abs(float(square.sum()) - (2 * half) ** 2) < 1.0
    assert float(square[15, 15 + 7]) == 1.0 and float(square[15, 15 + 9]) == 0.0
    # rotating the square by 45 degrees makes a diamond reaching 10 px along the axes
    turned = render_shapes(labels[1:], centres[1:], radii[1:], torch.tensor([45.0]), s)[0, 0]
    assert float(turned[15, 15 + 9]) > 0.5 and float(turned[15 + 9, 15 + 9]) == 0.0


def test_shape_colours_keep_their_distance():
    rng = np.random.default_rng(0)
    fg, a, b = _colours(rng, 500)
    dist = _segment_distance(fg, a, b)
    assert np.mean(dist >= MIN_COLOUR_DISTANCE) > 0.99


def test_shapes_classes_and_balance():
    ds = create_dataset("shapes", "train", size=50, seed=1)
    assert ds.classes == SHAPE_CLASSES
    assert np.bincount(ds.labels.numpy(), minlength=10).tolist() == [5] * 10
    with pytest.raises(InvariscopeError, match="image_size"):
        create_dataset("shapes", size=5, image_size=48)


# ------------------------------------------------------------------------------ registry


def test_unknown_and_bad_names():
    with pytest.raises(
        InvariscopeError, match=r"unknown dataset 'digitz' \(did you mean 'digits'\?\)"
    ):
        create_dataset("digitz")
    with pytest.raises(InvariscopeError, match="unknown dataset 'rotated-shapes'"):
        create_dataset("rotated-shapes")
    with pytest.raises(InvariscopeError, match="split"):
        create_dataset("digits", "validation")
    with pytest.raises(InvariscopeError, match="has one image size; leave out image_size"):
        create_dataset("digits", image_size=64)
    with pytest.raises(InvariscopeError, match="positive integer"):
        create_dataset("glyphs", size=0)
    with pytest.raises(InvariscopeError, match="seed"):
        create_dataset("glyphs", size=3, seed=-1)
    with pytest.raises(InvariscopeError) as err:
        create_dataset("./no/such/dir")
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InvariscopeError, match="needs a directory"):
        create_dataset("mnist:")


def test_list_datasets_matches_what_create_dataset_makes():
    infos = list_datasets()
    assert all(isinstance(i, DatasetInfo) for i in infos)
    names = [i.name for i in infos]
    for expected in (
        "digits",
        "glyphs",
        "shapes",
        "rotated-digits",
        "translated-glyphs",
        "scaled-mnist:<dir>",
        "mnist:<dir>",
        "cifar10:<dir>",
        "folder:<dir>",
    ):
        assert expected in names
    assert len(set(names)) == len(names)
    for info in infos:
        if "<dir>" in info.name:
            continue
        ds = create_dataset(info.name, "test", size=10)
        assert ds.images.shape[1:] == (info.channels, info.image_size, info.image_size)
        assert len(ds.classes) == info.num_classes
