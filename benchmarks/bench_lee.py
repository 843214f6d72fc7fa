"""Benchmark of the Lie derivative (``invariscope.measure.lee``) at 224 px, 2 threads.

Per model (a ResNet-50: ``create_model("resnet50", num_classes=1000)`` from the model
zoo, else a plain torchvision-shaped ResNet-50 defined here; EfficientNet-Lite0 through
``load_model("efficientnet-lite0")`` when it loads, skipped with a message otherwise),
random weights with a fixed seed (speed does not depend on them), eval mode, N random
images ``[N, 3, 224, 224]``, ``torch.set_num_threads(2)``. Prints seconds per image:

(0) the forward floor: ``model(x)`` under ``inference_mode``, the best of batch sizes
    {8, 16, 32} x memory formats {contiguous, channels_last};
(a) ``lie_derivatives`` (the logits' Lie derivative, no layers) per transformation
    (translate_x, rotation, zoom, brightness), batch 16 (``--batch``), in the floor's
    memory format: the direct t = 0 tangent + one forward-mode product. Goal: <= 3x
    the floor;
(b) the previous path: autograd through the warp core (``grid_sample``, double backward),
    the same call with the reference implementation, on fewer images (it is slow);
(c) a batched central finite difference: two extra forwards at t = +-h through
    ``warp_affine`` (photometric: the formula), ``inference_mode``, same batch and format
    (it does not give the logits themselves, which (a) does);

in wall-clock and in this process's CPU seconds (steadier where the CPU is shared with
other jobs), and the CPU time's ratio to the floor ("x floor") and to the plain forward
pass at the same batch and format ("x fwd"). (a), (c) and that forward pass run
interleaved, ``--rounds`` times (best of each); (b) once.

Usage::

    python benchmarks/bench_lee.py             # ~10 minutes on 2 CPU cores
    python benchmarks/bench_lee.py --images 32 --batch 32
    python benchmarks/bench_lee.py --quick     # 8 images, ResNet-50 only (smoke run)
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from invariscope.measure.lee import _warp_lie_derivatives, lie_derivatives, lie_family

TRANSFORMS = ("translate_x", "rotation", "zoom", "brightness")
GOAL = 3.0


# ---------------------------------------------------------------------------- models


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck with batch norm and a residual add (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


def local_resnet50(num_classes: int = 1000) -> nn.Module:
    """A torchvision-shaped ResNet-50 (Bottleneck x [3, 4, 6, 3])."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def models() -> list[tuple[str, nn.Module]]:
    out = []
    torch.manual_seed(0)
    try:
        from invariscope.models import create_model

        out.append(("resnet50 (zoo)", create_model("resnet50", num_classes=1000)))
    except Exception as error:  # the zoo is optional here
        print(f"resnet50 from the zoo unavailable ({error}); using the local ResNet-50")
        out.append(("resnet50 (local)", local_resnet50()))
    try:
        from invariscope.models import load_model

        out.append(("efficientnet-lite0", load_model("efficientnet-lite0")))
    except Exception as error:
        print(f"efficientnet-lite0 skipped: load_model failed ({error})")
    return out


# ---------------------------------------------------------------------------- timing


