"""Checkpoints and load_model: registry names, module:factory, torchvision:, timm:."""

from __future__ import annotations

import os
import sys
import textwrap
import types
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    Classifier,
    capture_activations,
    create_model,
    list_models,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from invariscope.models import checkpoint as checkpoint_module
from invariscope.models.zoo import SMALL_CONFIGS

# TorchScript is deprecated in recent torch, but users still bring such files.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _trained_like(model: Classifier) -> Classifier:
    """Move BatchNorm running statistics off their initial values, then eval mode."""
    with torch.no_grad():
        model.train()(torch.rand(4, *model.input_size, generator=_gen(5)))
    return model.eval()


# ------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", list_models())
def test_checkpoint_rebuilds_every_registered_model_bit_for_bit(tmp_path, name):
    small = {"image_size": 32, **SMALL_CONFIGS[name]} if name in SMALL_CONFIGS else {}
    model = _trained_like(create_model(name, **small))
    model.set_preprocessing(mean=0.25, std=0.75, resize=True)
    model.class_names = [f"class-{i}" for i in range(model.num_classes)]
    path = save_checkpoint(
        model,
        tmp_path / "sub" / "model.pt",
        train_config={"lr": 0.01, "epochs": 2, "out": Path("/tmp/x"), "sizes": (28, 60)},
        data_fingerprint="abc123",
        extra={"note": "hello", "curve": torch.arange(3)},
    )
    assert path == tmp_path / "sub" / "model.pt"
    assert sorted(os.listdir(path.parent)) == ["model.pt"]  # no temporary file left
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(3, *model.input_size, generator=_gen())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.arch == name and loaded.arch_kwargs == model.arch_kwargs
    assert loaded.class_names == model.class_names
    assert loaded.input_size == model.input_size and loaded.resize is True
    assert loaded.mean.tolist() == [0.25] * model.input_size[0]
    assert loaded.layer_names == model.layer_names
    assert meta["format"] == "invariscope-checkpoint" and meta["format_version"] == 1
    assert meta["train_config"] == {"lr": 0.01, "epochs": 2, "out": "/tmp/x", "sizes": (28, 60)}
    assert meta["data_fingerprint"] == "abc123"
    assert meta["extra"]["note"] == "hello" and torch.equal(meta["extra"]["curve"], torch.arange(3))
    assert meta["preprocessing"]["input_size"] == list(model.input_size)
    assert "state_dict" not in meta


def test_checkpoint_keeps_non_default_arch_kwargs(tmp_path):
    model = create_model("small-resnet", width=4, blocks=2, num_classes=3, image_size=64).eval()
    loaded, meta = load_checkpoint(save_checkpoint(model, tmp_path / "r.pt"))
    assert meta["arch_kwargs"] == {
        "in_channels": 3,
        "image_size": 64,
        "num_classes": 3,
        "width": 4,
        "blocks": 2,
    }
    x = torch.rand(2, 3, 64, 64, generator=_gen())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_failed_save_leaves_no_partial_file_and_keeps_old_one(tmp_path, monkeypatch):
    model = create_model("simple-cnn").eval()
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, extra={"version": "old"})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    # one line (an InvariscopeError), not a traceback; nothing half-written stays
    with pytest.raises(InvariscopeError, match=r"model\.pt \(disk full\); nothing was written"):
        save_checkpoint(model, path, extra={"version": "new"})
    with pytest.raises(InvariscopeError, match="disk full"):
        save_checkpoint(model, tmp_path / "other.pt")
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["extra"] == {"version": "old"}


def test_save_refuses_what_it_cannot_rebuild_or_store(tmp_path):
    hand_made = Classifier(nn.Flatten(), input_size=(1, 2, 2), num_classes=4)
    with pytest.raises(InvariscopeError, match="no arch") as err:
        save_checkpoint(hand_made, tmp_path / "a.pt")
    _one_line(err)
    model = create_model("simple-cnn")
    with pytest.raises(InvariscopeError, match=r"train_config\['opt'\] holds a object"):
        save_checkpoint(model, tmp_path / "b.pt", train_config={"opt": object()})
    with pytest.raises(InvariscopeError, match="data_fingerprint must be a str"):
        save_checkpoint(model, tmp_path / "c.pt", data_fingerprint=123)
    with pytest.raises(InvariscopeError, match="needs a Classifier"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "d.pt")
    assert os.listdir(tmp_path) == []


