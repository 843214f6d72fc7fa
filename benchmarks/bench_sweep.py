"""Benchmark of ``invariscope sweep`` on the built-in simple-cnn and the digits test set.

Prints, measured in one run:

(a) sweep wall time / bare forward time over the same number of images (goal <= 1.10):
    the full sweep (transformations, forward passes, records, softmax sums, Parquet parts,
    aggregates; no figures) against ``model(x)`` alone on the same number of images in
    batches of the same size;
(b) speed-up over a naive per-image baseline (goal >= 20x), written here the way the
    papers' scripts work: per image and magnitude, a PIL rotation / scipy.ndimage shift /
    numpy noise, then a batch-size-1 forward pass;
(c) peak memory (resident set size of a fresh subprocess) at 1x and 10x the number of
    images (goal: within 20%).

Usage::

    python benchmarks/bench_sweep.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_sweep.py --quick    # fewer repetitions
    python benchmarks/bench_sweep.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TRANSFORMS = ["rotation", "translate_x", "gaussian_noise"]
RANGES = {
    "rotation": (-180, 180, 10),
    "translate_x": (-0.5, 0.5, 0.05),
    "gaussian_noise": (0.0, 1.0, 0.05),
}


def _dataset(repeat: int = 1):
    """The digits test set (360 images), tiled ``repeat`` times."""
    from invariscope.data import create_dataset
    from invariscope.data.base import TensorImageDataset

    ds = create_dataset("digits", "test")
    if repeat == 1:
        return ds
    return TensorImageDataset(
        ds.images.repeat(repeat, 1, 1, 1),
        ds.labels.repeat(repeat),
        classes=ds.classes,
        name=f"digits-x{repeat}",
        split="test",
    )


def _model(device):
    from invariscope.models import create_model

    torch.manual_seed(0)
    return create_model("simple-cnn").eval().to(device)


def _sweep(model, ds, out, batch_size, forward_batch, device):
    from invariscope.measure.sweep import sweep

    return sweep(
        model,
        ds,
        TRANSFORMS,
        RANGES,
        out=out,
        overwrite=True,
        figures=False,
        batch_size=batch_size,
        forward_batch=forward_batch,
        device=device,
    )


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_overhead(model, ds, batch_size, forward_batch, device, repeats):
    """(a): best-of-``repeats`` sweep time and bare forward time, interleaved."""
    from invariscope.measure.sweep import resolve_magnitudes

    n_images = len(ds) * sum(len(resolve_magnitudes(t, RANGES[t])) for t in TRANSFORMS)
    if forward_batch is None:
        from invariscope.engine.runner import DEFAULT_FORWARD_BATCH

        forward_batch = DEFAULT_FORWARD_BATCH.get(torch.device(device).type, 1024)
    x = ds.images[:forward_batch].to(device)
    if len(x) < forward_batch:
        x = x.repeat(forward_batch // len(x) + 1, 1, 1, 1)[:forward_batch]
    full, rest = divmod(n_images, forward_batch)
    sweep_times, forward_times, mem_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        _sweep(model, ds, Path(tmp) / "warm", batch_size, forward_batch, device)  # warm-up
        for r in range(repeats):
            _sync(device)
            t = time.perf_counter()
            _sweep(model, ds, Path(tmp) / f"run{r}", batch_size, forward_batch, device)
            _sync(device)
            sweep_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            _sweep(model, ds, None, batch_size, forward_batch, device)
            _sync(device)
            mem_times.append(time.perf_counter() - t)
            with torch.inference_mode():
                t = time.perf_counter()
                for _ in range(full):
                    model(x)
                if rest:
                    model(x[:rest])
                _sync(device)
                forward_times.append(time.perf_counter() - t)
    return n_images, min(sweep_times), min(mem_times), min(forward_times)


def _naive_one(model, image: np.ndarray, label: int, name: str, m: float, index: int) -> bool:
    """The papers' way: transform ONE image with PIL / scipy / numpy, forward it alone."""
    from PIL import Image
    from scipy import ndimage

    if name == "rotation":
        pil = Image.fromarray((image[0] * 255).astype(np.uint8))
        out = np.asarray(pil.rotate(m, resample=Image.BILINEAR), dtype=np.float32)[None] / 255
    elif name == "translate_x":
        out = ndimage.shift(image, (0, 0, m * image.shape[-1]), order=1, mode="constant")
    else:
        rng = np.random.default_rng(index)
        out = np.clip(image + m * rng.standard_normal(image.shape), 0, 1)
    with torch.inference_mode():
        logits = model(torch.as_tensor(out, dtype=torch.float32)[None])
    return int(logits.argmax(1)) == label


