"""Benchmark of a distributed ``invariscope sweep``: torchrun with 2 ranks against 1 process.

Runs the same sweep through the CLI twice, as subprocesses with the same arguments, into
two run directories:

- 1 rank:  ``OMP_NUM_THREADS=1 python -m invariscope sweep ...`` (one process, 1 thread);
- 2 ranks: ``OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 ...
  -m invariscope sweep ...`` (two processes x 1 thread each, gloo on the CPU).

The sweep: a simple-cnn checkpoint (random weights, ``torch.manual_seed(0)``: speed and
table identity do not depend on training) on the digits test set (360 images),
rotation, translate_x and gaussian_noise over fine ranges, ``--batch-size 30`` (36
parts), ``--no-figures --no-progress`` and an explicit ``--forward-batch`` and
``--memory-format``, so that both runs execute alike (no timing-dependent tuning).

Prints, measured in one run:

(a) throughput ratio, 1-rank wall time / 2-rank wall time (goal >= 1.8x), where the wall
    time is that of the whole subprocess (interpreter and torchrun start-up, model and
    data loading, the sweep, aggregation); also the same ratio over the time from rank 0
    opening the run directory to ``finalize`` (the parts and the aggregation, without
    start-up; from the modification times of ``config.json`` and ``manifest.json``,
    checked against the manifest's ``started`` / ``finished``), and the start-up
    (wall - that);
(b) table identity: every aggregate and every part table of the two run directories is
    compared exactly (``pandas.testing.assert_frame_equal(check_exact=True)``; columns
    holding arrays with ``np.array_equal``). Exit status 1 if any table differs.

Usage::

    python benchmarks/bench_distributed.py            # ~1 minute on 2 CPU cores
    python benchmarks/bench_distributed.py --quick    # coarse ranges, a few seconds of sweep
    python benchmarks/bench_distributed.py --repeats 3 --keep runs/bench-dist
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

TRANSFORMS = "rotation,translate_x,gaussian_noise"
RANGES = {
    "rotation": "-180:180:2",
    "translate_x": "-0.5:0.5:0.02",
    "gaussian_noise": "0:1:0.02",
}
QUICK_RANGES = {
    "rotation": "-180:180:15",
    "translate_x": "-0.5:0.5:0.1",
    "gaussian_noise": "0:1:0.1",
}
GOAL = 1.8


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(path: Path) -> Path:
    import torch

    from invariscope.models import create_model, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(create_model("simple-cnn"), path)


def _sweep_args(model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    ranges = QUICK_RANGES if args.quick else RANGES
    cli = [
        "sweep",
        "--model",
        str(model),
        "--data",
        "digits",
        "--transforms",
        TRANSFORMS,
        "--batch-size",
        str(args.batch_size),
        "--forward-batch",
        str(args.forward_batch),
        "--memory-format",
        args.memory_format,
        "--no-figures",
        "--no-progress",
        "--overwrite",
        "--out",
        str(out),
    ]
    for name, spec in ranges.items():
        cli += ["--range", f"{name}={spec}"]
    return cli


def _run(command: list[str]) -> float:
    """Wall time of ``command`` (a subprocess with OMP_NUM_THREADS=1); raises on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(command)}")
    return seconds


def _inner_seconds(run_dir: Path) -> float | None:
    """Seconds from rank 0 opening the run directory to the run's completion, or None.

    Measured from the modification times of ``config.json`` (written when rank 0 opens
    the run, after loading the model and data) and ``manifest.json`` (rewritten last, by
    ``finalize``): the parts and the aggregation, without interpreter / torchrun start-up
    and loading. Cross-checked against the manifest's ``started`` and ``finished``
    (ISO timestamps, 1 s resolution); None when they disagree by more than 1.5 s.
    """
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        start = datetime.datetime.fromisoformat(manifest["started"])
        end = datetime.datetime.fromisoformat(manifest["finished"])
        coarse = (end - start).total_seconds()
        fine = (
            (run_dir / "manifest.json").stat().st_mtime_ns
            - (run_dir / "config.json").stat().st_mtime_ns
        ) / 1e9
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return fine if abs(fine - coarse) <= 1.5 else None


def _array_column(series: pd.Series) -> bool:
    first = next((v for v in series if v is not None), None)
    return isinstance(first, np.ndarray | list | tuple)


def _compare(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    """None when ``a`` and ``b`` are identical, else a one-line reason."""
    if list(a.columns) != list(b.columns):
        return f"columns differ: {list(a.columns)} vs {list(b.columns)}"
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} rows"
    arrays = [c for c in a.columns if a[c].dtype == object and _array_column(a[c])]
    for column in arrays:
        for i, (x, y) in enumerate(zip(a[column], b[column], strict=True)):
            if not np.array_equal(np.asarray(x), np.asarray(y)):
                return f"column {column!r} differs at row {i}"
    try:
        pd.testing.assert_frame_equal(
            a.drop(columns=arrays), b.drop(columns=arrays), check_exact=True
        )
    except AssertionError as err:
        return " ".join(str(err).split())[:300]
    return None