def test_corrupt_and_foreign_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(create_model("simple-cnn"), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "plain.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save(_Pickled(), tmp_path / "pickled.pt")
    ckpt = torch.load(good, weights_only=True)
    torch.save({**ckpt, "format_version": 99}, tmp_path / "future.pt")
    torch.save({**ckpt, "arch": None}, tmp_path / "noarch.pt")
    expected = {
        "truncated.pt": "cannot read checkpoint file",
        "noise.pt": "cannot read checkpoint file",
        "plain.pt": "not an invariscope checkpoint: it looks like a plain state_dict",
        "tensor.pt": "not an invariscope checkpoint: it holds a Tensor",
        "pickled.pt": "holds Python objects",
        "future.pt": "format version 99.*upgrade invariscope",
        "noarch.pt": "not a valid invariscope checkpoint.*'arch'",
        "missing.pt": "checkpoint file not found",
    }
    for name, pattern in expected.items():
        with pytest.raises(InvariscopeError, match=pattern) as err:
            load_checkpoint(tmp_path / name)
        assert name in _one_line(err)


class _Pickled:
    """Stands for a whole pickled model object (not loadable with weights_only)."""


def test_checkpoint_whose_weights_do_not_fit(tmp_path):
    ckpt = torch.load(
        save_checkpoint(create_model("simple-cnn"), tmp_path / "a.pt"), weights_only=True
    )
    ckpt["arch_kwargs"]["num_classes"] = 5
    torch.save(ckpt, tmp_path / "b.pt")
    with pytest.raises(InvariscopeError, match="10 class names given for a model with 5"):
        load_checkpoint(tmp_path / "b.pt")
    ckpt["class_names"] = list("abcde")
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(
        InvariscopeError,
        match=r"2 of another shape \(net.fc.weight \[10, 256\] vs \[5, 256\], net.fc.bias \[10\] vs \[5\]\)",
    ):
        load_checkpoint(tmp_path / "c.pt")


# ----------------------------------------------------------------- registry name specs
def test_load_model_registry_name_with_and_without_weights(tmp_path):
    fresh = load_model("simple-cnn", num_classes=4)
    assert not fresh.training and fresh.num_classes == 4 and fresh.arch == "simple-cnn"
    assert fresh.arch_kwargs == {"in_channels": 1, "image_size": 28, "num_classes": 4, "width": 64}

    source = _trained_like(create_model("small-vgg", width=4))
    torch.save(source.net.state_dict(), tmp_path / "net.pt")  # weights of the network
    save_checkpoint(
        source.set_preprocessing(class_names=list("abcdefghij"), mean=0.3), tmp_path / "c.pt"
    )
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    with torch.no_grad():
        expected = source(x)
        from_net = load_model("small-vgg", tmp_path / "net.pt", model_kwargs={"width": 4}, mean=0.3)
        assert torch.equal(from_net(x), expected)
        # an invariscope checkpoint as weights brings its preprocessing and labels
        from_ckpt = load_model("small-vgg", tmp_path / "c.pt", model_kwargs={"width": 4})
        assert torch.equal(from_ckpt(x), expected)
        assert from_ckpt.class_names[0] == "a"
        relabelled = load_model(tmp_path / "c.pt", class_names=list("qrstuvwxyz"))
        assert relabelled.class_names[0] == "q" and torch.equal(relabelled(x), expected)


def test_load_model_unknown_and_missing_specs(tmp_path):
    with pytest.raises(
        InvariscopeError, match="unknown model 'small-vg'.*did you mean 'small-vgg'"
    ):
        load_model("small-vg")
    with pytest.raises(InvariscopeError, match="model file not found"):
        load_model(str(tmp_path / "nothing.pt"))
    with pytest.raises(InvariscopeError, match="is a directory"):
        load_model(tmp_path)
    path = save_checkpoint(create_model("simple-cnn"), tmp_path / "m.pt")
    with pytest.raises(InvariscopeError, match="holds its own weights"):
        load_model(path, weights=path)
    with pytest.raises(InvariscopeError, match="weights file not found"):
        load_model("simple-cnn", weights=tmp_path / "absent.pt")


def test_weights_that_do_not_fit_are_one_line(tmp_path):
    torch.save({"conv1.weight": torch.zeros(3), "extra.bias": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(InvariscopeError) as err:
        load_model("simple-cnn", tmp_path / "w.pt")
    msg = _one_line(err)
    assert "5 missing (conv1.bias, conv2.weight, conv2.bias, ...)" in msg
    assert "1 unexpected (extra.bias)" in msg
    assert "1 of another shape (conv1.weight [3] vs [64, 1, 9, 9])" in msg
    torch.save({"epoch": 3, "net": {}}, tmp_path / "nosd.pt")
    with pytest.raises(InvariscopeError, match="no state_dict found.*'epoch' holds a int"):
        load_model("simple-cnn", tmp_path / "nosd.pt")


# ------------------------------------------------------------------ module:factory
FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes=4, width=8, in_channels=3):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
            )
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(self.features(x).flatten(1))


    def make(num_classes=4, width=8):
        return Net(num_classes, width)


    def make_gray():
        return Net(6, 4, in_channels=1)


    class Builders:
        @staticmethod
        def fixed():
            return Net(5)
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user's model module written to tmp_path and put on sys.path; yields its name."""
    name = f"user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _reference(module_name: str, seed: int = 3, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return __import__(module_name).make(**kw).eval()


def _normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def test_factory_wrapped_with_default_imagenet_preprocessing(factory_module):
    model = load_model(f"{factory_module}:make")
    assert isinstance(model, Classifier) and not model.training
    assert model.input_size == (3, 224, 224)
    torch.testing.assert_close(model.mean, torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(model.std, torch.tensor(IMAGENET_STD))
    assert model.num_classes == 4  # found by running the network once
    assert model.arch == f"{factory_module}:make" and model.arch_kwargs == {}
    assert model.layer_names == ["net.features.0", "net.features.1", "net.features.2", "net.fc"]
    gray = load_model(f"{factory_module}:make_gray")
    assert gray.input_size == (1, 28, 28) and gray.mean.tolist() == pytest.approx(MNIST_MEAN)
    fixed = load_model(f"{factory_module}:Builders.fixed", input_size=(3, 8, 8))
    assert fixed.num_classes == 5


@pytest.mark.parametrize("fmt", ["state_dict", "checkpoint_dict", "model_key", "torchscript"])
def test_factory_with_each_weights_format(factory_module, tmp_path, fmt):
    ref = _reference(factory_module, num_classes=7, width=6)
    path = tmp_path / f"weights-{fmt}.pt"
    if fmt == "state_dict":
        torch.save(ref.state_dict(), path)
    elif fmt == "checkpoint_dict":  # a training checkpoint of a DataParallel model
        state = {f"module.{k}": v for k, v in ref.state_dict().items()}
        torch.save({"epoch": 12, "state_dict": state, "best": 0.9}, path)
    elif fmt == "model_key":
        torch.save({"model": ref.state_dict(), "optimizer": {"lr": 0.1}}, path)
    else:
        torch.jit.script(ref).save(str(path))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    model = load_model(
        f"{factory_module}:make",
        path,
        num_classes=7,
        input_size=(3, 16, 16),
        mean=mean,
        std=std,
        model_kwargs={"width": 6},
    )
    assert model.arch_kwargs == {"width": 6, "num_classes": 7}
    x = torch.rand(2, 3, 16, 16, generator=_gen())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(_normalised(x, mean, std)), rtol=0, atol=1e-6)


def test_factory_model_checkpoint_reloads(factory_module, tmp_path):
    ref = _reference(factory_module, num_classes=3)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    model = load_model(
        f"{factory_module}:make",
        tmp_path / "w.pt",
        class_names=["a", "b", "c"],
        input_size=(3, 12, 12),
    )
    path = save_checkpoint(model, tmp_path / "ckpt.pt")
    loaded, meta = load_checkpoint(path)
    assert meta["arch"] == f"{factory_module}:make" and meta["arch_kwargs"] == {"num_classes": 3}
    assert loaded.class_names == ["a", "b", "c"] and loaded.input_size == (3, 12, 12)
    x = torch.rand(4, 3, 12, 12, generator=_gen())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_factory_errors(factory_module, tmp_path):
    with pytest.raises(
        InvariscopeError, match="unknown factory in module.*'mkae'.*did you mean 'make'"
    ):
        load_model(f"{factory_module}:mkae")
    with pytest.raises(
        InvariscopeError, match="cannot import module 'no_such_mod_xyz'.*PYTHONPATH"
    ):
        load_model("no_such_mod_xyz:make")
    with pytest.raises(InvariscopeError, match="has 5 outputs, not 3"):
        load_model(f"{factory_module}:Builders.fixed", num_classes=3, input_size=(3, 8, 8))
    with pytest.raises(InvariscopeError, match=r"fails on one image of size \[2, 8, 8\]") as err:
        load_model(f"{factory_module}:make", input_size=(2, 8, 8))
    assert isinstance(err.value.__cause__, RuntimeError)  # kept for the traceback
    with pytest.raises(InvariscopeError, match="cannot take"):
        load_model(f"{factory_module}:make", model_kwargs={"depth": 3})
    (tmp_path / "broken_user_mod.py").write_text("import not_installed_dependency_xyz\n")
    with pytest.raises(InvariscopeError, match="not_installed_dependency_xyz") as err:
        load_model("broken_user_mod:make")
    assert isinstance(err.value.__cause__, ModuleNotFoundError)
    torch.save(_Pickled(), tmp_path / "pickled.pt")
    with pytest.raises(InvariscopeError, match="holds Python objects"):
        load_model(f"{factory_module}:make", tmp_path / "pickled.pt")


def test_torchscript_file_as_model(factory_module, tmp_path):
    ref = _reference(factory_module)
    path = tmp_path / "scripted.pt"
    torch.jit.script(ref).save(str(path))
    model = load_model(path, input_size=(3, 10, 10), mean=0.5, std=0.5)
    assert model.arch is None and model.layer_names == [] and model.num_classes == 4
    x = torch.rand(2, 3, 10, 10, generator=_gen())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(2 * x - 1), rtol=0, atol=1e-6)
    with pytest.raises(InvariscopeError, match="no arch"):
        save_checkpoint(model, tmp_path / "ckpt.pt")
    with pytest.raises(InvariscopeError, match="TorchScript file, not an invariscope checkpoint"):
        load_checkpoint(path)
    with pytest.raises(
        InvariscopeError, match="TorchScript model, which cannot take forward hooks"
    ):
        capture_activations(model, x, ["net"])
    assert all(
        not m._forward_hooks for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)
    )


