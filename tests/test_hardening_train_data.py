"""Hardening of training, data files, model loading and the demo cache.

Every problem a user can fix is one line ``invariscope: error: ...`` with exit status 2
(or an InvariscopeError from the Python API), and nothing half-written is left behind.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from conftest import one_line_error

from invariscope.cli import run
from invariscope.data.formats import read_idx
from invariscope.errors import InvariscopeError
from invariscope.models import check_class_names, create_model, load_model, save_checkpoint
from invariscope.models.checkpoint import load_checkpoint
from invariscope.train import check_train_settings, checkpoint_name, model_for_dataset, train

# ------------------------------------------------------------------ training settings


@pytest.mark.parametrize("lr", ["-0.1", "nan", "inf", "-inf", "0"])
def test_bad_lr_is_one_line_naming_the_range(lr, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert run(["train", "--lr", lr, "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "--lr must be a finite number > 0" in err and "Adam" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--epochs", "0"], "0 is not in the range x>=1"),
        (["--epochs", "-3"], "-3 is not in the range x>=1"),
        (["--train-batch", "0"], "0 is not in the range x>=1"),
        (["--threads", "0"], "0 is not in the range x>=1"),
    ],
)
def test_bad_epochs_batch_size_threads_are_one_line(args, fragment, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert run(["train", *args, "--out", str(out), "--no-progress"]) == 2
    assert fragment in one_line_error(capsys)
    assert not out.exists()


def test_train_api_refuses_bad_settings(digits_data):
    train_set, _ = digits_data
    model = model_for_dataset("simple-cnn", train_set)
    for kwargs, pattern in [
        ({"lr": float("nan")}, "--lr must be a finite number > 0"),
        ({"lr": -1.0}, "--lr must be a finite number > 0"),
        ({"epochs": 0}, "--epochs must be an integer of at least 1"),
        ({"train_batch": 0}, "train_batch must be an integer of at least 1"),
        ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0"),
        ({"threads": 0}, "--threads must be an integer of at least 1"),
    ]:
        with pytest.raises(InvariscopeError, match=pattern):
            train(model, train_set, progress=False, **kwargs)
    check_train_settings(epochs=1, batch_size=1, lr=1e-5, weight_decay=0.0)  # fine


# ------------------------------------------------------------------ one-class data, --out


def _folder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / cls / f"{i}.png")
    return root


def test_one_class_folder_is_refused(tmp_path, capsys):
    data = _folder(tmp_path / "data", ["cat"])
    out = tmp_path / "m.pt"
    argv = ["train", "--data", f"folder:{data}", "--epochs", "1", "--out", str(out)]
    assert run([*argv, "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "1 class (cat)" in err and "at least 2 classes" in err
    assert not out.exists()


def test_out_refuses_to_overwrite_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("my precious notes\n")
    argv = ["train", "--data", "digits", "--train-images", "64", "--epochs", "1", "--no-progress"]
    assert run([*argv, "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert "exists and is not an invariscope checkpoint" in err and "new path" in err
    assert out.read_text() == "my precious notes\n"
    # an existing invariscope checkpoint is replaced
    ckpt = tmp_path / "m.pt"
    save_checkpoint(create_model("simple-cnn"), ckpt)
    assert run([*argv, "--out", str(ckpt)]) == 0
    _, meta = load_checkpoint(ckpt)
    assert meta["train_config"]["size"] == 64


def test_default_out_name_is_a_safe_file_name():
    assert checkpoint_name("simple-cnn", "digits") == "simple-cnn_digits.pt"
    name = checkpoint_name("simple-cnn", "folder:../../" + "x" * 300)
    assert "/" not in name and ".." not in name and len(name) <= 90


# ------------------------------------------------------------------ determinism


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_train_twice_gives_bit_identical_weights_under_cpu_load(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--train-images", "256", "--epochs", "2"]
    argv += [
        "--no-progress",
        "--train-batch",
        "32",
        "--augment",
        "rotation=-20:20",
        "--threads",
        "2",
    ]
    assert run([*argv, "--out", str(tmp_path / "a.pt")]) == 0
    # the second run competes with busy processes for the CPU
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(max(2, os.cpu_count() or 2))
    ]
    try:
        assert run([*argv, "--out", str(tmp_path / "b.pt")]) == 0
    finally:
        for p in busy:
            p.kill()
            p.wait()
    capsys.readouterr()
    a, b = _weights(tmp_path / "a.pt"), _weights(tmp_path / "b.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = load_checkpoint(tmp_path / "a.pt")[1]
    assert meta["train_config"]["threads"] == 2


def test_train_restores_global_state(digits_data):
    train_set, _ = digits_data
    small = torch.utils.data.Subset(train_set, range(64))
    small.classes = train_set.classes
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    model = model_for_dataset("simple-cnn", train_set)
    result = train(model, small, epochs=1, progress=False, threads=1)
    assert result.config["threads"] == 1
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched


# ------------------------------------------------------------------ user factories


FACTORY_SOURCE = """
import torch
from invariscope.errors import InvariscopeError