def seconds(fn, repeats: int = 1) -> tuple[float, float]:
    """Best (wall-clock, process CPU) seconds of ``fn()`` over ``repeats`` runs."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def as_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def set_format(model: nn.Module, channels_last: bool) -> None:
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def floor(model: nn.Module, x: torch.Tensor) -> tuple[tuple[float, float], str]:
    """Best (wall, CPU) seconds per image of the bare forward pass, and its configuration
    (chosen on CPU time)."""
    best, where = (float("inf"), float("inf")), ""
    for channels_last in (False, True):
        set_format(model, channels_last)
        xs = as_format(x, channels_last)
        for size in (8, 16, 32):
            batch = xs.repeat((size + len(xs) - 1) // len(xs), 1, 1, 1)[:size]
            batch = as_format(batch, channels_last)
            with torch.inference_mode():
                model(batch[:2])  # warm-up

                def run(batch=batch):
                    model(batch)

                wall, cpu = seconds(run, repeats=2)
                per = (wall / size, cpu / size)
            if per[1] < best[1]:  # CPU time: steadier than wall-clock on a shared machine
                best, where = (
                    per,
                    f"batch {size}, {'channels_last' if channels_last else 'contiguous'}",
                )
    return best, where


def chunks(x: torch.Tensor, size: int):
    return [x[i : i + size] for i in range(0, len(x), size)]


def lee_new(model, x, name, batch):
    for chunk in chunks(x, batch):
        lie_derivatives(model, chunk, name)


def lee_old(model, x, name, batch):
    family = lie_family(name)
    for chunk in chunks(x, batch):
        _warp_lie_derivatives(model, chunk, family)


def finite_difference(model, x, name, batch, h=1e-2):
    family = lie_family(name)
    with torch.inference_mode():
        for chunk in chunks(x, batch):
            t = torch.full((len(chunk),), h, dtype=chunk.dtype)
            (model(family.apply(chunk, t)) - model(family.apply(chunk, -t))) / (2 * h)


def forward(model, x, batch):
    with torch.inference_mode():
        for chunk in chunks(x, batch):
            model(chunk)


def bench(label: str, model: nn.Module, n: int, n_old: int, batch: int, rounds: int) -> None:
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 224, 224, generator=g)
    base, where = floor(model, x)
    channels_last = "channels_last" in where
    set_format(model, channels_last)
    x = as_format(x, channels_last)
    print(f"\n{label}: {n} images 3x224x224, {torch.get_num_threads()} threads, batch {batch}")
    print(f"  forward floor: {base[0]:.4f} s/image wall, {base[1]:.4f} CPU s/image ({where})")
    print(
        f"  {'transform':<12} {'method':<34} {'s/image':>8} {'CPU s/im':>8} {'x floor':>8} "
        f"{'x fwd':>6}"
    )
    for name in TRANSFORMS:
        lee_new(model, x[:2], name, 2)  # warm-up (forward-AD mode)
        best = {"fwd": (math.inf, math.inf), "new": (math.inf, math.inf)}
        best["fd"] = (math.inf, math.inf)
        for _ in range(rounds):  # interleaved: the machine's load changes the same for all
            for key, fn in (
                ("fwd", lambda: forward(model, x, batch)),
                ("new", lambda name=name: lee_new(model, x, name, batch)),
                ("fd", lambda name=name: finite_difference(model, x, name, batch)),
            ):
                wall, cpu = seconds(fn)
                best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
        rows = [
            ("new: direct tangent + forward AD", best["new"], n),
            ("central finite difference (2 fwd)", best["fd"], n),
        ]
        if n_old:
            old = seconds(lambda name=name: lee_old(model, x[:n_old], name, min(batch, n_old)))
            rows.append((f"old: autograd via grid_sample ({n_old})", old, n_old))
        same = best["fwd"][1] / n
        for method, (wall, cpu), count in rows:
            w, c = wall / count, cpu / count
            print(f"  {name:<12} {method:<34} {w:8.4f} {c:8.4f} {c / base[1]:8.2f} {c / same:6.2f}")
    set_format(model, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 images, ResNet-50 only")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="images per call of (a)-(c)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--old", type=int, default=8, help="images for the old path (0: skip)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of (a), (c)")
    parser.add_argument("--only", default="", help="run the models whose label contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = 8 if args.quick else args.images
    todo = models()[:1] if args.quick else models()
    todo = [(label, model) for label, model in todo if args.only in label]
    for label, model in todo:
        n_old = min(n, 4 if args.quick else args.old)
        bench(label, model, n=n, n_old=n_old, batch=min(args.batch, n), rounds=args.rounds)
    print(f"\ngoal: new <= {GOAL:g}x the floor and faster than the finite difference")


if __name__ == "__main__":
    main()
