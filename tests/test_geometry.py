"""Feature-grid geometry of any network (models/geometry.py) and per-call layer names."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.models import Classifier, capture_activations, create_model
from invariscope.models.geometry import from_map, to_map, trace_geometry
from invariscope.models.zoo import SMALL_CONFIGS


def _grid(model, layer, size):
    geo = trace_geometry(model, size).get(model, layer)
    assert geo is not None, layer
    return geo


def test_sequential_nets_keep_the_hand_checked_values():
    # simple-cnn: conv 9x9 -> pool 2 -> relu -> conv 7x7 -> pool 2 -> relu (28 px)
    model = create_model("simple-cnn")
    g = _grid(model, "pool2", (28, 28)).grid
    assert (g.stride, g.offset, g.size) == ((4.0, 4.0), (11.5, 11.5), (2, 2))
    g = _grid(model, "conv1", (28, 28)).grid
    assert (g.stride, g.offset, g.rf, g.size) == ((1.0, 1.0), (4.0, 4.0), (4.0, 4.0), (20, 20))


def _support_centre(net: nn.Module, size: int, j: tuple[int, int]) -> tuple[float, float]:
    """Centre of the input pixels feature ``j`` of a LINEAR net depends on (its gradient's
    support): the receptive field's centre, computed by autograd."""
    x = torch.zeros(1, 1, size, size, requires_grad=True)
    y = net(x)
    y[0, :, j[0], j[1]].sum().backward()
    ys, xs = torch.nonzero(x.grad[0, 0].abs() > 0, as_tuple=True)
    return (float(ys.min() + ys.max()) / 2, float(xs.min() + xs.max()) / 2)


