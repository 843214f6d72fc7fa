"""Bad input a user can fix: one line ``invariscope: error: ...``, exit status 2, no traceback,
nothing half-written. A table: case, command, expected exit code, expected words.

Later analyses extend :data:`CASES`. ``{tmp}`` in a command is a fresh temporary folder,
``{file}`` an existing plain file, ``{folder}`` a small image folder (two classes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from invariscope.cli import run
from invariscope.errors import InvariscopeError, command_line, hint

SWEEP = ["sweep", "--model", "simple-cnn", "--data", "digits", "--transforms", "rotation"]
WORST = ["worst-case", "--model", "simple-cnn", "--data", "digits", "--images", "4"]
ALIGN = ["alignment", "--model", "simple-cnn", "--data", "digits", "--transforms", "zoom"]
ALIGN += ["--images", "4"]

CASES = [
    # (case, command, exit code, words of the message)
    (
        "device name",
        [*SWEEP, "--device", "nonsense", "--out", "{tmp}/r"],
        2,
        "--device 'nonsense' is not a device",
    ),
    (
        "device index",
        [*SWEEP, "--device", "cuda:abc", "--out", "{tmp}/r"],
        2,
        "--device 'cuda:abc' is not a device",
    ),
    (
        "train device",
        [
            "train",
            "--model",
            "simple-cnn",
            "--data",
            "digits",
            "--device",
            "nonsense",
            "--out",
            "{tmp}/m.pt",
        ],
        2,
        "is not a device",
    ),
    ("demo device", ["demo", "--device", "cuda:abc", "--out", "{tmp}/demo"], 2, "is not a device"),
    ("negative seed", [*SWEEP, "--seed", "-1", "--out", "{tmp}/r"], 2, "--seed"),
    (
        "negative workers",
        [
            "sweep",
            "--model",
            "simple-cnn",
            "--data",
            "{folder}",
            "--transforms",
            "rotation",
            "--workers",
            "-1",
            "--out",
            "{tmp}/r",
        ],
        2,
        "--workers",
    ),
    ("out under a file", [*WORST, "--out", "{file}/sub"], 2, "cannot write the run directory"),
    ("out is a file", [*WORST, "--out", "{file}"], 2, "is a file"),
    (
        "huge worst-case grid",
        [*WORST, "--wc-grid", "100000x100000", "--out", "{tmp}/r"],
        2,
        "over the limit of 100,000,000",
    ),
    (
        "huge 2-D grid",
        [
            "sweep",
            "--model",
            "simple-cnn",
            "--data",
            "digits",
            "--pair",
            "rotation,translate_x",
            "--range",
            "rotation=-180:180:0.01",
            "--range",
            "translate_x=-0.5:0.5:0.001",
            "--out",
            "{tmp}/r",
        ],
        2,
        "raise the limit with --max-work",
    ),
    (
        "zero forward batch",
        [*SWEEP, "--forward-batch", "0", "--out", "{tmp}/r"],
        2,
        "--forward-batch",
    ),
    ("bad input size", [*SWEEP, "--input-size", "3,x,2", "--out", "{tmp}/r"], 2, "--input-size"),
    (
        "zero timeout",
        [*SWEEP, "--timeout", "0", "--out", "{tmp}/r"],
        2,
        "--timeout must be positive",
    ),
    (
        "negative learning rate",
        ["train", "--data", "digits", "--lr", "-0.1", "--out", "{tmp}/m.pt"],
        2,
        "--lr must be a finite number > 0",
    ),
    (
        "NaN learning rate",
        ["train", "--data", "digits", "--lr", "nan", "--out", "{tmp}/m.pt"],
        2,
        "--lr must be a finite number > 0",
    ),
    (
        "train over a file that is not a checkpoint",
        ["train", "--data", "digits", "--epochs", "1", "--out", "{file}"],
        2,
        "not an invariscope checkpoint",
    ),
    (
        "one-class folder",
        ["train", "--data", "{oneclass}", "--epochs", "1", "--out", "{tmp}/m.pt"],
        2,
        "a classifier needs at least 2 classes",
    ),
    (
        "factory that raises",
        [*SWEEP[:2], "userraise:build", *SWEEP[3:], "--out", "{tmp}/r"],
        2,
        "factory userraise:build failed: ValueError: bad",
    ),
    (
        "IDX header overflowing int64",
        [*SWEEP[:4], "mnist:{idx}", *SWEEP[5:], "--out", "{tmp}/r"],
        2,
        "is truncated",
    ),
    ("demo out under a file", ["demo", "--out", "{file}/demo"], 2, "{file}"),
    # issue 21, item 6
    (
        "overwrite on a folder holding a config.json of someone else's",
        [*WORST, "--out", "{foreign}", "--overwrite"],
        2,
        "is not an invariscope run directory",
    ),
    (
        "a folder holding a config.json of someone else's",
        [*WORST, "--out", "{foreign}"],
        2,
        "is not an invariscope run directory",
    ),
    (
        "overwrite on a folder of user files",
        [*WORST, "--out", "{userdir}", "--overwrite"],
        2,
        "is not an invariscope run directory",
    ),
    (
        "antialias of a 5-class model against 10-class data",
        ["antialias", "--model", "{five}", "--data", "digits", "--out", "{tmp}/aa.pt"],
        2,
        "the model has 5 classes but the dataset has 10",
    ),
    (
        "antialias average pool bigger than the map",
        [
            "antialias",
            "--model",
            "simple-cnn",
            "--method",
            "avgpool",
            "--pool-size",
            "1000",
            "--out",
            "{tmp}/aa.pt",
        ],
        2,
        "--pool-size 1000 is larger than every feature map",
    ),
    (
        "alignment magnitude that leaves no position",
        [*ALIGN, "--magnitudes", "zoom=1e9", "--out", "{tmp}/r"],
        2,
        "zoom=1e+09 moves every position",
    ),
    (
        "alignment margin of 100000 pixels",
        [*ALIGN, "--margin", "100000", "--out", "{tmp}/r"],
        2,
        "--margin 100000 is wider than the 28x28 image",
    ),
    (
        "itn hidden width of 10^8",
        [
            "itn",
            "--model",
            "simple-cnn",
            "--data",
            "digits",
            "--hidden",
            "100000000",
            "--out",
            "{tmp}/r",
        ],
        2,
        "--hidden must be at most 65,536",
    ),
]

#: Words a case's message must NOT hold (a fix that would destroy the user's files).
NOT_SAID = {
    "overwrite on a folder holding a config.json of someone else's": "--overwrite",
    "a folder holding a config.json of someone else's": "--overwrite",
    "overwrite on a folder of user files": "--overwrite",
}


@pytest.fixture
def places(tmp_path, monkeypatch):
    from PIL import Image

    plain = tmp_path / "afile.txt"
    plain.write_text("not a directory")
    rng = np.random.default_rng(0)

    def image_folder(root: Path, classes: tuple[str, ...]) -> Path:
        for cls in classes:
            (root / cls).mkdir(parents=True)
            for i in range(3):
                pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / cls / f"{i}.png")
        return root

    folder = image_folder(tmp_path / "imgs", ("a", "b"))
    one = image_folder(tmp_path / "one", ("cat",))
    idx = tmp_path / "idx"
    idx.mkdir()
    dims = np.array([2**22, 2**21, 2**21], ">u4").tobytes()  # 2**64 elements: 0 in int64
    for split in ("t10k", "train"):
        (idx / f"{split}-images-idx3-ubyte").write_bytes(bytes([0, 0, 0x08, 3]) + dims)
        (idx / f"{split}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 0x08, 1]) + np.array([1], ">u4").tobytes() + bytes([0])
        )
    (tmp_path / "userraise.py").write_text("def build():\n    raise ValueError('bad')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    foreign = tmp_path / "foreign"  # a folder that merely holds a file named config.json
    foreign.mkdir()
    (foreign / "config.json").write_text('{"learning_rate": 0.1}')
    (foreign / "results.csv").write_text("epoch,loss\n1,0.5\n")
    userdir = tmp_path / "userdir"
    userdir.mkdir()
    (userdir / "thesis.tex").write_text("\\documentclass{article}")
    from invariscope.models import create_model, save_checkpoint

    save_checkpoint(create_model("simple-cnn", num_classes=5), tmp_path / "five.pt")
    return {
        "foreign": str(foreign),
        "userdir": str(userdir),
        "five": str(tmp_path / "five.pt"),
        "tmp": str(tmp_path / "t"),
        "file": str(plain),
        "folder": f"folder:{folder}",
        "oneclass": f"folder:{one}",
        "idx": str(idx),
    }


@pytest.mark.parametrize("case, argv, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(case, argv, code, words, places, capsys):
    argv = [a.format(**places) for a in argv]
    words = words.format(**places)
    root = Path(places["file"]).parent
    before = _files(root, skip=Path(places["tmp"]))
    assert run(argv) == code, case
    err = capsys.readouterr().err.strip()
    assert err.startswith("invariscope: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert words in err, err
    assert case not in NOT_SAID or NOT_SAID[case] not in err, err
    assert not Path(places["tmp"], "r", "aggregates").exists()
    assert not Path(places["tmp"], "aa.pt").exists()
    # nothing lost, nothing left: every file the user had is there, unchanged (and no
    # lock file or other leftover was added to a refused folder)
    assert _files(root, skip=Path(places["tmp"])) == before


def _files(root: Path, skip: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and skip not in p.parents and "__pycache__" not in p.parts
    }


def test_unwritable_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only place (simulated: root may write anywhere) gives one line, not a trace."""
    real = Path.mkdir

    def refuse(self, *args, **kwargs):
        if "readonly" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert run([*WORST, "--out", str(tmp_path / "readonly" / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write the run directory" in err and "PermissionError" in err
    assert "--out" in err and "\n" not in err


def test_fix_hints_speak_the_language_of_the_interface(tmp_path, capsys):
    from invariscope.data import create_dataset
    from invariscope.measure.worst_case import SpatialBudget, worst_case_spatial
    from invariscope.models import create_model, save_checkpoint

    model = tmp_path / "m.pt"
    save_checkpoint(create_model("simple-cnn"), model)
    out = tmp_path / "run"
    argv = [
        "worst-case",
        "--model",
        str(model),
        "--data",
        "digits",
        "--images",
        "4",
        "--wc-grid",
        "3x3",
        "--wc-k",
        "2",
        "--no-figures",
        "--no-progress",
    ]
    assert run([*argv, "--out", str(out)]) == 0
    assert run([*argv, "--seed", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err
    data = create_dataset("digits", "test")
    with pytest.raises(InvariscopeError, match="pass overwrite=True") as info:
        worst_case_spatial(
            create_model("simple-cnn"),
            data,
            SpatialBudget(angles=3, shifts=3),
            images=4,
            seed=3,
            out=out,
        )
    assert "--overwrite" not in str(info.value)
    with pytest.raises(InvariscopeError, match="max_work="):
        worst_case_spatial(
            create_model("simple-cnn"),
            data,
            SpatialBudget(angles=3, shifts=3),
            images=4,
            max_work=10,
        )
    assert hint("a", "b") == "a"
    with command_line():
        assert hint("a", "b") == "b"


# ---------------------------------------------------------------- one writer per run


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    from invariscope.runs.store import RunStore

    store = RunStore.open(run_dir)
    assert store.is_complete
    out = {f"a:{n}": store.read_aggregate(n) for n in store.aggregates()}
    out.update({f"p:{n}": store.read_table(n) for n in store.tables()})
    return out


def test_two_identical_commands_at_once_never_leave_a_traceback(tmp_path):
    from invariscope.models import create_model, save_checkpoint

    model = tmp_path / "m.pt"
    save_checkpoint(create_model("simple-cnn"), model)
    args = [
        "-m",
        "invariscope",
        "worst-case",
        "--model",
        str(model),
        "--data",
        "digits",
        "--images",
        "48",
        "--batch-size",
        "4",
        "--wc-grid",
        "5x3",
        "--wc-k",
        "3",
        "--no-figures",
        "--no-progress",
    ]
    reference = tmp_path / "reference"
    assert run([*args[2:], "--out", str(reference)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outcomes = []
    for trial in range(4):
        out = tmp_path / f"run{trial}"
        procs = [
            subprocess.Popen(
                [sys.executable, *args, "--out", str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        for code, err in results:
            assert "Traceback" not in err, err
            assert code == 0 or (code == 2 and "is in use by PID" in err), err
        outcomes.append(sorted(code for code, _ in results))
        if any(code == 2 for code, _ in results):  # the refused one: the same again resumes
            assert run([*args[2:], "--out", str(out)]) == 0
        with pytest.MonkeyPatch.context():
            got, want = _tables(out), _tables(reference)
        assert sorted(got) == sorted(want)
        for name in want:
            pd.testing.assert_frame_equal(got[name], want[name], check_exact=True, obj=name)
    assert [0, 2] in outcomes  # the lock was exercised at least once


def test_corrupt_part_is_recomputed_on_resume(tmp_path, capsys):
    from invariscope.models import create_model, save_checkpoint

    model = tmp_path / "m.pt"
    save_checkpoint(create_model("simple-cnn"), model)
    out = tmp_path / "run"
    argv = [
        "worst-case",
        "--model",
        str(model),
        "--data",
        "digits",
        "--images",
        "12",
        "--batch-size",
        "4",
        "--wc-grid",
        "3x3",
        "--wc-k",
        "2",
        "--no-figures",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert run(argv) == 0
    before = _tables(out)
    part = out / "parts" / "worst-000001"
    marker = json.loads((part / "_done.json").read_text())
    assert set(marker["sha256"]) == {"worst_case.parquet"}
    data = bytearray((part / "worst_case.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the Parquet file
    (part / "worst_case.parquet").write_bytes(bytes(data))
    assert run(argv) == 0
    after = _tables(out)
    for name in before:
        pd.testing.assert_frame_equal(after[name], before[name], check_exact=True, obj=name)
    marker_after = json.loads((part / "_done.json").read_text())
    assert marker_after["finished"] >= marker["finished"]
    assert marker_after["sha256"] == marker["sha256"]  # recomputed to the same bytes


FACTORY = """
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
"""


def test_input_size_option_is_what_the_hint_names(tmp_path, capsys, monkeypatch):
    (tmp_path / "userfactory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = [
        "worst-case",
        "--model",
        "userfactory:build",
        "--data",
        "shapes",
        "--images",
        "4",
        "--wc-grid",
        "3x3",
        "--wc-k",
        "2",
        "--no-figures",
        "--no-progress",
    ]
    assert run([*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--resize" in err and "resize=True" not in err  # a 3-channel net defaults to 224 px
    assert run([*argv, "--input-size", "3,32,32", "--out", str(tmp_path / "b")]) == 0
    assert run([*argv, "--resize", "--out", str(tmp_path / "c")]) == 0


# ------------------------------------------------ damaged or unwritable finished runs


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished worst-case run (with figures) of a saved model, and its command."""
    from invariscope.models import create_model, save_checkpoint

    root = tmp_path_factory.mktemp("finished")
    save_checkpoint(create_model("simple-cnn"), root / "m.pt")
    argv = [*WORST[:2], str(root / "m.pt"), *WORST[3:], "--wc-grid", "3x3", "--no-progress"]
    assert run([*argv, "--out", str(root / "run")]) == 0
    return root / "run", argv


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(300))


DAMAGED = [
    # (case, damage to the run directory, command after RUN, words)
    ("report on a truncated aggregate", "truncate", ["report", "{run}", "--out", "{tmp}/rep"]),
    ("report on an aggregate of random bytes", "random", ["report", "{run}", "--out", "{tmp}/r"]),
    ("render of a truncated aggregate", "truncate", ["render", "{run}"]),
    ("render of an aggregate of random bytes", "random", ["render", "{run}"]),
    ("render where figures/ is a file", "figures", ["render", "{run}"]),
    ("rerun of a complete run where figures/ is a file", "figures", ["{again}"]),
    ("render into a read-only folder", "readonly", ["render", "{run}", "--out", "{ro}"]),
]
WORDS = {
    "truncate": "is damaged",
    "random": "is damaged",
    "figures": "is a file, not a folder",
    "readonly": "PermissionError",
}


@pytest.mark.parametrize("case, damage, argv", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_run_is_one_clean_line_and_recovers(
    case, damage, argv, finished, tmp_path, capsys, monkeypatch
):
    import shutil

    source, command = finished
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    aggregate = run_dir / "aggregates" / "worst_case_summary.parquet"
    assert aggregate.is_file()
    good = pd.read_parquet(aggregate)
    if damage == "truncate":
        _truncate(aggregate)
    elif damage == "random":
        _random_bytes(aggregate)
    elif damage == "figures":
        shutil.rmtree(run_dir / "figures")
        (run_dir / "figures").write_text("my notes")
    else:  # a read-only place, simulated (root may write anywhere)
        real = Path.mkdir

        def refuse(self, *args, **kwargs):
            if "readonly" in str(self):
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    again = [*command, "--out", str(run_dir)]
    places = {"run": str(run_dir), "tmp": str(tmp_path / "t"), "ro": str(tmp_path / "readonly")}
    argv = again if argv == ["{again}"] else [a.format(**places) for a in argv]
    capsys.readouterr()
    assert run(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert err.startswith("invariscope: error: ") and "\n" not in err, err
    assert WORDS[damage] in err, err
    monkeypatch.undo()
    # nothing lost: the user's file stays; the same command recomputes the aggregates
    # from the stored parts (no part is computed again)
    parts = sorted(p.name for p in (run_dir / "parts").iterdir())
    if damage == "figures":
        assert (run_dir / "figures").read_text() == "my notes"
        (run_dir / "figures").unlink()
    assert run(again) == 0
    assert sorted(p.name for p in (run_dir / "parts").iterdir()) == parts
    pd.testing.assert_frame_equal(pd.read_parquet(aggregate), good, check_exact=True)
    assert run(["render", str(run_dir)]) == 0