# ------------------------------------------------------------- torchvision: and timm:
class _Tiny(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.conv1(x)).flatten(1))


@pytest.fixture
def fake_torchvision(monkeypatch):
    calls: list[dict] = []

    def resnet_tiny(*, weights=None, progress=True, **kwargs):
        calls.append({"weights": weights, **kwargs})
        return _Tiny(**kwargs)

    package = types.ModuleType("torchvision")
    tv_models = types.ModuleType("torchvision.models")
    tv_models.resnet_tiny = resnet_tiny
    package.models = tv_models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv_models)
    return calls


def test_torchvision_without_weights_has_random_weights_and_says_so(fake_torchvision):
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match=r"^torchvision:resnet_tiny has random weights") as rec:
        model = load_model("torchvision:resnet_tiny", num_classes=5)
    assert len(rec) == 1 and "(no weights=FILE given)" in str(rec[0].message)
    assert fake_torchvision == [{"weights": None, "num_classes": 5}]  # never downloads
    torch.manual_seed(3)
    fresh = _Tiny(num_classes=5)  # the builder's own random initialisation
    for name, value in fresh.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], value)


def test_torchvision_get_model_api_without_weights(fake_torchvision, monkeypatch, capsys):
    """A torchvision that only lists models and builds them with ``get_model``; on the
    command line the random-weights warning is one line on stderr."""
    from invariscope.errors import command_line

    tv_models = sys.modules["torchvision.models"]
    built: list[str] = []

    def get_model(name, **kwargs):
        built.append(name)
        return tv_models.resnet_tiny(**kwargs)

    monkeypatch.setattr(tv_models, "list_models", lambda: ["resnet_tiny"], raising=False)
    monkeypatch.setattr(tv_models, "get_model", get_model, raising=False)
    with command_line():
        model = load_model("torchvision:resnet_tiny", num_classes=3)
    assert built == ["resnet_tiny"] and model.num_classes == 3
    err = capsys.readouterr().err
    assert err == (
        "invariscope: warning: torchvision:resnet_tiny has random weights (no --weights given)\n"
    )


