"""The work of ``bench_zoo.py`` on CUDA: time over the GPU forward floor, tables against the CPU.

For both models of ``bench_zoo.py`` (pretrained EfficientNet-Lite0, the ResNet-50-shaped
zoo net with random init, seed 0) and the analyses that take an ImageNet model (sweep,
worst_case, shift, lee, alignment, equivariance, stitch, itn; ``stn_benchmark`` trains
its own small classifiers on digits and is left out), with the configurations of
``bench_zoo.py`` (``--quick``: its tiny ones), in fp32 and with ``amp=True`` (autocast
fp16 on CUDA, bf16 on the CPU):

(0) the forward floor on the device: ``model(x)`` under ``inference_mode`` (and autocast
    for amp), the best seconds per image over batch sizes x {contiguous, channels_last};
(1) each analysis on ``--images`` photos (default 64) through its one-line API with the
    engine's defaults: wall time and ``time / (equivalents x floor)`` (amp runs over the
    amp floor); equivalents are counted as in ``bench_zoo.py``;
(2) the same analysis on ``--compare-images`` photos (default 16) on the device and on
    the CPU (fp32, the reference), and their stored tables compared with tolerances:

    =====================  ==========================  ==========================
    what                   fp32 (TF32 as torch sets)   amp
    =====================  ==========================  ==========================
    predictions, correct   flips <= max(2, 2% rows)    flips <= max(3, 10% rows)
    counts (``correct``)   |diff| <= max(2, 2% of n)   |diff| <= max(3, 10% of n)
    probabilities          abs 5e-3                    abs 5e-2
    LEE, alignment error,  relative 1e-2               relative 1e-1
    reconstruction, sums
    CKA                    abs 1e-2                    abs 5e-2
    training losses        relative 5e-2               relative 2e-1
    =====================  ==========================  ==========================

    (relative: ``|a - b| <= rtol x |reference| + 1e-6 x max |reference|``). A check
    passes when every compared value is within its tolerance (flips and counts: when
    their number is). ``torch.backends.cudnn.allow_tf32`` is left as torch sets it (on)
    and printed: the fp32 comparison is of what users get.

Exits 0 with a message when CUDA is not available (or ``--device cpu`` for a smoke run of
the code path: then the "device" is the CPU and amp is bf16 autocast), 1 when a check
fails or an analysis fails. Sized to run in under 5 minutes on one H100.

Usage::

    python benchmarks/bench_gpu.py                       # on a CUDA machine
    python benchmarks/bench_gpu.py --device cpu --quick --images 2 --compare-images 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_zoo import (  # noqa: E402
    MODELS,
    Env,
    Row,
    build_cases,
    forward_floor,
    load,
    run_case,
    settings,
)

ANALYSES = ("sweep", "worst_case", "shift", "lee", "alignment", "equivariance", "stitch", "itn")
GPU_FLOOR_SIZES = (64, 128, 256, 512)

#: Tolerances by precision (False: fp32, True: amp).
TOLERANCE = {
    False: {"flips": (2, 0.02), "prob": 5e-3, "rel": 1e-2, "abs": 1e-2, "train": 5e-2},
    True: {"flips": (3, 0.10), "prob": 5e-2, "rel": 1e-1, "abs": 5e-2, "train": 2e-1},
}


@dataclass(frozen=True)
class Check:
    """One comparison: ``table`` joined on ``keys``; ``column`` compared as ``kind``.

    kind: ``flips`` (rows whose value differs), ``count`` (summed ``|a - b|`` of counts,
    against ``n``), ``prob`` / ``abs`` (absolute), ``rel`` / ``train`` (relative)."""

    table: str
    keys: tuple[str, ...]
    column: str
    kind: str


CHECKS: dict[str, list[Check]] = {
    "sweep": [
        Check("records", ("transform", "magnitude", "index"), "pred", "flips"),
        Check("records", ("transform", "magnitude", "index"), "p_true", "prob"),
    ],
    "worst_case": [
        Check("worst_case", ("index",), "natural_correct", "flips"),
        Check("worst_case", ("index",), "random_correct", "flips"),
        Check("worst_case", ("index",), "worst_of_k_correct", "flips"),
        Check("worst_case", ("index",), "grid_correct", "flips"),
        Check("worst_case", ("index",), "worst_p_true", "prob"),
    ],
    "shift": [
        Check("frames", ("protocol", "index", "frame"), "pred", "flips"),
        Check("frames", ("protocol", "index", "frame"), "p_true", "prob"),
        Check("consistency", ("protocol", "index", "pair"), "pred_a", "flips"),
        Check("consistency", ("protocol", "index", "pair"), "pred_b", "flips"),
        Check("layer_sums", ("protocol", "index", "layer", "frame"), "total", "rel"),
    ],
    "lee": [
        Check("lee_summary", ("transform",), "lee", "rel"),
        Check("lee", ("transform", "index"), "pred", "flips"),
    ],
    "alignment": [
        Check("alignment_mean", ("transform", "magnitude", "layer", "method"), "mean", "rel"),
    ],
    "equivariance": [
        Check("reconstruction", ("layer", "transform", "map"), "error", "rel"),
        Check("task", ("layer", "transform", "map"), "correct", "count"),
        Check("base", (), "correct", "count"),
    ],
    "stitch": [
        Check("cka", ("layer_a", "layer_b"), "cka", "abs"),
        Check("base", ("model",), "correct", "count"),
        Check("stitch", ("layer_a", "layer_b"), "correct", "count"),
        Check("stitch", ("layer_a", "layer_b"), "final_loss", "train"),
    ],
    "itn": [
        Check("clean_count", (), "correct", "count"),
        Check("training_steps", ("step",), "loss", "train"),
        Check("grid_count", ("k1", "k2"), "correct", "count"),
    ],
}


def read(run_dir: Path, name: str) -> pd.DataFrame:
    """Aggregate ``name`` of a run directory, else its per-part table."""
    from invariscope.runs import RunStore

    store = RunStore.open(run_dir)
    if name in store.aggregates():
        return store.read_aggregate(name)
    return store.read_table(name)


def compare(check: Check, ref: pd.DataFrame, got: pd.DataFrame, amp: bool) -> tuple[bool, str]:
    """``(passed, "table.column: what")`` for one check."""
    tol = TOLERANCE[amp]
    keys = list(check.keys)
    what = f"{check.table}.{check.column}"
    if len(ref) != len(got):
        return False, f"{what}: {len(got)} rows, reference {len(ref)}"
    if keys:
        merged = ref.merge(got, on=keys, suffixes=("_ref", "_got"), how="inner")
        if len(merged) != len(ref):
            return False, f"{what}: keys differ ({len(merged)} of {len(ref)} rows match)"
        a = merged[f"{check.column}_ref"].to_numpy()
        b = merged[f"{check.column}_got"].to_numpy()
    else:
        a, b = ref[check.column].to_numpy(), got[check.column].to_numpy()
    rows = len(a)
    if check.kind == "flips":
        low, share = tol["flips"]
        flips = int((a != b).sum())
        allowed = max(low, math.ceil(share * rows))
        return flips <= allowed, f"{what}: {flips}/{rows} flips (<= {allowed})"
    if check.kind == "count":
        low, share = tol["flips"]
        diff = int(np.abs(a.astype(np.int64) - b.astype(np.int64)).sum())
        n = int(ref["n"].sum()) if "n" in ref else int(np.abs(a).sum())
        allowed = max(low, math.ceil(share * n))
        return diff <= allowed, f"{what}: |diff| {diff} of n {n} (<= {allowed})"
    a, b = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return False, f"{what}: NaN in {int((nan_a != nan_b).sum())} rows of one run only"
    a, b = a[~nan_a], b[~nan_a]  # NaN in both (e.g. no valid region) counts as equal
    rows = len(a)
    err = np.abs(a - b)
    if check.kind in ("prob", "abs"):
        bound = tol[check.kind]
        worst = float(err.max()) if rows else 0.0
        return bool((err <= bound).all()), f"{what}: max abs diff {worst:.2e} (<= {bound:g})"
    rtol = tol[check.kind]
    scale = np.abs(a)
    floor = 1e-6 * (float(scale.max()) if rows else 0.0)
    ok = err <= rtol * scale + floor
    worst = float((err / np.maximum(scale, floor or 1e-300)).max()) if rows else 0.0
    return bool(ok.all()), f"{what}: max rel diff {worst:.2e} (<= {rtol:g})"


def compare_runs(name: str, ref_dir: Path, got_dir: Path, amp: bool) -> tuple[bool, list[str]]:
    """All checks of analysis ``name`` between two run directories."""
    passed, notes = True, []
    for check in CHECKS[name]:
        try:
            ok, note = compare(check, read(ref_dir, check.table), read(got_dir, check.table), amp)
        except Exception as error:
            ok, note = False, f"{check.table}.{check.column}: {type(error).__name__}: {error}"
        passed &= ok
        notes.append(("" if ok else "FAIL ") + note.splitlines()[0][:150])
    return passed, notes


def floor_of(model, x, sizes, amp: bool) -> tuple[float, str]:
    table = forward_floor(model, x, sizes, amp=amp, min_images=sizes[0])
    (fmt, bs), best = min(table.items(), key=lambda kv: kv[1])
    return best, f"{fmt}, batch {bs}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    parser.add_argument("--quick", action="store_true", help="bench_zoo's tiny configurations")
    parser.add_argument("--images", type=int, default=None, help="timed runs (default 64)")
    parser.add_argument(
        "--compare-images", type=int, default=None, help="CPU comparison (default 16)"
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--analyses", default=",".join(ANALYSES))
    parser.add_argument(
        "--amp", choices=("both", "off", "only"), default="both", help="fp32 and/or amp runs"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu: CUDA is not available here (torch.cuda.is_available() is False); "
            "nothing to measure. Run it on a GPU machine, or test the code path with "
            "--device cpu --quick --images 2 --compare-images 2"
        )
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from invariscope.data import create_dataset

    n = args.images or (4 if args.quick else 64)
    n_cmp = args.compare_images or min(n, 4 if args.quick else 16)
    names = [a.strip() for a in args.analyses.split(",") if a.strip()]
    unknown = sorted(set(names) - set(ANALYSES))
    if unknown:
        raise SystemExit(f"unknown analysis '{unknown[0]}'; choose from {', '.join(ANALYSES)}")
    precisions = {"both": (False, True), "off": (False,), "only": (True,)}[args.amp]
    s = settings(args.quick, n)
    s_cmp = dataclasses.replace(s, images=n_cmp)
    test, train = create_dataset("photos", "test"), create_dataset("photos", "train")
    if max(n, n_cmp) > len(test):
        raise SystemExit(f"--images: the photos test split has {len(test)} images")
    x_cpu = torch.stack([test[i][0] for i in range(max(n, n_cmp))])
    sizes = (8,) if device.type == "cpu" else GPU_FLOOR_SIZES
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    tf32 = torch.backends.cudnn.allow_tf32
    print(
        f"bench_gpu on {where}: {n} photos timed, {n_cmp} compared with the CPU; torch "
        f"{torch.__version__}, cudnn.allow_tf32={tf32}, CPU threads {torch.get_num_threads()}, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    started = time.perf_counter()
    lines: list[tuple[str, ...]] = []
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for key in [m.strip() for m in args.models.split(",") if m.strip()]:
            cpu_model = load(key, torch.device("cpu"))
            model = copy.deepcopy(cpu_model).to(device).eval()
            x = x_cpu.to(device)
            floors = {amp: floor_of(model, x[:8], sizes, amp) for amp in precisions}
            for amp, (f, how) in floors.items():
                print(f"{key}: {'amp' if amp else 'fp32'} floor {f * 1e3:.3f} ms/image ({how})")

            def env(tag, s_, m=model, dev=device, xs=x, amp=False, key=key):
                out = tmp / f"{key}-{tag}"
                out.mkdir(exist_ok=True)
                return Env(key, m, test, train, xs[: s_.images], s_, dev, out, amp=amp)

            ref_env = env("cpu", s_cmp, m=cpu_model, dev=torch.device("cpu"), xs=x_cpu)
            for name in names:
                ref_case = build_cases(ref_env, [name])[0]
                ref = run_case(ref_case, ref_env, 1.0, hand=False)
                ref_dir = ref_env.out / f"{key}-{name}"
                for amp in precisions:
                    label = "amp" if amp else "fp32"
                    timed_env = env(f"{label}-n", s, amp=amp)
                    case = build_cases(timed_env, [name])[0]
                    row: Row = run_case(case, timed_env, floors[amp][0], hand=False)
                    if n == n_cmp:
                        got_dir = timed_env.out / f"{key}-{name}"
                        cmp_row = row
                    else:
                        cmp_env = env(f"{label}-cmp", s_cmp, amp=amp)
                        cmp_case = build_cases(cmp_env, [name])[0]
                        cmp_row = run_case(cmp_case, cmp_env, 1.0, hand=False)
                        got_dir = cmp_env.out / f"{key}-{name}"
                    if row.error or cmp_row.error or ref.error:
                        verdict = "ERROR"
                        notes = [e for e in (row.error, cmp_row.error, ref.error) if e]
                    else:
                        ok, notes = compare_runs(name, ref_dir, got_dir, amp)
                        verdict = "ok" if ok else "FAIL"
                    failed |= verdict != "ok"
                    ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
                    secs = "-" if row.seconds is None else f"{row.seconds:.2f}"
                    ref_s = "-" if ref.seconds is None else f"{ref.seconds:.1f}"
                    lines.append(
                        (name, key, label, case.config, secs, str(case.equivalents), ratio,
                         row.execution, ref_s, verdict)
                    )  # fmt: skip
                    print(f"  {name} {label}: {secs} s, x floor {ratio}; vs CPU: {verdict}")
                    for note in notes:
                        print(f"      {note}")
            del model, cpu_model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    header = (
        "analysis",
        "model",
        "prec",
        "config",
        "time s",
        "equiv",
        "x floor",
        "engine",
        "cpu ref s",
        "vs cpu",
    )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s; x floor = time / (equiv x the "
        f"device's floor, amp runs over the amp floor); 'cpu ref s' = the CPU reference run "
        f"on {n_cmp} photos"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
