"""Distributed sweeps (torchrun and in-process ranks) and sweeps of 1000-class models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Tiny
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.measure.sweep import AGGREGATE_TABLES, PART_TABLES, sweep
from invariscope.runs.store import RunStore, shard

# --------------------------------------------------------------------------- helpers

ARGS = [
    "--data",
    "digits",
    "--transforms",
    "rotation,gaussian_noise",
    "--range",
    "rotation=-90:90:30",
    "--range",
    "gaussian_noise=0:0.6:0.2",
    "--images",
    "60",
    "--batch-size",
    "8",
    "--no-figures",
    "--no-progress",
]


def _stored(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Every aggregate and per-image table of a complete run."""
    run = RunStore.open(run_dir)
    assert run.is_complete, run_dir
    tables = {name: run.read_aggregate(name) for name in run.aggregates()}
    for name in run.tables():
        tables[name] = run.read_table(name)
    return tables


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        left, right = a[name], b[name]
        if "softmax_sum" in left.columns:  # arrays: compared exactly, apart from the frame
            assert np.array_equal(np.stack(left["softmax_sum"]), np.stack(right["softmax_sum"]))
            left, right = left.drop(columns="softmax_sum"), right.drop(columns="softmax_sum")
        pd.testing.assert_frame_equal(left, right, check_exact=True, obj=name)


def _ranks(run_dir: Path) -> dict[str, int]:
    """``{part id: rank that wrote it}`` from the done markers."""
    return {
        p.name: json.loads((p / "_done.json").read_text())["rank"]
        for p in sorted((run_dir / "parts").iterdir())
        if (p / "_done.json").is_file()
    }


def _status(run_dir: Path) -> str:
    return json.loads((run_dir / "manifest.json").read_text())["status"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "invariscope",
        "sweep",
        *argv,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=180, env=full_env, check=False
    )


