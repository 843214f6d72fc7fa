"""Registry, Classifier wrapper and built-in architectures of invariscope.models."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invariscope.models as models
from invariscope.errors import InvariscopeError
from invariscope.models import (
    Classifier,
    capture_activations,
    create_model,
    list_models,
    model_info,
    register_model,
)
from invariscope.models import registry as registry_module
from invariscope.models.zoo import SMALL_CONFIGS


@pytest.fixture
def clean_registry():
    """Restore the registry after a test that registers models."""
    saved = dict(registry_module._MODELS)
    yield
    registry_module._MODELS.clear()
    registry_module._MODELS.update(saved)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------- registry-wide
def _small(name: str, size: int | None = None) -> dict:
    """The zoo's small configuration of ``name`` (same module tree, fewer channels and
    blocks: the full-size ImageNet networks would cost minutes here), else nothing."""
    kwargs = dict(SMALL_CONFIGS.get(name, {}))
    if size is not None:
        kwargs["image_size"] = size
    elif name in SMALL_CONFIGS:
        kwargs["image_size"] = 32
    return kwargs


CASES = [
    pytest.param(name, size, id=f"{name}-{size}")
    for name in list_models()
    for size in (model_info(name).image_sizes or (None,))
]


@pytest.mark.parametrize(("name", "size"), CASES)
def test_every_registered_model_forward_shape_and_gradients(name, size):
    model = create_model(name, **_small(name, size))
    assert model.arch == name
    assert set(model_info(name).defaults) == set(model.arch_kwargs)
    c, h, w = model.input_size
    if size is not None:
        assert (h, w) == (size, size)
    x = torch.rand(2, c, h, w, generator=_gen())
    logits = model(x)
    assert logits.shape == (2, model.num_classes)
    assert torch.isfinite(logits).all()
    # a random weighting so that no gradient vanishes by symmetry of a plain sum
    weight = torch.randn(logits.shape, generator=_gen(1))
    (logits * weight).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: gradient of {pname} not finite"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_layers_capture_in_one_pass(name):
    model = create_model(name, **_small(name)).eval()
    assert model.layer_names, f"{name} declares no probe-able layers"
    assert len(set(model.layer_names)) == len(model.layer_names)
    x = torch.rand(3, *model.input_size, generator=_gen())
    with torch.no_grad():
        logits, acts = capture_activations(model, x, model.layer_names)
        assert torch.equal(logits, model(x))
    assert list(acts) == model.layer_names
    for layer_name, act in acts.items():
        assert isinstance(act, torch.Tensor) and act.shape[0] == 3, layer_name
        assert model.layer(layer_name) is dict(model.named_modules())[layer_name]


# --------------------------------------------------------------------------- registry
def test_builtin_models_are_registered_with_documented_defaults():
    assert {"simple-cnn", "small-vgg", "small-resnet"} <= set(list_models())
    assert list_models() == sorted(list_models())
    assert list_models("small-*") == ["small-resnet", "small-vgg"]
    info = model_info("simple-cnn")
    assert info.defaults == {"in_channels": 1, "image_size": 28, "num_classes": 10, "width": 64}
    assert info.image_sizes == (28, 60, 112)
    assert info.description.startswith("Finnveden et al.'s MNIST CNN")
    assert "\n" not in info.description
    for name in ("small-vgg", "small-resnet"):
        d = model_info(name).defaults
        assert (d["in_channels"], d["image_size"], d["num_classes"]) == (3, 32, 10)
        assert model_info(name).image_sizes == (32, 64)


def test_unknown_model_lists_known_names():
    with pytest.raises(InvariscopeError) as err:
        create_model("simple-cn")
    msg = str(err.value)
    assert "did you mean 'simple-cnn'" in msg
    assert "small-vgg" in msg and "small-resnet" in msg
    assert "\n" not in msg
    with pytest.raises(InvariscopeError, match="unknown model 'nope'"):
        model_info("nope")


def test_duplicate_and_malformed_names_are_refused(clean_registry):
    with pytest.raises(InvariscopeError, match="already registered"):

        @register_model("simple-cnn")
        def again(num_classes: int = 10):  # pragma: no cover - never called
            raise AssertionError

    for bad in ("a:b", "dir/name", "", "has space"):
        with pytest.raises(InvariscopeError, match="invalid model name"):
            register_model(bad)

    with pytest.raises(InvariscopeError, match="without a default"):

        @register_model("needs-arg")
        def needs_arg(width):  # pragma: no cover - never called
            raise AssertionError

    with pytest.raises(InvariscopeError, match="takes no image_size"):

        @register_model("no-size", image_sizes=(32,))
        def no_size(num_classes: int = 10):  # pragma: no cover - never called
            raise AssertionError

    assert "needs-arg" not in list_models() and "no-size" not in list_models()


def test_registered_factory_gets_arch_and_full_kwargs(clean_registry):
    @register_model("tiny-linear")
    def tiny_linear(num_classes: int = 3, pixels: int = 4) -> Classifier:
        """A linear layer on 1x2x2 images.

        More text that is not the description.
        """
        return Classifier(
            nn.Sequential(nn.Flatten(), nn.Linear(pixels, num_classes)),
            input_size=(1, 2, 2),
            num_classes=num_classes,
            layer_names=["net.1"],
        )

    assert model_info("tiny-linear").description == "A linear layer on 1x2x2 images."
    model = create_model("tiny-linear", num_classes=5, class_names=list("abcde"), mean=0.25)
    assert model.arch == "tiny-linear"
    assert model.arch_kwargs == {"num_classes": 5, "pixels": 4}
    assert model.class_names == ["a", "b", "c", "d", "e"]
    assert model.mean.tolist() == [0.25]
    assert model.layer_names == ["net.1"]
    with pytest.raises(InvariscopeError, match="takes no argument 'depth'.*num_classes, pixels"):
        create_model("tiny-linear", depth=3)


# ------------------------------------------------------------------------ Classifier
def _flat(c: int = 1, h: int = 2, w: int = 2, **kw) -> Classifier:
    """A Classifier whose 'logits' are the normalised pixels, to see preprocessing."""
    return Classifier(nn.Flatten(), input_size=(c, h, w), num_classes=c * h * w, **kw)


def test_classifier_normalisation_is_applied():
    model = _flat(mean=0.5, std=0.5)
    x = (torch.arange(8, dtype=torch.float32) / 8).reshape(2, 1, 2, 2)  # dyadic: exact
    assert torch.equal(model(x), (2 * x - 1).flatten(1))

    rgb = _flat(3, 2, 2, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
    x = torch.rand(4, 3, 2, 2, generator=_gen())
    expected = torch.stack([(x[:, 0] - 0.1) / 1, (x[:, 1] - 0.2) / 2, (x[:, 2] - 0.3) / 4], 1)
    torch.testing.assert_close(rgb(x), expected.flatten(1))


def test_preprocessing_buffers_are_in_state_dict_and_settable():
    model = _flat(3, 2, 2, mean=0.25, std=(1, 2, 4))
    state = model.state_dict()
    assert state["mean"].tolist() == [0.25, 0.25, 0.25]
    assert state["std"].tolist() == [1.0, 2.0, 4.0]
    model.set_preprocessing(mean=(0.5, 0.5, 0.5), std=0.5, input_size=(3, 2, 2))
    assert model.mean.tolist() == [0.5] * 3 and model.std.tolist() == [0.5] * 3
    with pytest.raises(InvariscopeError, match="2 channel"):
        model.set_preprocessing(input_size=(2, 2, 2))
    with pytest.raises(InvariscopeError, match="std must be > 0"):
        model.set_preprocessing(std=0.0)
    with pytest.raises(InvariscopeError, match="2 values"):
        model.set_preprocessing(mean=(0.1, 0.2))


def test_input_checks_print_the_received_shape():
    model = create_model("simple-cnn")
    cases = [
        (torch.rand(2, 28, 28), r"\[2, 28, 28\]"),
        (torch.rand(2, 3, 28, 28), r"\[2, 3, 28, 28\].*3 channel"),
        (torch.rand(2, 1, 32, 32), r"\[2, 1, 32, 32\].*resize"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), r"torch.uint8"),
    ]
    for x, pattern in cases:
        with pytest.raises(InvariscopeError, match=pattern) as err:
            model(x)
        assert "\n" not in str(err.value)
        assert "[B, 1, 28, 28]" in str(err.value)


def test_resize_to_input_size_when_enabled():
    model = create_model("simple-cnn", resize=True).eval()
    x = torch.rand(2, 1, 56, 56, generator=_gen())
    expected = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(expected))
        small = torch.rand(2, 1, 14, 14, generator=_gen())
        up = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(small), model(up))
    with pytest.raises(InvariscopeError, match="channel"):
        model(torch.rand(2, 3, 56, 56))  # resizing never changes the channel count


def test_class_names_and_num_classes():
    model = create_model("simple-cnn")
    assert model.num_classes == 10 and model.class_names == [str(i) for i in range(10)]
    model.class_names = list("abcdefghij")
    assert model.class_names[3] == "d"
    with pytest.raises(InvariscopeError, match="3 class names given for a model with 10"):
        model.class_names = ["a", "b", "c"]
    with pytest.raises(InvariscopeError, match="class_names or num_classes"):
        Classifier(nn.Flatten(), input_size=(1, 2, 2))
    with pytest.raises(InvariscopeError, match="2 class names given for num_classes=3"):
        Classifier(nn.Flatten(), input_size=(1, 2, 2), class_names=["a", "b"], num_classes=3)
    with pytest.raises(InvariscopeError, match="input_size"):
        Classifier(nn.Flatten(), input_size=(2, 2), num_classes=4)


def test_layer_lookup_long_and_short_names():
    model = create_model("simple-cnn")
    assert model.layer_names == [
        "net.conv1",
        "net.pool1",
        "net.relu1",
        "net.conv2",
        "net.pool2",
        "net.relu2",
        "net.fc",
    ]
    assert model.layer("net.conv1") is model.net.conv1
    assert model.layer("conv1") is model.net.conv1
    resnet = create_model("small-resnet", blocks=2)
    assert resnet.layer("layer2.1.conv2") is resnet.net.layer2[1].conv2
    for bad in ("conv9", ""):
        with pytest.raises(InvariscopeError, match="unknown layer") as err:
            model.layer(bad)
        assert "net.conv1" in str(err.value) and "net.fc" in str(err.value)
    with pytest.raises(InvariscopeError, match="not a submodule"):
        Classifier(nn.Flatten(), input_size=(1, 2, 2), num_classes=4, layer_names=["net.x"])


def test_default_layer_names_expand_containers():
    net = nn.Module()
    net.stem = nn.Conv2d(3, 4, 3)
    net.blocks = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()))
    net.head = nn.Linear(4, 2)
    assert models.default_layer_names(net, "net.") == [
        "net.stem",
        "net.blocks.0",
        "net.blocks.1.0",
        "net.blocks.1.1",
        "net.head",
    ]


# -------------------------------------------------------------------- built-in nets
@pytest.mark.parametrize(
    ("size", "fc_in"), [(28, 64 * 2 * 2), (60, 64 * 10 * 10), (112, 64 * 23 * 23)]
)
def test_simple_cnn_linear_size_follows_image_size(size, fc_in):
    # 28: conv9 -> 20, pool -> 10, conv7 -> 4, pool -> 2; 60: 52, 26, 20, 10; 112: 104, 52, 46, 23
    model = create_model("simple-cnn", image_size=size)
    net = model.net
    assert net.fc.in_features == fc_in
    assert (net.conv1.kernel_size, net.conv1.out_channels) == ((9, 9), 64)
    assert (net.conv2.kernel_size, net.conv2.out_channels) == ((7, 7), 64)
    assert [n for n, _ in net.named_children()] == [
        "conv1", "pool1", "relu1", "conv2", "pool2", "relu2", "flatten", "fc",
    ]  # fmt: skip
    assert model.mean.tolist() == [0.5] and model.std.tolist() == [0.5]


def test_simple_cnn_too_small_and_other_channels():
    with pytest.raises(InvariscopeError, match="image_size must be >= 22"):
        create_model("simple-cnn", image_size=20)
    rgb = create_model("simple-cnn", in_channels=3, num_classes=4)
    assert rgb.input_size == (3, 28, 28)
    assert rgb(torch.rand(1, 3, 28, 28)).shape == (1, 4)


def test_small_nets_use_global_average_pooling():
    for name in ("small-vgg", "small-resnet"):
        model = create_model(name, width=8).eval()
        assert isinstance(model.net.gap, nn.AdaptiveAvgPool2d)
        assert model.net.fc.in_features == 32  # 4 * width
        # the same weights serve both sizes: only input_size differs
        big = create_model(name, width=8, image_size=64).eval()
        big.load_state_dict(model.state_dict())
        x = torch.rand(2, 3, 64, 64, generator=_gen())
        with torch.no_grad():
            torch.testing.assert_close(big(x), model.net((x - 0.5) / 0.5))


def test_module_doctests():
    for mod in ("registry", "classifier", "capture"):
        module = importlib.import_module(f"invariscope.models.{mod}")
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, mod
