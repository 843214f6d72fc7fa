"""The Lie derivative / local equivariance error (``invariscope.measure.lee``).

Exactness: the "circular" models below use circular padding, stride-1 convolutions and
global average pooling, on images whose 4-pixel border is zero. The warp core fills
with ZEROS outside the image; a zero border makes the bilinear sub-pixel translation
of the image equal to a circular one (what leaves the frame, and what wraps in, is
zero), and at t = 0 the derivative is the forward difference with zeros outside, which
then equals the circular forward difference. Linear circular convolutions commute with
circular translations, and global pooling is invariant, so the linear model's
translation Lie derivative vanishes (to rounding, in float64). The border is 4 pixels,
not 2, so that every feature map of the two 3x3 convolutions is zero in its first
row/column too (the per-layer error compares the map's own zero-filled warp with the
circular shift).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.measure.lee import (
    LEEAnalysis,
    _contribution_values,
    lie_contributions,
    lie_derivative,
    lie_derivatives,
    lie_family,
    model_chain,
)
from invariscope.transforms import get_transform

DT = torch.float64


def _circular(relu: bool, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    act = nn.ReLU if relu else nn.Identity
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular", bias=bias),
        act(),
        nn.Conv2d(4, 5, 3, padding=1, padding_mode="circular", bias=bias),
        act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).to(DT)


def _bordered(n: int = 6, size: int = 16, border: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, size, size, dtype=DT)
    inner = size - 2 * border
    x[..., border:-border, border:-border] = torch.rand(n, 1, inner, inner, generator=g, dtype=DT)
    return x


def _lee(model, x, name, **kw) -> float:
    return float(lie_derivatives(model, x, name, **kw).tangent.pow(2).sum(1).mean())


def test_families_have_the_documented_units():
    x = torch.rand(2, 1, 8, 10, dtype=DT)
    one_px = lie_family("translate_x").apply(x, torch.ones(2, dtype=DT))
    assert torch.allclose(one_px[..., 1:], x[..., :-1]) and one_px[..., 0].abs().max() == 0
    down = lie_family("translate_y").apply(x, torch.ones(2, dtype=DT))
    assert torch.allclose(down[..., 1:, :], x[..., :-1, :])
    rot = lie_family("rotation").apply(x, torch.full((2,), 30.0, dtype=DT))
    assert torch.allclose(rot, get_transform("rotation")(x, 30.0))
    z = lie_family("zoom").apply(x, torch.full((2,), 0.5, dtype=DT))
    assert torch.allclose(z, get_transform("zoom")(x, float(torch.exp(torch.tensor(0.5)))))
    assert lie_family("translate_x").unit == "pixel" and lie_family("rotation").unit == "degree"
    assert lie_family("zoom").unit == "log-scale" and lie_family("contrast").unit == "log-factor"


def test_linear_circular_model_has_zero_translation_lee():
    """Measured: translate_x 1.7e-35, translate_y 6e-36, zoom 3.1e-2 (float64).

    Rotation is ~0 too (2e-38) and NOT a usable comparator: a linear circular conv stack
    followed by global average pooling computes (sum of kernels) x (sum of the image), and
    the bilinear rotation's derivative preserves the image's sum on a zero border (per
    row, the forward differences telescope to zero). Zoom changes the sum: clearly > 0.
    """
    model, x = _circular(relu=False), _bordered()
    zoom = _lee(model, x, "zoom")
    assert zoom > 1e-3
    for name in ("translate_x", "translate_y"):
        assert _lee(model, x, name) < 1e-10 * zoom


def test_relu_breaks_subpixel_translation_invariance():
    """With ReLUs the net is exactly invariant to INTEGER circular shifts, but the Lie
    derivative is a sub-pixel (bilinear) translation, i.e. a convolution with (1 - s, s),
    which ReLU does not commute with: relu'(z) * Dz has a non-zero mean, D relu(z) does
    not. Measured: translate_x 4.3e-5, translate_y 1.1e-4, rotation 1.8e-8, zoom 1.7e-4,
    against 1.7e-35 without ReLUs."""
    relu, x = _circular(relu=True), _bordered()
    linear = _lee(_circular(relu=False), x, "translate_x")
    shift = _lee(relu, x, "translate_x")
    assert shift > 1e-8
    assert shift > 1e20 * max(linear, 1e-300)
    assert shift > 1e-2 * _lee(relu, x, "zoom")
    assert shift > 1e-3 * _lee(relu, x, "rotation")
    # and the ReLU net IS invariant to an integer circular shift (the sub-pixel part matters)
    assert torch.allclose(relu(torch.roll(x, 1, dims=-1)), relu(x), atol=1e-12)


def _small_cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).to(DT)


@pytest.mark.parametrize(
    "name, base, kind",
    [
        ("translate_x", 0.0, "left"),  # at t = 0: grid_sample's floor-based one-sided slope
        ("translate_x", 0.3, "central"),  # non-integer sample positions: no kink
        ("rotation", 10.0, "central"),  # at 0 the one-sided direction varies per pixel
        ("brightness", 0.0, "central"),  # no resampling, no kink
        ("zoom", 0.1, "central"),
    ],
)
def test_jvp_matches_finite_differences(name, base, kind):
    """The jvp against a finite difference with h = 1e-5 (float64): measured relative
    errors 3e-9 .. 5e-10. At t = 0 every sample sits on a pixel centre, where bilinear
    interpolation has a kink; grid_sample's backward takes the floor cell, i.e. the
    forward difference I(x + 1) - I(x): for translate_x (sample x - t) that is the LEFT
    derivative in t, matched by (f(T_{-h} x) - f(x)) / (-h). A rotation at t = 0 moves
    samples left for some pixels and right for others, so no one-sided difference in t
    matches it (a central one differs by ~2.6x): it is checked at base 10 degrees."""
    model, fam = _small_cnn(), lie_family(name)
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(3), dtype=DT)

    def f(t: float) -> torch.Tensor:
        with torch.no_grad():
            return model(fam.apply(x, torch.full((4,), t, dtype=DT)))

    d = lie_derivatives(model, x, fam, base=base).tangent
    h = 1e-5
    if kind == "left":
        fd = (f(base - h) - f(base)) / (-h)
    else:
        fd = (f(base + h) - f(base - h)) / (2 * h)
    assert float(fd.norm()) > 1e-4
    assert float((d - fd).norm() / fd.norm()) < 0.02


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.mean(dim=(1, 2, 3))[:, None]


def test_a_model_that_ignores_its_input_has_exactly_zero_lee():
    model, x = _Constant(), torch.rand(3, 1, 8, 8, dtype=DT)
    for name in ("brightness", "rotation", "translate_x"):
        d = lie_derivatives(model, x, name)
        assert torch.equal(d.tangent, torch.zeros_like(d.tangent))
    assert model.bias.grad is None  # jvp w.r.t. t only: nothing reaches the parameters


def test_no_gradient_reaches_the_parameters_and_the_mode_is_restored():
    model, x = _small_cnn(), torch.rand(2, 1, 12, 12, dtype=DT)
    model.train()
    lie_derivatives(model, x, "rotation", layers=["0", "2"])
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_linear_circular_layers_are_translation_equivariant():
    """Per layer, d/dt T_-t Gamma(T_t x): measured ~1e-34 for every layer (bias-free convs,
    shapes preserved, stride 1; the 1x1 pool acts trivially), against 4e-6 .. 9e-6 for the
    convolutions under rotation (their maps are not rotation-equivariant)."""
    model, x = _circular(relu=False, bias=False), _bordered()
    layers = ["0", "2", "4"]
    rot = lie_derivatives(model, x, "rotation", layers=layers).layers
    for name in ("translate_x", "translate_y"):
        d = lie_derivatives(model, x, name, layers=layers).layers
        for layer in layers:
            assert float(d[layer][0].pow(2).mean()) < 1e-25
    for layer in ("0", "2"):
        assert float(rot[layer][0].pow(2).mean()) > 1e-7


# --------------------------------------------------------- layer-wise decomposition


@pytest.mark.parametrize("arch", ["simple-cnn", "small-resnet"])
@pytest.mark.parametrize("name", ["translate_x", "rotation", "brightness"])
def test_contributions_telescope_to_the_lie_derivative(arch, name):
    """sum_i c_i = d/dt f(T_t x) (float64): measured relative errors 3e-16 .. 6e-15
    (0 for brightness, whose whole derivative is the preprocessing's)."""
    from invariscope.models import create_model

    torch.manual_seed(0)
    model = create_model(arch).to(DT)
    c, h, w = model.input_size
    n = 2 if arch == "simple-cnn" else 1  # small-resnet: one image keeps the test quick
    x = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(4), dtype=DT)
    d = lie_derivatives(model, x, name).tangent
    parts = lie_contributions(model, x, name)
    assert parts.layers[0] == "preprocess" and parts.layers[-1] == "net.fc"
    if arch == "small-resnet":  # residual stages are units
        assert {"net.layer1", "net.layer2", "net.layer3"} <= set(parts.layers)
    assert parts.contributions.shape == (len(parts.layers), *d.shape)
    assert float(d.norm()) > 1e-4
    assert float((parts.contributions.sum(0) - d).norm() / d.norm()) < 1e-6
    contribution, share = _contribution_values(parts)
    assert abs(share.sum(0) - 1).max() < 1e-9
    if name == "brightness":  # photometric: trivial on every map, all in layer 0
        assert contribution[0].min() > 0 and abs(contribution[1:]).max() < 1e-25