def _single_process(argv: list[str]) -> None:
    """The same command in this process, one thread (as torchrun's workers)."""
    from invariscope.cli import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(["sweep", *argv]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """simple-cnn trained for one epoch on 200 digits images (accuracy ~0.7)."""
    from invariscope.data import create_dataset
    from invariscope.models import save_checkpoint
    from invariscope.train import model_for_dataset, train

    data = create_dataset("digits", "train", size=200)
    model = model_for_dataset("simple-cnn", data, seed=0)
    train(model, data, epochs=1, seed=0, progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    save_checkpoint(model, path)
    return path


# --------------------------------------------------------------------------- torchrun


def test_torchrun_two_ranks_equal_single_process(tmp_path, checkpoint):
    argv = ["--model", str(checkpoint), *ARGS]
    proc = _torchrun([*argv, "--out", str(tmp_path / "dist")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 prints the summary once; rank 1 prints nothing
    assert proc.stdout.count("60 images") == 1, proc.stdout
    assert "error" not in proc.stderr.lower(), proc.stderr[-3000:]
    _single_process([*argv, "--out", str(tmp_path / "single")])
    dist, single = _stored(tmp_path / "dist"), _stored(tmp_path / "single")
    assert set(AGGREGATE_TABLES) - set(dist) == {
        "accuracy_2d",
        "class_accuracy_2d",
        "worst_case_summary",
    }
    _assert_same(dist, single)
    # both ranks wrote parts, each only parts of its own shard (disjoint, covering)
    ranks = _ranks(tmp_path / "dist")
    ids = sorted(ranks)
    assert len(ids) == 8 * 2  # 60 images in batches of 8, two transformations
    assert set(ranks.values()) == {0, 1}
    for pid, rank in ranks.items():
        assert pid in shard(ids, rank, 2)
    manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["num_parts"] == 16
    meta = json.loads((tmp_path / "dist" / "meta.json").read_text())
    assert meta["world_size"] == 2


FLAKY = '''
import os
import torch
from invariscope.models import load_checkpoint


class FailingOnRank(torch.nn.Module):
    """The checkpoint's model; on rank $FAIL_RANK its second sweep forward pass (after the pre-flight one) raises."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += torch.is_inference_mode_enabled()  # not the shape probe of loading
        fail = os.environ.get("FAIL_RANK", "none") == os.environ.get("RANK")
        if fail and self.calls == 3:
            raise RuntimeError("simulated failure on rank " + os.environ["RANK"])
        return self.inner(x)


def build():
    return FailingOnRank(load_checkpoint(os.environ["DIST_TEST_CHECKPOINT"])[0])
'''


def test_failing_rank_leaves_run_incomplete_and_resume_completes(tmp_path, checkpoint, monkeypatch):
    (tmp_path / "distflaky.py").write_text(textwrap.dedent(FLAKY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DIST_TEST_CHECKPOINT", str(checkpoint))
    env = {
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "DIST_TEST_CHECKPOINT": str(checkpoint),
    }
    argv = ["--model", "distflaky:build", *ARGS, "--forward-batch", "64"]
    out = tmp_path / "dist"
    proc = _torchrun([*argv, "--out", str(out)], env={**env, "FAIL_RANK": "1"})
    assert proc.returncode != 0
    assert "invariscope: error: rank 1 of 2 failed" in proc.stderr, proc.stderr[-3000:]
    assert _status(out) == "running" and not (out / "aggregates").exists()
    first = _ranks(out)
    assert 0 < list(first.values()).count(1) < 8  # rank 1 stopped after a part or so
    assert list(first.values()).count(0) == 8  # rank 0 finished its share
    # the same command again: the pending parts are dealt out afresh, the run completes
    proc = _torchrun([*argv, "--out", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["starts"] == 2
    second = _ranks(out)
    assert {p: r for p, r in second.items() if p in first} == first  # done parts kept
    resumed = sorted(set(second) - set(first))
    assert {second[p] for p in resumed} == {0, 1}
    for p in resumed:
        assert p in shard(resumed, second[p], 2)
    _single_process([*argv, "--out", str(tmp_path / "single")])
    _assert_same(_stored(out), _stored(tmp_path / "single"))


# ------------------------------------------------------------- ranks without a process group


SMALL = dict(
    transforms=["rotation", "translate_x"],
    magnitudes={"rotation": (-90, 90, 45), "translate_x": (-0.2, 0.2, 0.1)},
    images=40,
    batch_size=8,
    figures=False,
)


def _sweep(data, **kw):
    args = {**SMALL, **kw}
    return sweep(Tiny().eval(), data, args.pop("transforms"), args.pop("magnitudes"), **args)


@pytest.fixture(scope="module")
def test_set():
    from invariscope.data import create_dataset

    return create_dataset("digits", "test")


def test_ranks_in_turn_without_process_group(tmp_path, test_set):
    out = tmp_path / "dist"
    # rank 1 alone: rank 0 has not written config.json yet
    with pytest.raises(InvariscopeError, match="rank 1 waited 0.2 s for rank 0"):
        _sweep(test_set, out=out, rank=1, world_size=2, timeout=0.2)
    # rank 0 computes its share, then waits in vain for rank 1's parts
    with pytest.raises(InvariscopeError, match=r"rank 0 waited 0.3 s .* 5 of 10 parts") as err:
        _sweep(test_set, out=out, rank=0, world_size=2, timeout=0.3)
    assert "\n" not in str(err.value)
    assert _status(out) == "running" and not (out / "aggregates").exists()
    ids = [f"sweep-{n}-{b:06d}" for b in range(5) for n in ("rotation", "translate_x")]
    assert sorted(_ranks(out)) == shard(ids, 0, 2)
    # a rank with another configuration (here: other images) is refused at once
    with pytest.raises(InvariscopeError, match="different configuration .*images"):
        _sweep(test_set, out=out, rank=1, world_size=2, images=32)
    # rank 1 writes its share and returns without aggregating
    one = _sweep(test_set, out=out, rank=1, world_size=2)
    assert (one.rank, one.world_size, one.aggregated) == (1, 2, False)
    assert one.parts_written == shard(ids, 1, 2) and one.aggregates == {} and one.figures == []
    with pytest.raises(InvariscopeError, match="rank 1 of 2 does not aggregate"):
        one.accuracy  # noqa: B018
    assert _status(out) == "running"
    # rank 0 again: its parts are done, all are there, it aggregates and finalizes
    zero = _sweep(test_set, out=out, rank=0, world_size=2)
    assert zero.aggregated and zero.parts_written == []
    assert _status(out) == "complete"
    assert set(_ranks(out).values()) == {0, 1}
    reference = _sweep(test_set, out=tmp_path / "single")
    assert sorted(reference.parts_written) == sorted(ids)
    _assert_same(_stored(out), _stored(tmp_path / "single"))
    for name, table in reference.aggregates.items():
        pd.testing.assert_frame_equal(zero.aggregates[name], table, check_exact=True, obj=name)


def test_distributed_arguments_are_checked(tmp_path, test_set, monkeypatch):
    with pytest.raises(InvariscopeError, match="needs a run directory"):
        _sweep(test_set, rank=0, world_size=2)
    with pytest.raises(InvariscopeError, match="overwrite in a distributed sweep"):
        _sweep(test_set, out=tmp_path / "a", rank=0, world_size=2, overwrite=True)
    with pytest.raises(InvariscopeError, match="rank 2 is not in"):
        _sweep(test_set, out=tmp_path / "a", rank=2, world_size=2)
    assert not (tmp_path / "a").exists()
    # rank and world size default to the torchrun environment
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InvariscopeError, match="rank 1 waited 0.1 s"):
        _sweep(test_set, out=tmp_path / "b", timeout=0.1)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InvariscopeError, match="WORLD_SIZE='two'"):
        _sweep(test_set, out=tmp_path / "b")


def test_cli_timeout_must_be_positive(tmp_path, capsys):
    from invariscope.cli import run

    argv = ["sweep", "--model", "simple-cnn", "--data", "digits", "--transforms", "rotation"]
    assert run([*argv, "--timeout", "0", "--out", str(tmp_path / "run")]) == 2
    assert "--timeout must be positive" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ 1000 classes


class Linear1000(nn.Module):
    """A linear layer on flattened 1x8x8 images with 1000 outputs (fixed random weights)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.fc = nn.Linear(64, 1000)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(1000, 64, generator=g))
            self.fc.bias.copy_(torch.randn(1000, generator=g))

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_thousand_classes_tables_scale_with_present_classes(tmp_path):
    from invariscope.data import TensorImageDataset

    g = torch.Generator().manual_seed(0)
    present = torch.arange(20) * 50 + 7  # 20 of 1000 classes, 4 images each
    labels = present.repeat_interleave(4)
    images = torch.rand(len(labels), 1, 8, 8, generator=g)
    data = TensorImageDataset(
        images,
        labels[torch.randperm(len(labels), generator=g)],
        classes=[f"c{i}" for i in range(1000)],
        name="thousand",
        split="test",
    )
    magnitudes = {"rotation": (-90, 90, 30), "gaussian_noise": (0.0, 0.5, 0.25)}
    res = sweep(
        Linear1000(),
        data,
        ["rotation", "gaussian_noise"],
        magnitudes,
        batch_size=16,
        out=tmp_path / "run",
        figures=False,
    )
    n_mags = {"rotation": 7, "gaussian_noise": 3}
    n_present, n_rows = 20, 7 + 3
    curves = res.aggregates["softmax_curves"]
    assert len(curves) <= (n_present + 1) * n_rows * 4
    assert len(curves) == n_present * n_rows * 4  # top1..top3 + others per class present
    assert set(curves["label"]) == set(present.tolist())
    th = res.aggregates["thresholds"]
    assert len(th) == (n_present + 1) * 2
    assert set(th["label"]) == set(present.tolist()) | {-1}
    assert len(res.aggregates["class_accuracy"]) == n_present * n_rows
    assert len(res.aggregates["breaking_summary"]) == (n_present + 1) * 2
    assert len(res.aggregates["classes"]) == 1000
    # each part's softmax sums cover the classes of its batch only (grouped by class: 4)
    run = RunStore.open(tmp_path / "run")
    records = dict(run.iter_table("records", columns=["label", "magnitude"]))
    n_parts = 0
    for pid, sums in run.iter_table("softmax_sums"):
        part_labels = set(records[pid]["label"])
        assert set(sums["label"]) == part_labels
        assert len(part_labels) == 4  # 16 images sorted by class: 4 classes per batch
        name = sums["transform"].iloc[0]
        assert len(sums) == len(part_labels) * n_mags[name]
        assert all(len(v) == 1000 for v in sums["softmax_sum"])
        n_parts += 1
    assert n_parts == 5 * 2
    # the summed softmax of a class at a magnitude adds up to its number of images
    # (float32 probabilities)
    total = run.read_table("softmax_sums")
    np.testing.assert_allclose(
        np.stack(total["softmax_sum"]).sum(axis=1), total["count"].to_numpy(), rtol=1e-5
    )
    assert set(PART_TABLES) >= set(run.tables())