def test_torchvision_with_weights_file(fake_torchvision, tmp_path):
    torch.manual_seed(7)
    ref = _Tiny(num_classes=10).eval()
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    model = load_model("torchvision:resnet_tiny", tmp_path / "tv.pth", num_classes=10)
    assert fake_torchvision[0] == {"weights": None, "num_classes": 10}
    assert model.input_size == (3, 224, 224)
    torch.testing.assert_close(model.mean, torch.tensor(IMAGENET_MEAN))
    assert model.layer_names == ["net.conv1", "net.avgpool", "net.fc"]
    model.set_preprocessing(input_size=(3, 16, 16))
    x = torch.rand(2, 3, 16, 16, generator=_gen())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(_normalised(x, IMAGENET_MEAN, IMAGENET_STD)))
    loaded, meta = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt.pt"))
    assert meta["arch"] == "torchvision:resnet_tiny" and meta["arch_kwargs"] == {"num_classes": 10}
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(
        InvariscopeError, match="unknown torchvision model 'resnet_tiyn'.*resnet_tiny"
    ):
        load_model("torchvision:resnet_tiyn", tmp_path / "tv.pth")


def test_torchvision_model_builder_api(fake_torchvision, monkeypatch, tmp_path):
    """torchvision >= 0.14 lists its models and hands out builders by name."""
    tv_models = sys.modules["torchvision.models"]
    monkeypatch.setattr(
        tv_models, "list_models", lambda: ["resnet_tiny", "vgg_tiny"], raising=False
    )
    monkeypatch.setattr(
        tv_models, "get_model_builder", lambda name: tv_models.resnet_tiny, raising=False
    )
    torch.save(_Tiny(num_classes=2).state_dict(), tmp_path / "w.pt")
    model = load_model("torchvision:resnet_tiny", tmp_path / "w.pt", num_classes=2)
    assert model.num_classes == 2 and fake_torchvision == [{"weights": None, "num_classes": 2}]
    with pytest.raises(
        InvariscopeError, match="unknown torchvision model 'vgg'.*resnet_tiny, vgg_tiny"
    ):
        load_model("torchvision:vgg", tmp_path / "w.pt")


