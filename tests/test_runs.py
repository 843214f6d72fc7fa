"""Tests of invariscope.runs: config hash, refusal/overwrite, resume after exceptions and
SIGKILL, leftovers, status, sharding across ranks, streaming reads."""

from __future__ import annotations

import hashlib
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pandas.testing import assert_frame_equal

from invariscope.errors import InvariscopeError
from invariscope.runs import (
    RunStore,
    canonical_json,
    config_hash,
    part_id,
    rank_from_env,
    shard,
)

# A small "analysis": deterministic tables per part, written by run_analysis(). The same
# text runs in a subprocess (killed with SIGKILL) and, via runpy, in this process.
WORKER = """
import sys, time
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from invariscope.runs import RunStore, part_id

N_PARTS = 12
CONFIG = {"analysis": "toy", "n_parts": N_PARTS, "model": {"name": "m", "width": 4}}


def ids():
    return [part_id("toy", k) for k in range(N_PARTS)]


def compute(k):
    rng = np.random.default_rng(k)
    n = 20 + 7 * k
    records = pd.DataFrame({
        "part": np.full(n, k), "i": np.arange(n), "value": rng.normal(size=n),
        "label": [f"c{j % 3}" for j in range(n)],
    })
    topk = pd.DataFrame({"part": [k] * 3, "rank": [0, 1, 2], "score": rng.random(3)})
    return {"records": records, "topk": topk}


def run_analysis(run_dir, order=None, fail_at=None, rank=0, world_size=1, finalize=True):
    run = RunStore(run_dir, CONFIG, rank=rank, world_size=world_size, timeout=30)
    todo = run.pending(run.shard(ids()))
    if order is not None:
        todo = [todo[i] for i in order(len(todo))]
    for pid in todo:
        k = int(pid.split("-")[1])
        if k == fail_at:
            raise RuntimeError(f"compute of part {k} failed")
        run.write_part(pid, compute(k))
    if finalize and rank == 0:
        records = run.read_table("records")
        agg = records.groupby("label", as_index=False)["value"].mean()
        run.finalize({"rows": len(records)}, aggregates={"by_label": agg}, expected_parts=ids())
    return run


if __name__ == "__main__":
    delay = float(sys.argv[2])
    write_table = pq.write_table

    def slow_write_table(table, where, **kwargs):  # hold each temp file open a while
        write_table(table, where, **kwargs)
        time.sleep(delay)

    pq.write_table = slow_write_table
    run_analysis(sys.argv[1], finalize=False)
"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("worker") / "toy_worker.py"
    path.write_text(WORKER)
    ns = runpy.run_path(str(path), run_name="toy_worker")
    ns["path"] = path
    return ns


@pytest.fixture(scope="module")
def reference(worker, tmp_path_factory):
    """An uninterrupted run, in parts order, finalized."""
    run = worker["run_analysis"](tmp_path_factory.mktemp("ref") / "run")
    return {name: run.read_table(name) for name in ("records", "topk")} | {
        "by_label": run.read_aggregate("by_label")
    }


def assert_same_as_reference(run, reference):
    for name in ("records", "topk"):
        assert_frame_equal(run.read_table(name), reference[name])
    assert_frame_equal(run.read_aggregate("by_label"), reference["by_label"])


def all_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob("*") if p.is_file())


def temp_files(run_dir: Path) -> list[Path]:
    return [p for p in all_files(run_dir) if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ configuration


def test_config_hash_is_canonical_and_key_order_free():
    a = {"b": {"y": 2, "x": [1, 2.5]}, "a": "s"}
    b = {"a": "s", "b": {"x": (1, 2.5), "y": 2}}
    text = '{"a":"s","b":{"x":[1,2.5],"y":2}}'
    assert canonical_json(a) == canonical_json(b) == text
    assert config_hash(a) == config_hash(b) == hashlib.sha256(text.encode()).hexdigest()
    assert config_hash({**a, "a": "t"}) != config_hash(a)
    assert config_hash({"v": np.float32(0.5), "n": np.int64(3)}) == config_hash({"v": 0.5, "n": 3})


@pytest.mark.parametrize(
    "config", [{"x": float("nan")}, {"x": object()}, {1: "a"}, {"x": {"y": {2, 3}}}]
)
def test_config_not_json_is_refused(config):
    with pytest.raises(InvariscopeError) as err:
        config_hash(config)
    assert "\n" not in str(err.value)


def test_config_stored_and_read_back(tmp_path):
    config = {"model": {"name": "m"}, "seed": 3, "path": tmp_path}
    run = RunStore(tmp_path / "run", config)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["config"] == {"model": {"name": "m"}, "seed": 3, "path": str(tmp_path)}
    assert stored["config_hash"] == run.config_hash == config_hash(config)
    assert run.manifest["config_hash"] == run.config_hash
    opened = RunStore.open(tmp_path / "run")
    assert opened.config == run.config and opened.config_hash == run.config_hash


def test_different_config_refused_listing_keys_then_overwrite(tmp_path, worker):
    run_dir = tmp_path / "run"
    worker["run_analysis"](run_dir)
    changed = {**worker["CONFIG"], "model": {"name": "m", "width": 8}, "extra": 1}
    with pytest.raises(InvariscopeError) as err:
        RunStore(run_dir, changed)
    message = str(err.value)
    assert "\n" not in message and "overwrite=True" in message
    assert "model.width" in message and "extra" in message
    assert "model.name" not in message and "n_parts" not in message
    assert RunStore.open(run_dir).is_complete  # refusal touched nothing

    run = RunStore(run_dir, changed, overwrite=True)
    assert run.config == json.loads(canonical_json(changed))
    assert run.completed_parts() == [] and run.aggregates() == [] and not run.is_complete
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "manifest.json"]
    with pytest.raises(InvariscopeError, match="no finished part"):
        run.read_table("records")


def test_overwrite_same_config_starts_afresh(tmp_path, worker):
    run_dir = tmp_path / "run"
    worker["run_analysis"](run_dir)
    run = RunStore(run_dir, worker["CONFIG"], overwrite=True)
    assert run.completed_parts() == [] and run.status == "running"


def test_foreign_directory_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(InvariscopeError, match="not an invariscope run directory"):
            RunStore(tmp_path, {"a": 1}, overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(InvariscopeError) as err:
        RunStore.open(tmp_path)
    assert "\n" not in str(err.value) and "not an invariscope run directory" in str(err.value)


def test_foreign_config_json_is_never_deleted_and_overwrite_is_not_offered(tmp_path):
    """Issue 21: a folder that merely holds a file named config.json is not a run of ours:
    it is refused with and without overwrite, nothing in it is touched (no lock file
    either), and the refusal does not recommend overwrite."""
    for text in ('{"config": {"a": 1}, "config_hash": "0"}', "not json", '{"lr": 0.1}'):
        folder = tmp_path / f"user{len(text)}"
        folder.mkdir()
        (folder / "config.json").write_text(text)
        (folder / "data.csv").write_text("1,2,3")
        for overwrite in (False, True):
            with pytest.raises(InvariscopeError) as err:
                RunStore(folder, {"a": 1}, overwrite=overwrite, lock=True)
            message = str(err.value)
            assert "not an invariscope run directory" in message and "\n" not in message
            assert "overwrite" not in message.lower()
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "data.csv"]
        assert (folder / "config.json").read_text() == text
        with pytest.raises(InvariscopeError, match="not an invariscope run directory"):
            RunStore.open(folder)


def test_overwrite_never_deletes_a_file_no_run_of_ours_wrote(tmp_path, worker):
    """--overwrite removes what the run wrote (parts, aggregates, manifest, meta, figures)
    and keeps every other file and folder the user put next to them."""
    run_dir = tmp_path / "run"
    worker["run_analysis"](run_dir)
    RunStore(run_dir, worker["CONFIG"]).path("figures", "plot.png").write_bytes(b"png")
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "mine").mkdir()
    (run_dir / "mine" / "a.npy").write_bytes(b"keep")
    ours = {p.name for p in run_dir.iterdir()} - {"notes.txt", "mine"}
    assert {"parts", "aggregates", "manifest.json", "config.json", "figures"} <= ours
    for config in (worker["CONFIG"], {**worker["CONFIG"], "extra": 1}):
        run = RunStore(run_dir, config, overwrite=True)
        assert run.completed_parts() == [] and run.aggregates() == []
        assert (run_dir / "notes.txt").read_text() == "mine"
        assert (run_dir / "mine" / "a.npy").read_bytes() == b"keep"
        assert not (run_dir / "figures").exists() and not (run_dir / "parts").exists()
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "config.json",
            "manifest.json",
            "mine",
            "notes.txt",
        ]


def test_a_kill_during_repair_never_leaves_a_complete_run_with_a_part_missing(
    tmp_path, worker, monkeypatch
):
    """A complete run whose part fails its checksum is marked running BEFORE the part is
    removed: a kill between the two leaves a running run, which the next start resumes."""
    import invariscope.runs.store as store_module

    run_dir = tmp_path / "run"
    worker["run_analysis"](run_dir)
    victim = RunStore.open(run_dir).completed_parts()[1]
    table = next((run_dir / "parts" / victim).glob("*.parquet"))
    table.write_bytes(table.read_bytes()[:-7])

    def killed(path):
        raise KeyboardInterrupt  # the process dies while removing the damaged part

    monkeypatch.setattr(store_module, "_remove", killed)
    with pytest.raises(KeyboardInterrupt):
        RunStore(run_dir, worker["CONFIG"])
    monkeypatch.undo()
    opened = RunStore.open(run_dir)
    assert victim not in opened.completed_parts()  # the rename into the trash happened
    assert opened.status == "running" and not opened.is_complete
    # a part that vanished from a complete run (no checksum to fail) also reopens it
    worker["run_analysis"](run_dir)
    assert RunStore.open(run_dir).is_complete
    store_module._remove(run_dir / "parts" / victim)
    assert RunStore(run_dir, worker["CONFIG"]).status == "running"


def test_damaged_aggregate_is_refused_on_read_and_recomputed_on_resume(tmp_path, worker):
    run_dir = tmp_path / "run"
    worker["run_analysis"](run_dir)
    opened = RunStore.open(run_dir)
    name = opened.aggregates()[0]
    good = opened.read_aggregate(name)
    path = run_dir / "aggregates" / f"{name}.parquet"
    for damage in (path.read_bytes()[:40], os.urandom(200)):
        path.write_bytes(damage)
        with pytest.raises(InvariscopeError) as err:
            RunStore.open(run_dir).read_aggregate(name)
        assert "is damaged" in str(err.value) and "\n" not in str(err.value)
        run = RunStore(run_dir, worker["CONFIG"])  # resume: the damaged aggregate is removed
        assert run.status == "running" and name not in run.aggregates()
        worker["run_analysis"](run_dir)
        assert_frame_equal(RunStore.open(run_dir).read_aggregate(name), good)


def test_figures_that_is_a_file_is_one_line(tmp_path, worker):
    run_dir = tmp_path / "run"
    worker["run_analysis"](run_dir)
    (run_dir / "figures").write_text("not a folder")
    with pytest.raises(InvariscopeError, match="is a file, not a folder"):
        RunStore(run_dir, worker["CONFIG"]).path("figures")
    assert (run_dir / "figures").read_text() == "not a folder"


# ------------------------------------------------------------- resume and recovery


def test_resume_after_exception_gives_identical_tables(tmp_path, worker, reference):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="part 5"):
        worker["run_analysis"](run_dir, fail_at=5)
    run = RunStore.open(run_dir)
    assert run.completed_parts() == worker["ids"]()[:5]
    assert run.status == "running" and not run.is_complete
    assert run.pending(worker["ids"]()) == worker["ids"]()[5:]

    run = worker["run_analysis"](run_dir)
    assert run.is_complete and run.manifest["starts"] == 2
    assert run.summary == {"rows": len(reference["records"])}
    assert_same_as_reference(run, reference)


def test_completion_order_does_not_change_tables(tmp_path, worker, reference):
    shuffled = lambda n: random.Random(1).sample(range(n), n)  # noqa: E731
    run = worker["run_analysis"](tmp_path / "run", order=shuffled)
    assert_same_as_reference(run, reference)
    streamed = pd.concat([df for _, df in run.iter_table("records")], ignore_index=True)
    assert_frame_equal(streamed, reference["records"])
    assert [pid for pid, _ in run.iter_table("topk")] == worker["ids"]()


def test_sigkill_mid_run_then_resume(tmp_path, worker, reference):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, str(worker["path"]), str(run_dir), "0.08"],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # kill while >= 3 parts are done and a temp file is open
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "worker too slow"
            done = list(run_dir.glob("parts/*/_done.json"))
            if len(done) >= 3 and temp_files(run_dir):
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    run = RunStore.open(run_dir)
    assert run.status == "running" and not run.is_complete
    assert temp_files(run_dir), "the kill should have left the temp file in flight"
    done = run.completed_parts()
    assert 3 <= len(done) < 12 and done == worker["ids"]()[: len(done)]
    for path in all_files(run_dir):  # every file with a final name is whole
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    # readers see the done parts only
    assert set(run.read_table("records")["part"]) == set(range(len(done)))

    run = worker["run_analysis"](run_dir)
    assert temp_files(run_dir) == []
    assert run.is_complete
    assert_same_as_reference(run, reference)


def test_leftover_temp_files_and_unmarked_tables_are_ignored_and_cleaned(
    tmp_path, worker, reference
):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError):
        worker["run_analysis"](run_dir, fail_at=4)
    ids = worker["ids"]()
    # part 4: one table written, no marker; part 5: only a torn temp file
    part4 = run_dir / "parts" / ids[4]
    part4.mkdir()
    pq.write_table(pa.table({"part": [99], "i": [0]}), part4 / "records.parquet")
    part5 = run_dir / "parts" / ids[5]
    part5.mkdir()
    torn = part5 / ".records.parquet.r0.4242.deadbeef.tmp"
    torn.write_bytes(b"PAR1 torn")
    stray = [
        run_dir / ".manifest.json.r0.4242.0123abcd.tmp",
        run_dir / "parts" / ".x.parquet.r0.1.ab.tmp",
    ]
    for path in stray:
        path.write_bytes(b"{")

    run = RunStore.open(run_dir)
    assert run.completed_parts() == ids[:4] and not run.is_done(ids[4])
    assert 99 not in set(run.read_table("records")["part"])

    run = RunStore(run_dir, worker["CONFIG"])  # resume cleans the leftovers
    assert not part4.exists() and not part5.exists()
    assert temp_files(run_dir) == []
    run = worker["run_analysis"](run_dir)
    assert_same_as_reference(run, reference)


def test_write_part_clears_an_interrupted_attempt(tmp_path):
    run = RunStore(tmp_path, {"a": 1})
    folder = tmp_path / "parts" / "p-000001"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), folder / "old.parquet")  # from an earlier attempt
    run.write_part("p-000001", {"new": pd.DataFrame({"x": [2]})})
    assert run.tables() == ["new"] and not (folder / "old.parquet").exists()
    with pytest.raises(InvariscopeError, match="already done"):
        run.write_part("p-000001", {"new": pd.DataFrame({"x": [3]})})
    assert run.read_table("new")["x"].tolist() == [2]


# -------------------------------------------------------------------- status


def test_status_running_until_finalize_and_reopened_by_new_writes(tmp_path):
    run = RunStore(tmp_path, {"a": 1})
    assert run.status == "running" and not run.is_complete
    run.write_part(part_id("p", 0), {"t": pd.DataFrame({"x": [1.0, 2.0]})})
    with pytest.raises(InvariscopeError, match="1 of 2 parts are not done"):
        run.finalize(expected_parts=[part_id("p", 0), part_id("p", 1)])
    assert run.status == "running"
    run.finalize({"n": 2}, aggregates={"mean": pd.DataFrame({"x": [1.5]})})
    assert run.is_complete and RunStore.open(tmp_path).is_complete
    manifest = run.manifest
    assert manifest["num_parts"] == 1 and manifest["tables"] == ["t"]
    assert manifest["aggregates"] == ["mean"] and manifest["summary"] == {"n": 2}
    assert run.read_aggregate("mean")["x"].tolist() == [1.5]

    again = RunStore(tmp_path, {"a": 1})  # re-running a complete run keeps it complete
    assert again.is_complete and again.pending([part_id("p", 0)]) == []
    again.write_part(part_id("p", 1), {"t": pd.DataFrame({"x": [3.0]})})
    assert again.status == "running"
    again.finalize()
    assert again.is_complete and again.read_table("t")["x"].tolist() == [1.0, 2.0, 3.0]


def test_read_only_and_rank_restrictions(tmp_path):
    RunStore(tmp_path, {"a": 1}).write_part("p", {"t": pd.DataFrame({"x": [1]})})
    report = RunStore.open(tmp_path)
    for call in (
        lambda: report.write_part("q", {}),
        lambda: report.finalize(),
        lambda: report.write_aggregate("a", pd.DataFrame()),
        lambda: report.update_meta({"x": 1}),
    ):
        with pytest.raises(InvariscopeError, match="read-only"):
            call()
    rank1 = RunStore(tmp_path, {"a": 1}, rank=1, world_size=2)
    with pytest.raises(InvariscopeError, match="only rank 0"):
        rank1.finalize()
    with pytest.raises(InvariscopeError) as err:
        report.read_table("tt")
    assert "did you mean 't'" in str(err.value)
    with pytest.raises(InvariscopeError, match="unknown aggregate"):
        report.read_aggregate("nope")


def test_meta_and_path_helpers(tmp_path):
    run = RunStore(tmp_path / "run", {"a": 1})
    run.update_meta({"torch": "2.13", "device": "cpu"})
    assert run.update_meta({"device": "cuda:0"}) == {"torch": "2.13", "device": "cuda:0"}
    assert RunStore.open(tmp_path / "run").meta == {"torch": "2.13", "device": "cuda:0"}
    figures = run.path("figures")
    assert figures == tmp_path / "run" / "figures" and figures.is_dir()
    png = run.path("figures", "curves", "acc.png")
    assert png.parent.is_dir() and not png.exists()
    for bad in (("..", "x"), ("parts",), ("config.json",), (str(tmp_path),)):
        with pytest.raises(InvariscopeError):
            run.path(*bad)


# ------------------------------------------------------------------- part ids


def test_part_id_sorts_in_key_order():
    assert part_id("rotation", 7) == "rotation-000007"
    ids = [part_id("a", k, j) for k in (10, 2, 100) for j in (3, 0)]
    assert sorted(ids) == [part_id("a", k, j) for k in (2, 10, 100) for j in (0, 3)]
    assert part_id(np.int64(5), width=2) == "05"
    for bad in ((-1,), (1.5,), (True,), ("a-b",), ("",), (10**6,), ()):
        with pytest.raises(InvariscopeError):
            part_id(*bad)


# ------------------------------------------------------------------- sharding


def test_shard_disjoint_covering_round_robin():
    ids = [part_id("p", k) for k in range(23)]
    for world_size in (1, 2, 3, 5):
        shards = [shard(ids, r, world_size) for r in range(world_size)]
        assert sorted(sum(shards, [])) == ids
        assert sum(len(s) for s in shards) == len(ids)
        assert shards[0] == ids[0::world_size]
        shuffled = random.Random(world_size).sample(ids, len(ids))
        assert [shard(shuffled, r, world_size) for r in range(world_size)] == shards
    with pytest.raises(InvariscopeError):
        shard(ids, 2, 2)
    with pytest.raises(InvariscopeError, match="twice"):
        shard(ids + ids[:1], 0, 1)


def test_rank_from_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert rank_from_env() == (0, 1)
    assert rank_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4)
    info = rank_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (info.rank, info.world_size) == (1, 2)
    with pytest.raises(InvariscopeError, match="RANK"):
        rank_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(InvariscopeError):
        rank_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_two_ranks_in_one_directory_match_one_rank(tmp_path, worker, reference):
    run_dir = tmp_path / "run"
    errors = []

    def rank(r):
        try:  # rank 1 starts first and waits for rank 0's config.json
            worker["run_analysis"](run_dir, rank=r, world_size=2, finalize=False)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(1,))]
    threads[0].start()
    time.sleep(0.2)
    threads.append(threading.Thread(target=rank, args=(0,)))
    threads[1].start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    markers = [json.loads(p.read_text()) for p in run_dir.glob("parts/*/_done.json")]
    by_rank = {r: sorted(m["part_id"] for m in markers if m["rank"] == r) for r in (0, 1)}
    assert by_rank == {r: shard(worker["ids"](), r, 2) for r in (0, 1)}

    run = worker["run_analysis"](run_dir)  # rank 0 alone: nothing left, finalizes
    assert_same_as_reference(run, reference)


def test_nonzero_rank_refuses_other_config_and_times_out(tmp_path):
    RunStore(tmp_path / "a", {"a": 1})
    with pytest.raises(InvariscopeError, match="differing keys: a"):
        RunStore(tmp_path / "a", {"a": 2}, rank=1, world_size=2)
    with pytest.raises(InvariscopeError, match="waited"):
        RunStore(tmp_path / "b", {"a": 1}, rank=1, world_size=2, timeout=0.1)


# ---------------------------------------------------------------- streaming reads


def test_read_table_columns_filters_and_schema_promotion(tmp_path):
    run = RunStore(tmp_path, {"a": 1})
    run.write_part(part_id(1), {"t": pd.DataFrame({"k": [1, 1], "v": [None, None]})})
    run.write_part(part_id(0), {"t": pd.DataFrame({"k": [0, 0, 0], "v": [0.5, 1.5, 2.5]})})
    run.write_part(part_id(2), {"other": pd.DataFrame({"z": [1]})})
    table = run.read_table("t")
    assert table["k"].tolist() == [0, 0, 0, 1, 1]
    assert table["v"].dtype == np.float64 and table["v"].isna().tolist() == [0, 0, 0, 1, 1]
    assert list(run.read_table("t", columns=["v"]).columns) == ["v"]
    assert run.read_table("t", filters=[("v", ">", 1.0)])["v"].tolist() == [1.5, 2.5]
    assert run.read_table("t", filters=pc.field("k") == 1)["k"].tolist() == [1, 1]
    parts = [(pid, len(df)) for pid, df in run.iter_table("t", filters=[("k", "==", 0)])]
    assert parts == [(part_id(0), 3), (part_id(1), 0)]
    with pytest.raises(InvariscopeError, match="unknown column"):
        run.read_table("t", columns=["nope"])
    assert run.tables() == ["other", "t"]