def test_linear_circular_model_has_zero_contributions():
    """Translation: every layer's contribution measured <= 1e-33 (float64). Bias-free, as
    for the per-layer errors: a bias makes the maps' borders non-zero, so each map's own
    zero-filled warp differs from the circular shift, and the conv and pool layers then
    carry equal and opposite contributions (3.6e-4 and 6.3e-4 measured) that cancel."""
    model, x = _circular(relu=False, bias=False), _bordered()
    parts = lie_contributions(model, x, "translate_x")
    assert parts.layers == ["0", "1", "2", "3", "4", "5"]
    contribution, _ = _contribution_values(parts)
    assert contribution.max() < 1e-25
    assert float(parts.total.pow(2).sum(1).max()) < 1e-25


def test_relu_layers_carry_the_translation_contributions():
    """With ReLUs (circular, sub-pixel translation; bias-free, see above): the ReLU
    layers carry the whole derivative (measured mean contributions 3.4e-5 and 7.3e-5), the
    convolutions, the pool and the flatten nothing (<= 2.1e-37)."""
    model, x = _circular(relu=True, bias=False), _bordered()
    parts = lie_contributions(model, x, "translate_x")
    contribution, share = _contribution_values(parts)
    mean = contribution.mean(1)
    relus = [i for i, m in enumerate(model) if isinstance(m, nn.ReLU)]
    others = [i for i in range(len(model)) if i not in relus]
    assert mean[relus].min() > 1e-8
    assert mean[others].max() < 1e-20 * mean[relus].min()
    assert abs(share[relus].sum(0) - 1).max() < 1e-9


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv(x) + x).mean(dim=(2, 3)))


