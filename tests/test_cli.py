"""The command line: help texts, one-line errors with exit status 2, train end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import one_line_error

from invariscope.cli import run
from invariscope.cli._app import _load_commands, cli

_load_commands()
COMMANDS = sorted(cli.commands)


def test_core_commands_exist():
    assert {"train", "demo", "transforms", "models", "datasets"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_example(command, capsys):
    assert run([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example:" in out
    assert f"invariscope {command}" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["no-such-command"], "No such command"),
        (["train", "--model", "simple-cn", "--epochs", "1"], "did you mean 'simple-cnn'"),
        (["train", "--data", "no-such-data", "--epochs", "1"], "unknown dataset"),
        (["train", "--augment", "rotation", "--epochs", "1"], "NAME=LOW:HIGH"),
        (["train", "--augment", "spin=-3:3", "--epochs", "1"], "unknown transform"),
        (["train", "--augment", "zoom=-1:2", "--epochs", "1"], "zoom"),
        (["train", "--epochs", "zero"], "'zero' is not a valid integer"),
        (["train", "--epochs", "0"], "0 is not in the range x>=1"),
        (
            ["train", "--device", "cuda:7", "--epochs", "1"]
            if not torch.cuda.is_available()
            else ["train", "--device", "nodevice", "--epochs", "1"],
            "device",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, fragment, capsys, tmp_path):
    out = tmp_path / "m.pt"
    assert run([*argv, "--out", str(out)] if argv[0] == "train" else argv) == 2
    assert fragment in one_line_error(capsys)
    assert not out.exists()


def test_listings_name_everything(capsys):
    from invariscope.data import list_datasets
    from invariscope.models import list_models
    from invariscope.transforms import list_transforms

    for command, names in [
        ("transforms", list_transforms()),
        ("models", list_models()),
        ("datasets", [d.name for d in list_datasets()]),
    ]:
        assert run([command]) == 0
        out = capsys.readouterr().out
        for name in names:
            assert name in out, (command, name)


def test_train_writes_checkpoint_that_reloads(tmp_path, capsys):
    from invariscope.data import create_dataset
    from invariscope.models import load_checkpoint
    from invariscope.train import evaluate

    out = tmp_path / "model.pt"
    argv = [
        "train",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "--augment",
        "rotation=-10:10",
    ]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    model, meta = load_checkpoint(out)
    acc = evaluate(model, create_dataset("digits", "test"))
    assert f"test accuracy {acc:.4f}" in printed
    assert meta["train_config"]["augment"] == {"rotation": [-10.0, 10.0]}
    assert meta["train_config"]["epochs"] == 1
    assert meta["data_fingerprint"] == create_dataset("digits", "train").fingerprint
    assert list(model.class_names) == [str(i) for i in range(10)]


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "invariscope", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "invariscope" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "invariscope", "models", "--bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such option" in proc.stderr.lower()
