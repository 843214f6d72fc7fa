"""The conformance test every registered analysis inherits by registering.

For each analysis of the registry, run its command with the small arguments it
registers (``AnalysisEntry.conformance``) and check that

- the tables of an in-memory run equal the stored ones;
- SIGKILL of a subprocess mid-run, then the same command again, gives identical tables;
- a real 2-process ``torchrun`` launch gives tables identical to one process;
- a run whose rank died resumes with another world size (3 ranks) to identical tables;
- a different configuration in the same directory is refused, naming the differing keys.

Single-process references run with one thread, like torchrun's workers
(``OMP_NUM_THREADS=1``), so that the comparisons are exact.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from invariscope.cli import run
from invariscope.engine.registry import list_analyses
from invariscope.runs.store import RunStore, shard

ENTRIES = {e.name: e for e in list_analyses()}

# Runs an invariscope command in this process; with KILL_AT=n it SIGKILLs itself at the
# n-th Parquet file it writes (on rank KILL_RANK only, when set).
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import invariscope.runs.store as store
    from invariscope.cli import run

    kill_at = int(os.environ.get("KILL_AT", "0"))
    kill_rank = os.environ.get("KILL_RANK")
    if kill_at and (kill_rank is None or kill_rank == os.environ.get("RANK")):
        real, count = store._atomic_parquet, [0]

        def killing(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        store._atomic_parquet = killing
    sys.exit(run(sys.argv[1:]))
    """
)


def _argv(entry, checkpoint: Path, out: Path) -> list[str]:
    return [
        entry.command,
        "--model",
        str(checkpoint),
        *entry.conformance,
        "--no-figures",
        "--no-progress",
        "--out",
        str(out),
    ]


def _one_thread(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads)


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    store = RunStore.open(run_dir)
    assert store.is_complete, run_dir
    tables = {f"aggregate:{n}": store.read_aggregate(n) for n in store.aggregates()}
    tables.update({f"part:{n}": store.read_table(n) for n in store.tables()})
    return tables


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        left, right = a[name].reset_index(drop=True), b[name].reset_index(drop=True)
        arrays = [
            c
            for c in left.columns
            if left[c].dtype == object and len(left) and isinstance(left[c].iloc[0], np.ndarray)
        ]
        for column in arrays:
            assert np.array_equal(np.stack(left[column]), np.stack(right[column])), name
        left, right = left.drop(columns=arrays), right.drop(columns=arrays)
        pd.testing.assert_frame_equal(left, right, check_exact=True, obj=name)


def _status(run_dir: Path) -> str:
    return json.loads((run_dir / "manifest.json").read_text())["status"]


def _ranks(run_dir: Path) -> dict[str, int]:
    return {
        p.name: json.loads((p / "_done.json").read_text())["rank"]
        for p in (run_dir / "parts").iterdir()
        if (p / "_done.json").is_file()
    }


def _stages(run_dir: Path) -> dict[str, int]:
    return {
        p.name: json.loads((p / "_done.json").read_text())["stage"]
        for p in (run_dir / "parts").iterdir()
        if (p / "_done.json").is_file()
    }