class _Tiny(torch.utils.data.Dataset):
    classes = ["a", "b"]

    def __init__(self) -> None:
        self.x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return self.x[i], i % 2


def test_a_non_chain_model_is_not_decomposed(caplog):
    from invariscope.models import Classifier

    torch.manual_seed(0)
    model = Classifier(_Branchy(), input_size=(1, 8, 8), mean=0.5, std=0.5, num_classes=2)
    assert model_chain(model) is None and model_chain(_Branchy()) is None
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(InvariscopeError, match="chain of modules"):
        lie_contributions(model, x, "translate_x")
    data = _Tiny()
    kw = dict(images=4, batch_size=4, progress=False, figures=False, layers=())
    with caplog.at_level("WARNING"):
        r = lie_derivative(model, data, "translate_x", **kw)
    assert "chain of modules" in caplog.text
    assert "lee_contrib_mean" not in r.tables and r.contributions.empty
    assert (r.summary["lee"] > 0).all()
    chain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2))
    assert "lee_contrib_mean" in lie_derivative(chain, data, "rotation", **kw).tables
    off = lie_derivative(chain, data, "rotation", decompose=False, **kw)
    assert "lee_contrib_mean" not in off.tables
    with pytest.raises(InvariscopeError, match="chain of modules"):
        lie_derivative(model, data, "translate_x", decompose=True, **kw)


@pytest.fixture(scope="module")
def digits():
    from invariscope.data import create_dataset

    return create_dataset("digits")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from invariscope.models import create_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lee") / "simple-cnn.pt"
    save_checkpoint(create_model("simple-cnn"), path)
    return path