class _Padded(nn.Module):
    """TF-style 'same' padding (asymmetric, functional), a strided and a dilated conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 1, 3, stride=2)
        self.b = nn.Conv2d(1, 1, 3, padding=2, dilation=2)
        self.c = nn.Conv2d(1, 1, 4, stride=2, padding=1)
        for m in (self.a, self.b, self.c):
            nn.init.constant_(m.weight, 1.0)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.a(nn.functional.pad(x, (0, 1, 0, 1)))
        return self.c(self.b(x))


def test_offsets_are_receptive_field_centres_found_by_autograd():
    net = _Padded()
    size = 40
    g = trace_geometry(net, (size, size), channels=1).get(net, "c").grid
    for j in [(3, 4), (5, 2), (4, 4)]:
        assert (g.interior[0][0] <= j[0] <= g.interior[0][1]) and (
            g.interior[1][0] <= j[1] <= g.interior[1][1]
        )
        cy, cx = _support_centre(net, size, j)
        assert (cy, cx) == (g.offset[0] + g.stride[0] * j[0], g.offset[1] + g.stride[1] * j[1])
    assert g.stride == (4.0, 4.0)


def test_integer_shift_by_the_stride_moves_a_residual_network_by_one_cell():
    model = create_model("resnet18", image_size=32, num_classes=3, **SMALL_CONFIGS["resnet18"])
    model.eval()
    size = 96
    geo = trace_geometry(model, (size, size)).get(model, "net.layer2.0")
    s = int(geo.grid.stride[1])
    assert s == 8 and geo.layout.is_standard_map
    x = torch.zeros(1, 3, size, size)
    x[..., 24:72, 24:72] = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    moved = torch.roll(x, s, dims=3)  # the content stays far from the borders
    from invariscope.measure.alignment import _features

    with torch.no_grad():
        a = _features(model, x, ["net.layer2.0"])["net.layer2.0"]
        b = _features(model, moved, ["net.layer2.0"])["net.layer2.0"]
    (ylo, yhi), (xlo, xhi) = geo.grid.interior
    assert ylo <= yhi and xlo < xhi
    torch.testing.assert_close(
        b[..., ylo : yhi + 1, xlo + 1 : xhi + 1], a[..., ylo : yhi + 1, xlo:xhi], atol=1e-5, rtol=0
    )


def test_vit_tokens_are_a_grid_and_round_trip():
    model = create_model("vit_b_16", image_size=32, num_classes=3, **SMALL_CONFIGS["vit_b_16"])
    model.eval()
    p = SMALL_CONFIGS["vit_b_16"]["patch_size"]
    trace = trace_geometry(model, (32, 32))
    proj = trace.get(model, "net.conv_proj")
    block = trace.get(model, "net.encoder.layers.encoder_layer_0")
    assert proj.grid.stride == (p, p) and proj.grid.offset == ((p - 1) / 2, (p - 1) / 2)
    assert block.layout.kind == "tokens" and block.layout.dims == (1,) and block.layout.start == 1
    assert block.grid.size == (32 // p, 32 // p) and block.grid.stride == proj.grid.stride
    assert trace.get(model, "net.heads.head") is None  # the class token alone: no grid
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _, acts = capture_activations(
            model, x, ["net.conv_proj", "net.encoder.layers.encoder_layer_0"]
        )
    tokens = acts["net.encoder.layers.encoder_layer_0"]
    fmap = to_map(tokens, block.layout, block.grid.size)
    assert fmap.shape == (2, tokens.shape[-1], 32 // p, 32 // p)
    # token 1 + (row * w + col) is the map's cell (row, col)
    w = 32 // p
    assert torch.equal(fmap[:, :, 1, 2], tokens[:, 1 + 1 * w + 2])
    assert torch.equal(from_map(fmap, block.layout, tokens), tokens)


def test_channels_last_layers_are_read_where_the_trace_finds_the_axes():
    model = create_model(
        "convnext_tiny", image_size=32, num_classes=3, **SMALL_CONFIGS["convnext_tiny"]
    )
    net = model.net
    trace = trace_geometry(model, (32, 32))
    inner = trace.get(model, "net.features.1.0.block.2")  # the LayerNorm on [B, h, w, C]
    assert inner.layout.kind == "map" and inner.layout.dims == (1, 2)
    outer = trace.get(model, "net.features.1.0")
    assert outer.layout.is_standard_map and outer.grid == inner.grid
    assert net is model.net


class _SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()  # used twice, as in torchvision's BasicBlock
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        z = self.relu(self.conv2(y) + y)
        return self.fc(self.pool(z).flatten(1))


def test_reused_modules_are_addressed_per_call():
    model = Classifier(_SharedReLU(), input_size=(1, 8, 8), num_classes=3).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        logits, acts = capture_activations(model, x, ["relu:0", "relu:1", "conv1", "conv2"])
        first = torch.relu(acts["conv1"])
        second = torch.relu(acts["conv2"] + first)
    assert torch.equal(acts["relu:0"], first) and torch.equal(acts["relu:1"], second)
    with pytest.raises(InvariscopeError, match=r"ran 2 times.*'relu:0' \(first\), 'relu:1'"):
        capture_activations(model, x, ["relu"])
    with pytest.raises(InvariscopeError, match="did not run"):
        capture_activations(model, x, ["relu:2"])
    # the default probes leave the reused module out; each runs exactly once
    assert "net.relu" not in model.layer_names
    assert model.layer_names == ["net.conv1", "net.conv2", "net.pool", "net.fc"]
    # the geometry trace names each call
    trace = trace_geometry(model, (8, 8))
    assert trace.calls["net.relu"] == 2
    assert trace.get(model, "relu:1").grid.rf == (2.0, 2.0)
    assert trace.get(model, "relu:0").grid.rf == (1.0, 1.0)
    assert trace.get(model, "relu") is None


def test_residual_default_probes_are_block_outputs():
    model = create_model("resnet50", image_size=32, num_classes=3, **SMALL_CONFIGS["resnet50"])
    assert [n for n in model.layer_names if n.startswith("net.layer1")] == ["net.layer1.0"]
    net = copy.deepcopy(model.net)
    del net.layer_names  # as a user's own module: nothing declared
    names = Classifier(net, input_size=(3, 32, 32), num_classes=3).layer_names
    assert names[:2] == ["net.conv1", "net.bn1"]
    assert "net.layer1.0" in names and "net.layer4.0" in names
    assert not any(n.count(".") > 2 for n in names)  # nothing inside a block


def test_lee_per_layer_reads_the_named_call_of_a_reused_module():
    from invariscope.measure.lee import lie_derivatives

    torch.manual_seed(0)
    model = Classifier(_SharedReLU(), input_size=(1, 8, 8), num_classes=3).double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    d = lie_derivatives(model, x, "brightness", layers=["relu:0", "relu:1"])
    with torch.no_grad():
        _, acts = capture_activations(model, x, ["relu:0", "relu:1"])
        h = 1e-6
        _, up = capture_activations(model, x + h, ["relu:1"])
        _, down = capture_activations(model, x - h, ["relu:1"])
    for name in ("relu:0", "relu:1"):
        torch.testing.assert_close(d.layers[name][1], acts[name])
    # brightness acts trivially on maps: the layer's error is d/dt of its own output
    torch.testing.assert_close(d.layers["relu:1"][0], (up["relu:1"] - down["relu:1"]) / (2 * h))