def _writes_per_part(run_dir: Path) -> int:
    """The most Parquet files one part of a stored run wrote (the kill points depend on it)."""
    parts = [p for p in (run_dir / "parts").iterdir() if (p / "_done.json").is_file()]
    return max(len(list(p.glob("*.parquet"))) for p in parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(driver: Path, argv: list[str], nproc: int, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N driver.py ARGV`` (or plain python for N = 0)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if nproc == 0:
        command = [sys.executable, str(driver), *argv]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(driver),
            *argv,
        ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=full_env)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from invariscope.models import create_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("conformance") / "simple-cnn.pt"
    save_checkpoint(create_model("simple-cnn"), path)
    return path


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module", params=sorted(ENTRIES))
def reference(request, tmp_path_factory, checkpoint):
    """``(entry, run_dir, tables)``: the analysis run once in this process, one thread."""
    entry = ENTRIES[request.param]
    out = tmp_path_factory.mktemp(f"ref-{entry.name}") / "run"
    assert _one_thread(_argv(entry, checkpoint, out)) == 0
    return entry, out, _tables(out)


def test_conformance_args_are_registered():
    assert {
        "sweep",
        "worst_case",
        "shift",
        "stitch",
        "lee",
        "stn_benchmark",
        "alignment",
        "equivariance",
        "itn",
    } <= set(ENTRIES)
    for entry in ENTRIES.values():
        assert entry.conformance, f"{entry.name} registers no conformance arguments"


def test_in_memory_equals_stored(reference, checkpoint, tmp_path, monkeypatch):
    """The command's own analysis, run again without a run directory."""
    import invariscope.engine

    entry, _, stored = reference
    captured = {}
    real = invariscope.engine.run

    def spy(analysis, models, datasets, **kwargs):
        captured.update(analysis=analysis, models=models, datasets=datasets, kwargs=kwargs)
        return real(analysis, models, datasets, **kwargs)

    monkeypatch.setattr(invariscope.engine, "run", spy)
    assert _one_thread(_argv(entry, checkpoint, tmp_path / "run")) == 0
    kwargs = {**captured["kwargs"], "out": None, "figures": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        memory = real(captured["analysis"], captured["models"], captured["datasets"], **kwargs)
    finally:
        torch.set_num_threads(threads)
    tables = {f"aggregate:{n}": t for n, t in memory.aggregates.items()}
    for name in memory._store.tables():
        tables[f"part:{name}"] = memory.table(name)
    _assert_same(tables, stored)
    assert memory.summary == RunStore.open(tmp_path / "run").summary


def test_sigkill_mid_run_then_same_command_resumes(reference, checkpoint, driver, tmp_path):
    entry, _, stored = reference
    out = tmp_path / "run"
    argv = _argv(entry, checkpoint, out)
    # killed after its first part (with the most tables per part: in the second one)
    proc = _launch(driver, argv, 0, KILL_AT=str(_writes_per_part(reference[1]) + 2))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _status(out) == "running" and not (out / "aggregates").exists()
    done = _ranks(out)
    planned = len(_ranks(reference[1]))
    assert 1 <= len(done) < planned
    assert _one_thread(argv) == 0
    _assert_same(_tables(out), stored)
    assert json.loads((out / "manifest.json").read_text())["starts"] == 2


def test_two_ranks_under_torchrun_equal_one_process(reference, checkpoint, driver, tmp_path):
    entry, ref_dir, stored = reference
    out = tmp_path / "run"
    proc = _launch(driver, _argv(entry, checkpoint, out), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(_tables(out), stored)
    ranks = _ranks(out)
    assert set(ranks.values()) == {0, 1} and sorted(ranks) == sorted(_ranks(ref_dir))
    assert json.loads((out / "meta.json").read_text())["world_size"] == 2


def test_run_whose_rank_died_resumes_with_another_world_size(
    reference, checkpoint, driver, tmp_path
):
    entry, _, stored = reference
    out = tmp_path / "run"
    argv = _argv(entry, checkpoint, out)
    # rank 1 dies in its first parts, before their done-markers
    proc = _launch(driver, argv, 2, KILL_AT=str(_writes_per_part(reference[1])), KILL_RANK="1")
    assert proc.returncode != 0
    assert _status(out) == "running" and not (out / "aggregates").exists()
    first = _ranks(out)
    proc = _launch(driver, argv, 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(_tables(out), stored)
    second = _ranks(out)
    assert {p: r for p, r in second.items() if p in first} == first  # done parts kept
    resumed = sorted(set(second) - set(first))
    assert resumed
    stages = _stages(out)
    for pid in resumed:  # each stage's pending parts were dealt out afresh among 3 ranks
        same_stage = [p for p in resumed if stages[p] == stages[pid]]
        assert pid in shard(same_stage, second[pid], 3)


def test_other_configuration_is_refused_naming_the_keys(reference, checkpoint, capsys):
    entry, ref_dir, _ = reference
    before = sorted(p.name for p in (ref_dir / "parts").iterdir())
    argv = _argv(entry, checkpoint, ref_dir)
    assert run([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("invariscope: error: ") and "\n" not in err
    assert "different configuration" in err and "seed" in err
    assert sorted(p.name for p in (ref_dir / "parts").iterdir()) == before
    assert _status(ref_dir) == "complete"


# ------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module", params=sorted(ENTRIES))
def entry(request):
    return ENTRIES[request.param]


def _refused(argv, capsys, out: Path) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("invariscope: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert not out.exists()  # nothing written
    return err


def test_the_commands_own_bad_input_is_one_line_before_anything_is_written(
    entry, checkpoint, tmp_path, capsys
):
    assert entry.bad_inputs, f"{entry.name} registers no bad inputs"
    out = tmp_path / "run"
    for args, words in entry.bad_inputs:
        argv = [entry.command, "--model", str(checkpoint), *args, "--out", str(out)]
        assert words in _refused(argv, capsys, out), args


def test_unknown_class_and_a_model_that_does_not_fit_are_refused(
    entry, checkpoint, tmp_path, capsys
):
    from invariscope.models import create_model, save_checkpoint

    out = tmp_path / "run"
    argv = [entry.command, *entry.conformance, "--out", str(out)]
    err = _refused([*argv, "--model", str(checkpoint), "--classes", "eleven"], capsys, out)
    assert "unknown class 'eleven'" in err
    rgb = tmp_path / "rgb.pt"  # a 3-channel 32 px model on 1-channel 28 px digits
    save_checkpoint(create_model("small-vgg"), rgb)
    if entry.name == "stn_benchmark":
        # --model names only the base ARCHITECTURE there: it is rebuilt for the data's
        # channels and size (an RGB family trained on a digit set), so it fits
        assert run([*argv, "--model", str(rgb), "--no-figures", "--no-progress"]) == 0
        return
    err = _refused([*argv, "--model", str(rgb)], capsys, out)
    assert "3 channel" in err or "instead of 3" in err


def test_every_analysis_presents_its_run_with_a_headline_and_pivoted_tables(reference):
    """The report's class methods, on the stored run: a headline of its own (with numbers),
    tidy pivoted tables, a title; and the report renders the run with them."""
    from invariscope.engine.analysis import Analysis
    from invariscope.report import build_report

    entry, run_dir, _ = reference
    cls = entry.analysis
    assert cls.headline.__func__ is not Analysis.headline.__func__, f"{entry.name}: no headline"
    assert cls.pivots.__func__ is not Analysis.pivots.__func__, f"{entry.name}: no pivots"
    store = RunStore.open(run_dir)
    aggregates = {name: store.read_aggregate(name) for name in store.aggregates()}
    headline = cls.headline(store.summary, aggregates, store.config)
    assert isinstance(headline, str) and any(c.isdigit() for c in headline), headline
    assert "\n" not in headline and "nan" not in headline.lower().split(), headline
    pivots = cls.pivots(aggregates, store.config)
    assert pivots, f"{entry.name}: no pivoted table"
    for caption, table in pivots.items():
        assert isinstance(table, pd.DataFrame) and table.shape[0] and table.shape[1], caption
        assert table.columns.is_unique, (caption, list(table.columns))
    assert cls.section_title(entry.title, store.config).startswith(entry.title)
    index = build_report([run_dir], run_dir.parent / "report")
    text = index.read_text(encoding="utf-8")
    assert '<p class="headline">' in text and 'class="pivot"' in text
    assert "could not be" not in text  # no presentation method failed
