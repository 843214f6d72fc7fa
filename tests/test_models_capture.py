"""Activation capture: one forward pass, hooks always removed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.models import ActivationCapture, Classifier, capture_activations, create_model


def _no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


def _images(n: int = 3, c: int = 1, s: int = 28) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(0))


def test_capture_values_from_one_forward_pass():
    model = create_model("simple-cnn").eval()
    x = _images()
    forwards = []
    counter = model.net.register_forward_hook(lambda *args: forwards.append(1))
    with torch.no_grad():
        logits, acts = capture_activations(model, x, ["net.conv1", "relu2", "net.fc"])
    counter.remove()
    assert len(forwards) == 1
    assert list(acts) == ["net.conv1", "relu2", "net.fc"]  # keys as given, in order
    assert acts["net.conv1"].shape == (3, 64, 20, 20)
    assert acts["relu2"].shape == (3, 64, 2, 2)
    assert torch.equal(acts["net.fc"], logits)
    with torch.no_grad():
        conv1 = F.conv2d((x - 0.5) / 0.5, model.net.conv1.weight, model.net.conv1.bias)
        relu2 = F.relu(F.max_pool2d(model.net.conv2(F.relu(F.max_pool2d(conv1, 2))), 2))
    torch.testing.assert_close(acts["net.conv1"], conv1)
    torch.testing.assert_close(acts["relu2"], relu2)
    assert (acts["relu2"] >= 0).all()
    assert _no_hooks(model)


def test_capture_keeps_the_graph_and_accepts_a_single_name():
    model = create_model("simple-cnn")
    logits, acts = capture_activations(model, _images(2), "conv2")
    assert acts["conv2"].requires_grad
    (grad,) = torch.autograd.grad(logits.sum(), acts["conv2"])
    assert grad.shape == acts["conv2"].shape and grad.abs().sum() > 0


def test_hooks_removed_when_forward_raises():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            self.conv(x)
            raise RuntimeError("boom")

    model = Classifier(Exploding(), input_size=(1, 8, 8), num_classes=2)
    with pytest.raises(RuntimeError, match="boom"):
        capture_activations(model, torch.rand(1, 1, 8, 8), ["net.conv", "net.fc"])
    assert _no_hooks(model)
    with pytest.raises(InvariscopeError, match=r"\[1, 1, 9, 9\]"):  # the input check too
        capture_activations(model, torch.rand(1, 1, 9, 9), ["net.conv"])
    assert _no_hooks(model)


def test_unknown_layer_lists_valid_names_and_registers_nothing():
    model = create_model("simple-cnn")
    with pytest.raises(InvariscopeError) as err:
        capture_activations(model, _images(1), ["net.conv1", "conv3"])
    msg = str(err.value)
    assert "unknown layer 'conv3'" in msg and "net.conv1" in msg and "net.relu2" in msg
    assert "\n" not in msg
    assert _no_hooks(model)


def test_reused_or_unused_layers_are_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.relu(self.relu(x.flatten(1))))  # the same ReLU twice

    model = Classifier(Net(), input_size=(1, 2, 2), num_classes=2)
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(InvariscopeError, match="layer 'relu' ran 2 times"):
        capture_activations(model, x, ["relu"])
    with pytest.raises(InvariscopeError, match="layer 'net.unused' did not run"):
        capture_activations(model, x, ["net.fc", "net.unused"])
    assert _no_hooks(model)


def test_plain_modules_use_module_paths():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.rand(5, 3)
    out, acts = capture_activations(net, x, ["1", "1"])  # repeats are dropped
    assert list(acts) == ["1"]
    torch.testing.assert_close(acts["1"], torch.tanh(net[0](x)))
    torch.testing.assert_close(out, net[2](acts["1"]))
    with pytest.raises(InvariscopeError, match="unknown layer '3'.*0, 1, 2"):
        capture_activations(net, x, ["3"])
    assert _no_hooks(net)


def test_activation_capture_context_manager():
    model = create_model("small-vgg", width=4).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ActivationCapture(model, ["pool1", "net.gap"]) as cap:
        assert len(model.net.pool1._forward_hooks) == 1
        model(x)
        model(x[:1])
    assert _no_hooks(model)
    assert cap.calls == {"pool1": 2, "net.gap": 2}
    assert cap.activations["pool1"].shape == (1, 4, 16, 16)  # the latest call
    assert cap.activations["net.gap"].shape == (1, 16, 1, 1)
    cap.clear()
    assert cap.activations == {} and cap.calls == {"pool1": 0, "net.gap": 0}
    with pytest.raises(ValueError, match="inside"), ActivationCapture(model, ["pool1"]):
        raise ValueError("inside")
    assert _no_hooks(model)
