"""Benchmark of the shift analysis's nonshiftability: every layer from one forward pass.

Setup: the ResNet-18 of ``bench_224.py`` (plain torch, random weights with a fixed
seed), 224 px RGB, ``torch.set_num_threads(2)``, shifted frames of the ``circular``
protocol. The analysis hooks every probe-able layer (conv1, bn1, relu, maxpool, the
eight basic blocks) and reduces each output to per-map sums and peaks inside the hook,
during the forward pass that computes the logits.

Prints, measured in one run:

(0) the bare forward pass per image at a few batch sizes, contiguous and channels_last;
    the best is the floor;
(a) the forward pass with every layer's sums and peaks recorded (the analysis's hooks)
    over the bare forward, same batch and memory format (goal <= 1.3);
(b) for comparison, one forward pass per layer (a hook on one layer at a time, what a
    per-layer loop would do) over the bare forward;
(c) the whole ``shift_stability(...)`` call (frames, forward with hooks, tables, in
    memory; one protocol, no consistency pairs; the floor's memory format and batch
    given, since a run this small is not worth timing) per frame over the floor. It
    includes the pre-flight and the one-image probe that picks the activation layers.

Usage::

    python benchmarks/bench_shift.py            # about two minutes on 2 CPU cores
    python benchmarks/bench_shift.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_224 import bare_forward, build_model  # noqa: E402

GOAL = 1.3


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    from invariscope.measure.shift import _LayerSums, _model_layers, shift_stability
    from invariscope.transforms.shift import parse_protocol

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    names = [f"c{i}" for i in range(10)]
    model = build_model(names)
    images, steps, repeats = (2, 4, 1) if args.quick else (4, 8, 3)
    x = torch.nn.functional.interpolate(torch.rand(images, 3, 28, 28), size=224, mode="bilinear")
    protocol = parse_protocol("circular", steps=steps)
    frames = torch.cat([protocol.frame(x, t) for t in range(steps)])  # [images * steps, ...]
    n = frames.shape[0]

    print(f"ResNet-18, 224 px, {args.threads} threads, {n} frames ({images} images x {steps})")
    sizes = (8, 16, 32) if not args.quick else (8,)
    table = bare_forward(model, x, sizes, min_images=32 if not args.quick else 8)
    (fmt, bs), floor = min(table.items(), key=lambda kv: kv[1])
    for (f, b), s in sorted(table.items()):
        print(f"  (0) bare forward {f:<13} batch {b:>3}: {1000 * s:7.1f} ms/image")
    print(f"  floor: {fmt}, batch {bs}: {1000 * floor:.1f} ms/image")

    cl = fmt == "channels_last"
    model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    chunks = [frames[i : i + bs] for i in range(0, n, bs)]
    if cl:
        chunks = [c.contiguous(memory_format=torch.channels_last) for c in chunks]
    layers = _model_layers(model)

    def bare():
        with torch.inference_mode():
            for c in chunks:
                model(c)

    def hooked():
        hooks = _LayerSums(model, layers)
        try:
            with torch.inference_mode():
                for c in chunks:
                    model(c)
            hooks.take()
        finally:
            hooks.close()

    def per_layer():
        for layer in layers:
            hooks = _LayerSums(model, [layer])
            try:
                with torch.inference_mode():
                    for c in chunks:
                        model(c)
                hooks.take()
            finally:
                hooks.close()

    t_bare = _timed(bare, repeats)
    t_hooked = _timed(hooked, repeats)
    t_layer = _timed(per_layer, 1)
    ratio = t_hooked / t_bare
    print(
        f"  (a) forward with all {len(layers)} layers' sums / bare forward: {ratio:.3f} "
        f"(goal <= {GOAL}) {'OK' if ratio <= GOAL else 'MISSED'}"
    )
    print(f"  (b) one forward per layer / bare forward: {t_layer / t_bare:.2f}")
    model.to(memory_format=torch.contiguous_format)

    class Frames(torch.utils.data.Dataset):
        def __len__(self):
            return images

        classes = list(names)

        def __getitem__(self, i):
            return x[i], i % len(names)

    def whole():
        shift_stability(
            model,
            Frames(),
            "circular",
            frames=steps,
            consistency_pairs=0,
            batch_size=images,
            forward_batch=bs,
            memory_format=fmt,
            progress=False,
        )

    t_whole = _timed(whole, 1 if args.quick else 2)
    print(
        f"  (c) shift_stability per frame / floor ({fmt}, forward batch {bs}): "
        f"{t_whole / n / floor:.3f}"
    )


if __name__ == "__main__":
    main()