def compare_runs(one: Path, two: Path) -> list[tuple[str, str | None]]:
    """``[(table, reason or None)]`` for every aggregate and part table of both runs."""
    from invariscope.runs import RunStore

    a, b = RunStore.open(one), RunStore.open(two)
    out: list[tuple[str, str | None]] = []
    out.append(
        (
            "status",
            None
            if a.is_complete and b.is_complete
            else f"status {a.status} vs {b.status} (both must be complete)",
        )
    )
    out.append(
        (
            "parts",
            None
            if a.completed_parts() == b.completed_parts()
            else f"{len(a.completed_parts())} vs {len(b.completed_parts())} done parts",
        )
    )
    if a.aggregates() != b.aggregates():
        out.append(("aggregates", f"{a.aggregates()} vs {b.aggregates()}"))
    for name in sorted(set(a.aggregates()) & set(b.aggregates())):
        out.append((f"aggregate {name}", _compare(a.read_aggregate(name), b.read_aggregate(name))))
    if a.tables() != b.tables():
        out.append(("part tables", f"{a.tables()} vs {b.tables()}"))
    for name in sorted(set(a.tables()) & set(b.tables())):
        out.append((f"table {name}", _compare(a.read_table(name), b.read_table(name))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="coarse ranges (smoke run)")
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--forward-batch", type=int, default=256)
    parser.add_argument(
        "--memory-format", default="contiguous", choices=["contiguous", "channels_last"]
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run each configuration N times, keep the best"
    )
    parser.add_argument("--keep", type=Path, default=None, help="write the runs here (kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = _checkpoint(root / "simple-cnn.pt")
        one_dir, two_dir = root / "one-rank", root / "two-ranks"
        single = [sys.executable, "-m", "invariscope", *_sweep_args(model, one_dir, args)]
        ranges = QUICK_RANGES if args.quick else RANGES
        print(
            f"simple-cnn (random weights) on digits test (360 images), {TRANSFORMS} over "
            + ", ".join(f"{n}={s}" for n, s in ranges.items())
            + f", batch {args.batch_size}, forward batch {args.forward_batch}, "
            f"{args.memory_format}; OMP_NUM_THREADS=1; {os.cpu_count()} CPUs; "
            f"best of {args.repeats}"
        )
        walls = {1: [], 2: []}
        inner = {1: [], 2: []}
        for _ in range(args.repeats):
            walls[1].append(_run(single))
            inner[1].append(_inner_seconds(one_dir))
            torchrun = [
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
                *_sweep_args(model, two_dir, args),
            ]
            walls[2].append(_run(torchrun))
            inner[2].append(_inner_seconds(two_dir))
        results = compare_runs(one_dir, two_dir)

    t1, t2 = min(walls[1]), min(walls[2])
    i1 = min((t for t in inner[1] if t is not None), default=None)
    i2 = min((t for t in inner[2] if t is not None), default=None)
    rows = [
        ("1 rank x 1 thread, wall", f"{t1:.2f} s", "", ""),
        ("2 ranks x 1 thread (torchrun), wall", f"{t2:.2f} s", "", ""),
        (
            "(a) throughput 1 rank / 2 ranks, wall",
            f"{t1:.2f} s / {t2:.2f} s",
            f"{t1 / t2:.2f}x",
            f">= {GOAL}x",
        ),
    ]
    if i1 and i2:
        rows.append(
            (
                "    run dir opened -> finalized (no start-up)",
                f"{i1:.2f} s / {i2:.2f} s",
                f"{i1 / i2:.2f}x",
                "",
            )
        )
        rows.append(
            (
                "    start-up and loading (wall - the above)",
                f"{t1 - i1:.1f} s / {t2 - i2:.1f} s",
                "",
                "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("measure", "measured", "ratio", "goal")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))

    failed = [(name, why) for name, why in results if why is not None]
    compared = [name for name, _ in results if name.startswith(("aggregate ", "table "))]
    for name, why in failed:
        print(f"  differs: {name}: {why}")
    print(
        f"{'PASS' if not failed else 'FAIL'}: tables identical ({len(compared)} compared: "
        f"{len([c for c in compared if c.startswith('aggregate')])} aggregates, "
        f"{len([c for c in compared if c.startswith('table')])} part tables)"
    )
    meets = t1 / t2 >= GOAL
    print(
        f"{'PASS' if meets else 'FAIL'}: throughput 2 ranks vs 1 rank {t1 / t2:.2f}x "
        f"({'meets' if meets else 'does not meet'} the goal >= {GOAL}x, wall clock with "
        "process start-up)"
    )
    if i1 and i2:
        meets = i1 / i2 >= GOAL
        print(
            f"{'PASS' if meets else 'FAIL'}: throughput 2 ranks vs 1 rank {i1 / i2:.2f}x "
            f"({'meets' if meets else 'does not meet'} the goal >= {GOAL}x, from the run "
            "directory opened to finalized)"
        )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
