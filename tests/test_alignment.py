"""Feature-map alignment (``invariscope.measure.alignment``) and isotropic convolutions.

Jansson et al. (2020): a purely spatial warp of CNN feature maps aligns them with the
maps of a transformed image only for translations or with invariant filters. The tests
check the exact cases by hand (integer translations by a multiple of the stride; 90
degree rotations of an isotropic network, a pixel permutation on the grid) and the
inexact ones against the interpolation floors, on a CNN trained briefly on digits.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from invariscope.data import create_dataset
from invariscope.errors import InvariscopeError
from invariscope.measure.alignment import (
    AlignmentAnalysis,
    _best,
    _canvas,
    _features,
    alignment,
    alignment_error,
    alignment_errors,
    feature_grid,
    feature_grids,
)
from invariscope.models import create_model
from invariscope.models.isotropic import IsotropicConv2d, radial_kernel
from invariscope.transforms import warp_affine

LAYERS = ["net.conv1", "net.pool1", "net.conv2", "net.pool2"]  # relu1/2: as the pools


@pytest.fixture(scope="module")
def digits():
    return create_dataset("digits", split="test")


@pytest.fixture(scope="module")
def images(digits):
    return digits.images[:8]


@pytest.fixture(scope="module")
def trained():
    """simple-cnn trained one epoch on digits (a real CNN with learned, oriented filters)."""
    from invariscope.train import train

    torch.manual_seed(0)
    model = create_model("simple-cnn")
    result = train(model, create_dataset("digits"), epochs=1, seed=0, progress=False, threads=1)
    assert result.history["train_accuracy"].iloc[-1] > 0.5  # it learned something
    return model.eval()


@pytest.fixture(scope="module")
def isotropic():
    torch.manual_seed(0)
    return create_model("isotropic-cnn").eval()


def _errors(sums) -> dict[str, dict[str, float]]:
    return {
        layer: {m: float((v[0] / v[1]).sqrt().mean()) for m, v in d.items()}
        for layer, d in sums.items()
    }


# ---------------------------------------------------------------------- feature grids


def test_feature_grid_of_simple_cnn_by_hand():
    model = create_model("simple-cnn")
    # conv 9x9: offset (9 - 1) / 2 = 4; pool 2: + 1 * 0.5, stride 2; conv 7x7: + 2 * 3;
    # pool 2: + 2 * 0.5, stride 4. Receptive fields 9, 10, 22, 24 pixels.
    expected = {
        "conv1": (1, 4.0, 9, 20),
        "pool1": (2, 4.5, 10, 10),
        "relu1": (2, 4.5, 10, 10),
        "conv2": (2, 10.5, 22, 4),
        "pool2": (4, 11.5, 24, 2),
    }
    for layer, (stride, offset, rf, size) in expected.items():
        g = feature_grid(model, layer, (28, 28))
        assert g.stride == (stride, stride) and g.offset == (offset, offset)
        assert 2 * g.rf[0] + 1 == rf and g.size == (size, size)
        assert g.interior == ((0, size - 1), (0, size - 1))  # unpadded: every position
    with pytest.raises(InvariscopeError, match="no feature grid"):
        feature_grid(model, "fc", (28, 28))


def test_feature_grids_predict_the_real_map_sizes_of_padded_and_residual_nets():
    for arch, layers in (
        ("small-vgg", ["net.conv1_1", "net.pool1", "net.conv2_2", "net.pool3"]),
        ("small-resnet", ["net.relu1", "net.layer1", "net.layer2", "net.layer3"]),
    ):
        model = create_model(arch).eval()
        x = torch.rand(1, 3, 40, 36)
        grids = feature_grids(model, layers, (40, 36))
        with torch.no_grad():
            maps = _features(model, x, layers)
        for layer in layers:
            assert grids[layer].size == tuple(maps[layer].shape[-2:]), (arch, layer)
    g = feature_grids(create_model("small-resnet"), ["net.layer2"], (32, 32))["net.layer2"]
    # padded 3x3 convolutions: the grid stays centred (offset 0 + 2 * 0 ... ) and padding
    # makes the first and last positions non-interior
    assert g.stride == (2.0, 2.0) and g.offset == (0.0, 0.0)
    assert g.interior[1][0] > 0 and g.interior[1][1] < g.size[1] - 1


# --------------------------------------------------------------- exact: translations


def test_integer_translation_is_aligned_exactly_at_stride_one(trained, images):
    sums = alignment_errors(trained, images, "translate_x", 1.0, LAYERS)
    err = _errors(sums)
    assert err["net.conv1"]["exact"] < 1e-5 and err["net.conv1"]["floor"] < 1e-5
    # 1 px is half a feature pixel at stride 2 and a quarter at stride 4: not a grid shift
    assert err["net.pool1"]["exact"] > 0.01 and err["net.pool2"]["exact"] > 0.01
    # valid region by hand: 36 x 36 conv1 map on the 44 px canvas; the sample j + 1 must
    # stay inside: 36 rows x 35 columns
    assert sums["net.conv1"]["exact"][2] == 36 * 35
    # the exact identity itself: conv1 of the shifted canvas, one column on, equals conv1
    canvas = _canvas(images, 8)
    with torch.no_grad():
        a = _features(trained, canvas, ["net.conv1"])["net.conv1"]
        shifted = torch.zeros_like(canvas)
        shifted[..., 1:] = canvas[..., :-1]
        b = _features(trained, shifted, ["net.conv1"])["net.conv1"]
    torch.testing.assert_close(b[..., 1:], a[..., :-1], rtol=0, atol=1e-5)
    # multiples of the cumulative stride move every grid by whole feature pixels
    for name, shift in (("translate_x", 4.0), ("translate_y", -4.0)):
        err = _errors(alignment_errors(trained, images, name, shift, LAYERS))
        assert max(e["exact"] for e in err.values()) < 1e-5, (name, err)
    err = _errors(alignment_errors(trained, images, "translate_y", 2.0, LAYERS))
    assert err["net.conv2"]["exact"] < 1e-5 and err["net.pool2"]["exact"] > 0.01


# --------------------------------------------------------- the theorem: a trained CNN


def test_rotation_and_scaling_cannot_be_aligned_in_a_trained_cnn(trained, images):
    for name, magnitude in (("rotation", 45.0), ("zoom", 1.25)):
        err = _errors(
            alignment_errors(
                trained,
                images,
                name,
                magnitude,
                ["net.conv1", "net.conv2"],
                best_case=True,
                best_steps=25,
            )
        )
        for layer, e in err.items():
            # clearly above zero and at least twice what interpolation costs a map that
            # is equivariant in the continuum (both floors)
            assert e["exact"] > 0.15, (name, layer, e)
            assert e["exact"] > 2 * max(e["floor"], e["input"]), (name, layer, e)
            # the best spatial warp near T^-1 stays well above the floors too
            assert e["best"] <= e["exact"]
            assert e["best"] > 1.5 * max(e["floor"], e["input"]), (name, layer, e)


def test_best_case_search_finds_a_known_shift_from_a_wrong_start():
    g = torch.Generator().manual_seed(0)
    target = nn.functional.avg_pool2d(torch.rand(3, 2, 24, 24, generator=g), 3, 1, 1)
    shift = torch.tensor([[[1.0, 0.0, 1.3], [0.0, 1.0, -0.6]]], dtype=torch.float64)
    moved = warp_affine(target, shift)  # content moved by (1.3, -0.6) px
    mask = torch.zeros(24, 24, dtype=torch.bool)
    mask[4:-4, 4:-4] = True
    den = (target * mask).double().pow(2).sum(dim=(1, 2, 3))

    def error(matrix):
        back = warp_affine(moved, matrix[:2].unsqueeze(0).float())
        return (((back - target) * mask).double().pow(2).sum(dim=(1, 2, 3)) / den).sqrt()

    identity = torch.eye(3, dtype=torch.float64)  # a wrong guess: no correction
    truth = torch.linalg.inv(torch.cat([shift[0], identity[2:]]))  # the true inverse
    best = (_best(moved, target, mask, identity, den, steps=60) / den).sqrt()
    assert (best <= error(identity)).all()  # the start is among the candidates
    # the search gets from the wrong start to within 10% of the true inverse's error
    # (what is left is bilinear interpolation, twice)
    assert (best < 1.1 * error(truth)).all() and (error(truth) < 0.5 * error(identity)).all()


# ------------------------------------------------------------- isotropic filters


def test_isotropic_kernels_are_radial_and_invariant_to_quarter_turns():
    # the profile (2, 1) with 0 at r = 2: centre 2, edges 1, corners (r = sqrt 2) 2 - sqrt 2
    k = radial_kernel(torch.tensor([2.0, 1.0]), 3)
    s = 2 - 2**0.5
    torch.testing.assert_close(k, torch.tensor([[s, 1.0, s], [1.0, 2.0, 1.0], [s, 1.0, s]]))
    conv = IsotropicConv2d(3, 5, 9)
    w = conv.weight
    assert w.shape == (5, 3, 9, 9) and conv.profile.shape == (5, 3, 5)
    for turns in (1, 2, 3):
        assert torch.equal(w, torch.rot90(w, turns, dims=(-2, -1)))
    assert torch.equal(w, w.transpose(-1, -2)) and torch.equal(w, w.flip(-1))
    assert (w[..., 0, 0] == 0).all()  # r = 4 sqrt 2 > N = 5: outside the disc
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, w, conv.bias))
    conv(x).sum().backward()
    assert conv.profile.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0
    with pytest.raises(InvariscopeError, match="odd"):
        IsotropicConv2d(1, 1, 4)


def test_isotropic_network_aligns_rotations_up_to_interpolation(isotropic, trained, images):
    # 90 degrees about the canvas centre permutes every grid's pixels (the grids are
    # centred) and the isotropic kernels are exactly invariant: exact alignment
    err = _errors(alignment_errors(isotropic, images, "rotation", 90.0, LAYERS))
    assert max(e["exact"] for e in err.values()) < 1e-5
    assert max(e["floor"] for e in err.values()) < 1e-5
    ordinary = _errors(alignment_errors(trained, images, "rotation", 90.0, LAYERS))
    assert min(e["exact"] for e in ordinary.values()) > 0.3
    # other angles: at or below the interpolation error of an equivariant representation
    for angle in (30.0,):
        err = _errors(alignment_errors(isotropic, images, "rotation", angle, LAYERS))
        ordinary = _errors(alignment_errors(trained, images, "rotation", angle, LAYERS))
        for layer in LAYERS:
            assert err[layer]["exact"] <= err[layer]["floor"], (angle, layer, err[layer])
            assert err[layer]["exact"] <= err[layer]["input"], (angle, layer, err[layer])
            assert err[layer]["exact"] < 0.3 * ordinary[layer]["exact"], (angle, layer)
    # ...but not scalings: the receptive fields do not scale (Finnveden et al. III-B3)
    err = _errors(alignment_errors(isotropic, images, "zoom", 1.25, ["net.conv1"]))
    assert err["net.conv1"]["exact"] > 3 * err["net.conv1"]["floor"]


def test_alignment_error_single_layer_api(isotropic, images):
    e = alignment_error(
        isotropic, "conv1", "rotation", images[:4], 45.0, best_case=True, best_steps=5
    )
    assert e.exact.shape == (4,) and e.best.shape == (4,) and e.floor.shape == (4,)
    assert (e.best <= e.exact).all() and e.positions > 0
    assert e.grid.stride == (1.0, 1.0) and e.grid.size == (36, 36)
    assert isotropic.training is False


# ----------------------------------------------------------------- the analysis


def test_analysis_tables_figures_and_refusals(trained, digits, tmp_path):
    result = alignment(
        trained,
        digits,
        ["translate_x", "rotation"],
        magnitudes={"translate_x": [4], "rotation": [30]},
        layers=["conv1", "pool2"],
        best_case=True,
        best_steps=10,
        images=6,
        batch_size=4,
        out=tmp_path / "run",
        figures=True,
        progress=False,
    )
    t = result.table
    assert set(t["method"]) == {"exact", "best", "floor", "input"}
    assert (t["n"] == 6).all() and len(t) == 2 * 2 * 4
    exact = t[t["method"] == "exact"].set_index(["transform", "layer"])["mean"]
    assert exact[("translate_x", "conv1")] < 1e-5 and exact[("translate_x", "pool2")] < 1e-5
    assert exact[("rotation", "conv1")] > 0.2
    best = t[t["method"] == "best"].set_index(["transform", "layer"])["mean"]
    assert (best <= exact + 1e-12).all()
    assert list(result.layers["stride"]) == [1.0, 4.0]
    # the stored per-image rows give the aggregate again
    from invariscope.runs import RunStore

    per_image = RunStore.open(tmp_path / "run").read_table("alignment")
    rows = per_image[(per_image["method"] == "exact") & (per_image["layer"] == "conv1")]
    rows = rows[rows["transform"] == "rotation"]
    assert len(rows) == 6
    assert rows["error"].mean() == pytest.approx(exact[("rotation", "conv1")])
    assert ((rows["num"] / rows["den"]) ** 0.5).tolist() == pytest.approx(rows["error"].tolist())
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").glob("*.png"))
    assert figures == ["alignment_rotation.png", "alignment_translate_x.png"]

    for kwargs, words in (
        ({"transforms": "wobble"}, "unknown transform 'wobble'"),
        ({"transforms": "hflip"}, "not a transformation the alignment check supports"),
        ({"transforms": "rotation,rotation"}, "listed twice"),
        ({"transforms": "zoom", "magnitudes": {"zoom": [0.0]}}, "zoom"),
        ({"transforms": "rotation", "magnitudes": {"zoom": [2.0]}}, "not among"),
        ({"layers": []}, "at least one layer"),
        ({"margin": -1}, "margin"),
    ):
        with pytest.raises(InvariscopeError, match=words):
            AlignmentAnalysis(**kwargs)
    with pytest.raises(InvariscopeError, match="no feature grid"):
        alignment(trained, digits, "rotation", layers=["fc"], images=2, progress=False)
    assert isinstance(result.tables["transforms"], pd.DataFrame)