def build(**kwargs):
    raise ValueError("bad")

def polite(**kwargs):
    raise InvariscopeError("polite: set depth")

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"hardening_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_failing_factory_is_one_line(user_module, tmp_path, capsys):
    with pytest.raises(
        InvariscopeError, match=rf"^factory {user_module}:build failed: ValueError: bad;"
    ):
        load_model(f"{user_module}:build")
    with pytest.raises(InvariscopeError, match="^polite: set depth$"):  # passes through as is
        load_model(f"{user_module}:polite")
    with pytest.raises(InvariscopeError, match="is a int, not a callable factory"):
        load_model(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(InvariscopeError, match="cannot import module"):
        load_model("no_such_module_for_hardening:build")
    # and from the command line
    out = tmp_path / "run"
    argv = ["sweep", "--model", f"{user_module}:build", "--data", "digits", "--out", str(out)]
    argv += ["--transforms", "rotation"]
    assert run(argv) == 2
    assert f"factory {user_module}:build failed: ValueError: bad" in one_line_error(capsys)


# ------------------------------------------------------------------ IDX headers


def test_idx_header_whose_size_overflows_int64_is_refused(tmp_path):
    path = tmp_path / "huge-images-idx3-ubyte"
    dims = np.array([2**22, 2**21, 2**21], ">u4").tobytes()  # 2**64 elements: 0 in int64
    path.write_bytes(bytes([0, 0, 0x08, 3]) + dims)
    with pytest.raises(InvariscopeError) as err:
        read_idx(path)
    message = str(err.value)
    assert str(path) in message and "truncated" in message and "\n" not in message
    assert str(2**64 + 16) in message  # the declared size, computed without overflow


# ------------------------------------------------------------------ demo cache path


def test_demo_cache_file_stays_inside_the_cache_with_a_short_name(tmp_path, monkeypatch):
    from invariscope.demo import cache_path

    monkeypatch.setenv("INVARISCOPE_CACHE", str(tmp_path / "cache"))
    models = (tmp_path / "cache" / "models").resolve()
    simple = cache_path("simple-cnn", "digits", "k")
    assert simple.parent.resolve() == models
    assert simple.name.startswith("simple-cnn_digits_") and simple.suffix == ".pt"
    for data in ["folder:../../x", "folder:../../../etc/passwd", "folder:/" + "d" * 244]:
        path = cache_path("simple-cnn", data, data)
        assert path.parent.resolve() == models, path
        assert len(path.name) <= 100 and set(path.stem) <= set(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # a real file system accepts the name
    assert cache_path("m", "a/b", "1") != cache_path("m", "a_b", "2")  # the hash tells apart


# ------------------------------------------------------------------ pickled code


class _System:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("how", ["torch.save", "pickle2", "pickle5"])
def test_pickled_code_is_refused_as_code(how, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"state_dict": _System()}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": _System()}, protocol=int(how[-1])))
    for call in (lambda: load_checkpoint(path), lambda: load_model("simple-cnn", path)):
        with pytest.raises(InvariscopeError) as err:
            call()
        message = str(err.value)
        assert "refused: the file holds" in message and "pickled code" in message
        assert "GLOBAL posix.system" in message or "GLOBAL nt.system" in message
        assert "\n" not in message
    assert "this must never run" not in capsys.readouterr().out


# ------------------------------------------------------------------ class names


def test_check_class_names():
    digits = NS(classes=[str(i) for i in range(10)])
    letters = NS(class_names=list("abcdefghij"))
    warning = check_class_names(letters, digits)
    assert warning is not None and "differ from the dataset's" in warning
    assert "dataset label 0 ('0') is scored as model output 0 ('a')" in warning
    assert check_class_names(NS(class_names=[str(i) for i in range(10)]), digits) is None
    swapped = NS(class_names=["1", "0", *map(str, range(2, 10))])
    assert "in another order" in check_class_names(swapped, digits)
    # nothing to compare: no names, other lengths, or a model's default names
    assert check_class_names(NS(class_names=list("abc")), digits) is None
    assert check_class_names(NS(), digits) is None
    assert check_class_names(letters, NS()) is None
    assert (
        check_class_names(
            NS(class_names=[str(i) for i in range(10)]), NS(classes=list("abcdefghij"))
        )
        is None
    )
    real = create_model("simple-cnn")
    real.class_names = list("abcdefghij")
    assert check_class_names(real, digits) is not None