def test_missing_optional_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # behaves as not installed
    monkeypatch.setitem(sys.modules, "timm", None)
    torch.save({}, tmp_path / "w.pt")
    for spec, extra in (("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm")):
        with pytest.raises(InvariscopeError) as err:
            load_model(spec, tmp_path / "w.pt")
        msg = _one_line(err)
        assert f"{extra} is not installed" in msg
        assert f"pip install -c constraints.txt 'invariscope[{extra}]'" in msg


def test_broken_optional_package_is_reported_not_swallowed(monkeypatch, tmp_path):
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.delitem(sys.modules, "torchvision.models", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save({}, tmp_path / "w.pt")
    with pytest.raises(InvariscopeError) as err:
        load_model("torchvision:resnet18", tmp_path / "w.pt")
    msg = _one_line(err)
    assert "torchvision is installed but does not match torch" in msg
    assert "RuntimeError: operator torchvision::nms does not exist" in msg
    assert "a CUDA wheel against a CPU torch" in msg
    base = torch.__version__.partition("+")[0]
    minor = int(base.split(".")[1])
    assert f"torchvision 0.{minor + 15}, the one made for torch {base}" in msg
    assert "from the same index as torch" in msg
    assert "the built-in zoo name 'resnet18' (--model resnet18)" in msg
    assert "invariscope[torchvision]" not in msg  # not the reinstall that broke it
    assert isinstance(err.value.__cause__, RuntimeError)


@pytest.fixture
def fake_timm(monkeypatch):
    calls: list[dict] = []

    def create(name, pretrained=False, **kwargs):
        calls.append({"name": name, "pretrained": pretrained, **kwargs})
        net = _Tiny(**kwargs)
        net.pretrained_cfg = {
            "input_size": (3, 20, 20),
            "mean": (0.5, 0.4, 0.3),
            "std": (0.2, 0.3, 0.4),
        }
        return net

    timm = types.ModuleType("timm")
    timm.create_model = create
    timm.list_models = lambda pattern="*": ["tiny_vit", "tiny_convnet"]
    timm.is_model = lambda name: name in timm.list_models()
    monkeypatch.setitem(sys.modules, "timm", timm)
    return calls


def test_timm_with_weights_file(fake_timm, tmp_path):
    torch.manual_seed(11)
    ref = _Tiny(num_classes=3).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "timm.pth")
    with pytest.warns(UserWarning, match="timm:tiny_convnet has random weights"):
        load_model("timm:tiny_convnet", num_classes=3)
    fake_timm.clear()
    model = load_model("timm:tiny_convnet", tmp_path / "timm.pth", class_names=["x", "y", "z"])
    assert fake_timm == [{"name": "tiny_convnet", "pretrained": False, "num_classes": 3}]
    assert model.input_size == (3, 20, 20) and model.class_names == ["x", "y", "z"]
    x = torch.rand(2, 3, 20, 20, generator=_gen())
    with torch.no_grad():
        expected = ref(_normalised(x, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)))
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(InvariscopeError, match="unknown timm model 'tiny_convnt'.*tiny_convnet"):
        load_model("timm:tiny_convnt", tmp_path / "timm.pth")