def test_stored_run_equals_in_memory_run(digits, tmp_path):
    from invariscope.engine import run
    from invariscope.models import create_model

    torch.manual_seed(0)
    model = create_model("simple-cnn")
    kw = dict(images=8, batch_size=4, progress=False, figures=False)
    stored = lie_derivative(model, digits, ("translate_x", "rotation"), out=tmp_path / "r", **kw)
    memory = lie_derivative(model, digits, ("translate_x", "rotation"), **kw)
    assert stored.run_dir is not None and memory.run_dir is None
    assert sorted(stored.tables) == sorted(memory.tables)
    for name in stored.tables:
        pd.testing.assert_frame_equal(stored.tables[name], memory.tables[name], check_exact=True)
    s = stored.summary
    assert list(s.columns[:10]) == [
        "transform",
        "unit",
        "n",
        "lee",
        "lee_low",
        "lee_high",
        "lee_abs",
        "lee_abs_low",
        "lee_abs_high",
        "median_lee",
    ]
    assert s["unit"].tolist() == ["pixel", "degree"] and s["n"].tolist() == [8, 8]
    assert (s["lee"] > 0).all() and (s["lee_low"] <= s["lee"]).all()
    layers = stored.layers
    assert set(layers["layer"]) == {
        "net.conv1",
        "net.pool1",
        "net.relu1",
        "net.conv2",
        "net.pool2",
        "net.relu2",
    }
    contrib = stored.contributions
    assert list(contrib.columns) == [
        "transform",
        "layer",
        "order",
        "mean",
        "low",
        "high",
        "share_mean",
        "n",
    ]
    assert contrib["layer"].tolist()[:3] == ["preprocess", "net.conv1", "net.pool1"]
    assert (
        contrib.groupby("transform")["order"].apply(list).map(sorted).tolist()
        == [list(range(9))] * 2
    )
    assert (contrib["n"] == 8).all() and (contrib["mean"] >= 0).all()
    assert (contrib.groupby("transform")["share_mean"].sum() - 1).abs().max() < 1e-4
    # the per-image table, resumed from disk, is the one in memory
    again = run(LEEAnalysis(("translate_x", "rotation")), model, digits, out=tmp_path / "r", **kw)
    pd.testing.assert_frame_equal(
        again.table("lee").reset_index(drop=True),
        run(LEEAnalysis(("translate_x", "rotation")), model, digits, **kw)
        .table("lee")
        .reset_index(drop=True),
        check_exact=True,
    )


@pytest.mark.parametrize(
    "transforms, words",
    [
        ("wobble", "unknown transform 'wobble'"),
        ("hflip", "hflip is a discrete"),
        ("rot90", "discrete"),
        ("gaussian_blur", "not differentiable at the identity"),
        ("gaussian_noise", "random direction"),
        ("affine", "one-parameter"),
        ("rotation,rotation", "listed twice"),
        ((), "at least one transform"),
    ],
)
def test_bad_transforms_are_refused(transforms, words):
    with pytest.raises(InvariscopeError, match=words):
        LEEAnalysis(transforms)


@pytest.mark.parametrize("layer, words", [("conv9", "unknown layer 'conv9'"), ("fc", "4-D")])
def test_bad_layers_are_refused(digits, layer, words):
    from invariscope.models import create_model

    with pytest.raises(InvariscopeError, match=words):
        lie_derivative(create_model("simple-cnn"), digits, "rotation", layers=[layer], images=2)


def test_cli_on_digits(checkpoint, tmp_path, capsys):
    import invariscope.cli.lee  # noqa: F401 - registers the command
    from invariscope.cli import run as cli

    out = tmp_path / "run"
    argv = [
        "lee",
        "--model",
        str(checkpoint),
        "--data",
        "digits",
        "--transforms",
        "translate_x,zoom",
        "--layers",
        "net.conv1,net.relu2",
        "--images",
        "6",
        "--batch-size",
        "3",
        "--no-progress",
        "--no-figures",
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert "translate_x" in text and "log-scale" in text and "LEE (squared)" in text
    assert (out / "aggregates").is_dir()
    bad = ["lee", "--model", str(checkpoint), "--data", "digits", "--transforms", "hflip"]
    assert cli([*bad, "--out", str(tmp_path / "bad")]) != 0
    assert "discrete" in capsys.readouterr().err