def bench_naive(model, ds, n_naive: int):
    """(b): seconds per (image, magnitude) of the naive loop over ``n_naive`` images."""
    from invariscope.measure.sweep import resolve_magnitudes

    model = model.to("cpu")
    images = ds.images[:n_naive].numpy()
    labels = ds.labels[:n_naive].tolist()
    count = 0
    t = time.perf_counter()
    for name in TRANSFORMS:
        for m in resolve_magnitudes(name, RANGES[name]):
            for i in range(n_naive):
                _naive_one(model, images[i], labels[i], name, float(m), i)
                count += 1
    return (time.perf_counter() - t) / count


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(repeat: int, batch_size: int, forward_batch: int | None, device: str) -> None:
    """Run one sweep in this (fresh) process; print peak RSS and Python peak (MiB) as JSON.

    The RSS is sampled every 2 ms during the sweep (``ru_maxrss`` alone would report the
    peak of the imports); tracemalloc gives the peak of Python-level allocations
    (pandas / numpy included) during the sweep.
    """
    import threading
    import tracemalloc

    ds = _dataset(repeat)
    model = _model(device)
    _sweep(model, _dataset(1), None, batch_size, forward_batch, device)  # warm caches
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        _sweep(model, ds, Path(tmp) / "run", batch_size, forward_batch, device)
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_mib())
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else 0
    print(
        json.dumps(
            {
                "images": len(ds),
                "peak_rss_mib": peak[0],
                "before_sweep_mib": base,
                "python_peak_mib": py_peak / 2**20,
                "cuda_peak_mib": cuda,
            }
        )
    )


def bench_memory(batch_size, forward_batch, device):
    """(c): peak RSS of fresh subprocesses sweeping 1x and 10x the images."""
    out = {}
    for repeat in (1, 10):
        fb = [] if forward_batch is None else ["--forward-batch", str(forward_batch)]
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-memory",
                str(repeat),
                "--batch-size",
                str(batch_size),
                *fb,
                "--device",
                device,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[repeat] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, fewer naive images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--forward-batch",
        type=int,
        default=None,
        help="default: the sweep's own (256 on cpu, 1024 on cuda)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--naive-images", type=int, default=None)
    parser.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory is not None:
        child_memory(args.child_memory, args.batch_size, args.forward_batch, args.device)
        return
    repeats = 1 if args.quick else 3
    n_naive = args.naive_images or (10 if args.quick else 30)
    ds = _dataset()
    model = _model(args.device)
    print(
        f"simple-cnn on digits test ({len(ds)} images), transforms {', '.join(TRANSFORMS)}, "
        f"batch {args.batch_size}, forward batch {args.forward_batch or 'default'}, device "
        f"{args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    n, t_sweep, t_mem, t_fwd = bench_overhead(
        model, ds, args.batch_size, args.forward_batch, args.device, repeats
    )
    per_naive = bench_naive(model, ds, n_naive)
    model.to(args.device)
    mem = bench_memory(args.batch_size, args.forward_batch, args.device)
    rows = [
        (
            "(a) sweep / bare forward, run store",
            f"{t_sweep:.2f} s / {t_fwd:.2f} s",
            f"{t_sweep / t_fwd:.3f}",
            "<= 1.10",
        ),
        (
            "(a) sweep / bare forward, in memory",
            f"{t_mem:.2f} s / {t_fwd:.2f} s",
            f"{t_mem / t_fwd:.3f}",
            "<= 1.10",
        ),
        (
            "(b) naive per image / sweep",
            f"{per_naive * 1e3:.3f} ms / {t_sweep / n * 1e3:.4f} ms per image x magnitude",
            f"{per_naive * n / t_sweep:.1f}x",
            ">= 20x",
        ),
        (
            "(c) peak RSS 10x / 1x images",
            f"{mem[10]['peak_rss_mib']:.0f} MiB ({mem[10]['images']}) / "
            f"{mem[1]['peak_rss_mib']:.0f} MiB ({mem[1]['images']})",
            f"{mem[10]['peak_rss_mib'] / mem[1]['peak_rss_mib']:.3f}",
            "<= 1.20",
        ),
        (
            "    RSS increase during the sweep 10x / 1x",
            f"{mem[10]['peak_rss_mib'] - mem[10]['before_sweep_mib']:.1f} MiB / "
            f"{mem[1]['peak_rss_mib'] - mem[1]['before_sweep_mib']:.1f} MiB",
            "",
            "",
        ),
        (
            "    tracemalloc peak 10x / 1x",
            f"{mem[10]['python_peak_mib']:.1f} MiB / {mem[1]['python_peak_mib']:.1f} MiB",
            f"{mem[10]['python_peak_mib'] / mem[1]['python_peak_mib']:.3f}",
            "<= 1.20",
        ),
    ]
    if args.device != "cpu":
        rows.append(
            (
                "    CUDA peak allocated 10x / 1x",
                f"{mem[10]['cuda_peak_mib']:.0f} / {mem[1]['cuda_peak_mib']:.0f} MiB",
                f"{mem[10]['cuda_peak_mib'] / max(mem[1]['cuda_peak_mib'], 1e-9):.3f}",
                "",
            )
        )
    print(
        f"{n} transformed images per sweep; naive baseline timed on {n_naive} images per "
        f"magnitude; best of {repeats}"
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("measure", "measured", "ratio", "goal")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
