"""Every registered analysis on real networks at 224 px, against the model's forward floor.

Models: the pretrained EfficientNet-Lite0 (``load_model("efficientnet-lite0")``) and a
ResNet-50-shaped zoo net (``create_model("resnet50", num_classes=1000)``, random init
with seed 0; speed does not depend on the weights). Data: the ``photos`` test split (real
photographs, 224 px crops with ImageNet labels), the first ``--images`` of them (default
64, ``--quick`` 8); the analyses that learn something use the ``photos`` train split.
``torch.set_num_threads(--threads)`` (default 2).

Prints, measured in one run, per model:

(0) the forward floor: ``model(x)`` under ``torch.inference_mode()``, the best seconds per
    image over batch sizes {8, 16, 32, 64} x {contiguous, channels_last};
(1) per analysis, a small but representative configuration (listed with how its
    forward-image equivalents are counted), run through its one-line Python API with the
    engine's defaults (``forward_batch="auto"``, ``memory_format="auto"``, results written
    to a temporary run directory, no figures): wall time, the forward-image equivalents
    ``E`` of the work, ``ratio = time / (E x floor)``, the images that actually entered
    the network (a forward pre-hook on it: pre-flight and tuning included, forwards that
    stop after a layer counted whole) and the engine's choice (forward batch, format);
(2) next to it what a user would write instead, where there is one: a batched loop at the
    floor's batch size and memory format doing the same forward work (sweep / worst case:
    the registry transforms / ``warp_affine`` then the forward pass, softmax, top-5;
    shift: the protocol's frames and pairs then the forward pass; LEE: a central finite
    difference, 2 forwards per transformation; alignment: the forward passes of the same
    canvas images, without the per-layer warps), its time and ratio.

Goals (from the issue): sweep, worst case and shift <= 1.3x the floor; LEE <= 3.0x and
faster than the finite-difference loop. An analysis that fails prints its one-line
error in the table instead of a time. ``stn_benchmark`` trains its own small classifiers
on perturbed digits and does not take an ImageNet model: it is reported on its own data
(simple-cnn on rotated-digits) as seconds per training step, without a floor.

The machine may be shared: note ``uptime`` next to the figures; ratios of runs at
different loads do not compare.

Usage::

    python benchmarks/bench_zoo.py                 # 64 photos: long on 2 loaded cores
    python benchmarks/bench_zoo.py --images 16     # the same configurations on 16 photos
    python benchmarks/bench_zoo.py --quick         # 8 photos, tiny configurations (smoke)
    python benchmarks/bench_zoo.py --models resnet50 --analyses sweep,lee
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("efficientnet-lite0", "resnet50")
ANALYSES = (
    "sweep",
    "worst_case",
    "shift",
    "lee",
    "alignment",
    "equivariance",
    "stitch",
    "itn",
    "stn_benchmark",
)
GOALS = {"sweep": 1.3, "worst_case": 1.3, "shift": 1.3, "lee": 3.0}
FLOOR_SIZES = (8, 16, 32, 64)
#: A middle layer with a 4-D output, for stitching and transformation layers.
MID_LAYER = {
    "efficientnet-lite0": "net._blocks.7",
    "resnet50": "net.layer2.3",
    "simple-cnn": "net.relu2",
}


# ------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """The configuration of every analysis (one set for ``--quick``, one otherwise)."""

    images: int
    sweep_magnitudes: tuple[float, ...] = (-30.0, -15.0, 0.0, 15.0, 30.0)
    budget: dict[str, Any] = field(
        default_factory=lambda: {
            "max_angle": 30.0,
            "max_shift": 24.0,
            "angles": 3,
            "shifts": 2,
            "k": 3,
        }
    )
    shift_steps: int = 8
    shift_pairs: int = 2
    lee_transforms: tuple[str, ...] = ("translate_x", "rotation")
    align_magnitudes: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"translate_x": (4.0,), "rotation": (45.0,)}
    )
    align_margin: int = 8
    equiv_transforms: str = "hflip"
    equiv_steps: int = 8
    equiv_batch: int = 8
    stitch_steps: int = 8
    stitch_batch: int = 8
    itn_steps: int = 8
    itn_save_every: int = 4
    itn_batch: int = 8
    itn_grid: int = 2
    itn_sweep_points: int = 3
    itn_examples: int = 2
    stn_archs: tuple[str, ...] = ("cnn", "C0")
    stn_steps: int = 20
    stn_batch: int = 64


def settings(quick: bool, images: int) -> Settings:
    """The full configurations, or tiny ones for ``--quick``."""
    if not quick:
        return Settings(images=images)
    return Settings(
        images=images,
        sweep_magnitudes=(-15.0, 15.0),
        budget={"max_angle": 30.0, "max_shift": 24.0, "angles": 2, "shifts": 1, "k": 1},
        shift_steps=3,
        shift_pairs=1,
        lee_transforms=("translate_x",),
        align_magnitudes={"rotation": (45.0,)},
        equiv_steps=2,
        equiv_batch=4,
        stitch_steps=2,
        stitch_batch=4,
        itn_steps=2,
        itn_save_every=1,
        itn_batch=4,
        itn_grid=2,
        itn_sweep_points=2,
        itn_examples=1,
        stn_steps=4,
        stn_batch=32,
    )


# ------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so that wall times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: bool):
    """The engine's autocast: fp16 on CUDA, bf16 on the CPU; a no-op without ``amp``."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(
        device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16
    )


def set_format(model: nn.Module, channels_last: bool) -> None:
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def as_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def one_line(error: BaseException) -> str:
    """``Type: first line`` of an exception (at most 160 characters)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def forward_floor(
    model: nn.Module,
    sample: torch.Tensor,
    sizes: Iterable[int] = FLOOR_SIZES,
    *,
    amp: bool = False,
    min_images: int = 32,
) -> dict[tuple[str, int], float]:
    """``{(format, batch): seconds per image}`` of ``model(x)`` under ``inference_mode``.

    Per memory format one warm-up pass (each batch size on CUDA), then per batch size
    ``max(1, ceil(min_images / batch))`` timed passes (at least 3 on CUDA) of ``sample``
    repeated to the batch size. The model is left contiguous."""
    device = sample.device
    table: dict[tuple[str, int], float] = {}
    sizes = list(sizes)
    for fmt in ("contiguous", "channels_last"):
        cl = fmt == "channels_last"
        set_format(model, cl)
        with torch.inference_mode(), autocast(device, amp):
            model(as_format(sample[: min(len(sample), sizes[0])], cl))
            for bs in sizes:
                x = as_format(sample.repeat(math.ceil(bs / len(sample)), 1, 1, 1)[:bs], cl)
                passes = max(1, math.ceil(min_images / bs))
                if device.type == "cuda":
                    model(x)
                    passes = max(3, passes)
                sync(device)
                start = time.perf_counter()
                for _ in range(passes):
                    model(x)
                sync(device)
                table[(fmt, bs)] = (time.perf_counter() - start) / (passes * bs)
    set_format(model, False)
    return table


class Forwarder:
    """A hand loop's forward pass: buffers images to ``batch`` and runs the model in the
    given memory format under ``inference_mode`` (and autocast), keeping the top-5."""

    def __init__(self, model: nn.Module, batch: int, channels_last: bool, amp: bool = False):
        self.model, self.batch, self.cl, self.amp = model, batch, channels_last, amp
        self.top5: list[torch.Tensor] = []
        self._buffer: list[torch.Tensor] = []
        self._held = 0
        self.images = 0

    def _run(self, x: torch.Tensor) -> None:
        logits = self.model(as_format(x, self.cl))
        self.top5.append(torch.softmax(logits.float(), dim=1).topk(5, dim=1).indices.cpu())
        self.images += len(x)

    def add(self, images: torch.Tensor) -> None:
        self._buffer.append(images)
        self._held += len(images)
        while self._held >= self.batch:
            x = torch.cat(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._run(x[: self.batch])
            rest = x[self.batch :]
            self._buffer, self._held = ([rest] if len(rest) else []), len(rest)

    def finish(self) -> None:
        if self._held:
            self._run(torch.cat(self._buffer))
        self._buffer, self._held = [], 0


def hand_forward(model, stream: Iterator[torch.Tensor], batch: int, cl: bool, amp: bool) -> int:
    """Forward every image of ``stream`` (tensors ``[b, C, H, W]``) at ``batch``; images done."""
    set_format(model, cl)
    try:
        fwd = Forwarder(model, batch, cl, amp)
        with torch.inference_mode(), autocast(next(model.parameters()).device, amp):
            for images in stream:
                fwd.add(images)
            fwd.finish()
        return fwd.images
    finally:
        set_format(model, False)


@contextlib.contextmanager
def counting(*models: nn.Module) -> Iterator[list[int]]:
    """Counts the images entering each model's network (its ``net`` for a Classifier)."""
    count = [0]

    def pre(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
            count[0] += int(args[0].shape[0])

    handles = [getattr(m, "net", m).register_forward_pre_hook(pre) for m in models]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def execution_of(run_dir: Path | None) -> str:
    """``"fb 32 cl"``: the forward batch and memory format the engine chose (meta.json)."""
    if run_dir is None:
        return ""
    try:
        ex = json.loads((Path(run_dir) / "meta.json").read_text())["execution"]
    except (OSError, KeyError, ValueError):
        return ""
    text = f"fb {ex.get('forward_batch')} {'cl' if ex.get('channels_last') else 'contig'}"
    if ex.get("tuning_seconds"):
        text += f", tuned {ex['tuning_seconds']:.1f}s"
    return text


# ------------------------------------------------------------------------ the cases


@dataclass
class Env:
    """What every case runs on: the model and data on one device, and the engine options."""

    key: str
    model: nn.Module
    test: Any
    train: Any
    x: torch.Tensor  # the first ``images`` test images, on the device
    s: Settings
    device: torch.device
    out: Path
    amp: bool = False
    floor_batch: int = 32
    floor_cl: bool = False

    @property
    def n(self) -> int:
        return self.s.images

    def engine(self) -> dict[str, Any]:
        return {"device": self.device, "amp": self.amp}


@dataclass
class Case:
    """One analysis in one configuration."""

    name: str
    config: str  # short, for the table
    detail: str  # the configuration in full
    counting: str  # how the forward-image equivalents are counted
    equivalents: int
    run: Callable[[Path], Any]  # out directory -> result
    hand: Callable[[], int] | None = None  # -> images forwarded
    hand_label: str = ""
    floor_free: bool = False  # no floor ratio (stn_benchmark: its own models)
    per_step: int = 0  # training steps, for seconds per step


def _worst_hand(env: Env) -> Callable[[], int]:
    from invariscope.measure.worst_case import SpatialBudget
    from invariscope.transforms import compose_matrix, warp_affine

    budget = SpatialBudget(**env.s.budget)

    def stream():
        g = torch.Generator().manual_seed(0)
        grid = torch.as_tensor(budget.grid(), dtype=torch.float32)
        lim = torch.tensor([budget.max_angle, budget.max_shift, budget.max_shift])
        for xc in chunks(env.x, env.floor_batch):
            b, (h, w) = len(xc), xc.shape[-2:]
            draws = (2 * torch.rand(b, budget.k, 3, generator=g) - 1) * lim
            points = torch.cat([torch.zeros(b, 1, 3), draws, grid.expand(b, -1, -1)], dim=1)
            for p in range(points.shape[1]):
                a, tx, ty = points[:, p].to(xc.device).unbind(1)
                steps = [("rotation", a), ("translate_x", tx / w), ("translate_y", ty / h)]
                yield warp_affine(xc, compose_matrix(steps, h, w).to(xc))

    return lambda: hand_forward(env.model, stream(), env.floor_batch, env.floor_cl, env.amp)


def _shift_hand(env: Env) -> Callable[[], int]:
    from invariscope.transforms.shift import parse_protocol

    protocol = parse_protocol("embed", steps=env.s.shift_steps)

    def stream():
        g = torch.Generator().manual_seed(0)
        for start in range(0, env.n, env.floor_batch):
            xc = env.x[start : start + env.floor_batch]
            h, w = xc.shape[-2:]
            seeds = torch.arange(start, start + len(xc))
            for t in range(protocol.steps):
                yield protocol.frame(xc, t, seed=seeds)
            r = int(min(max(2, round(32 / 224 * min(h, w))), protocol.max_offset(h, w) + 1))
            for _ in range(2 * env.s.shift_pairs):
                dy, dx = torch.randint(0, r, (2, len(xc)), generator=g)
                yield protocol.at(xc, dy, dx)

    return lambda: hand_forward(env.model, stream(), env.floor_batch, env.floor_cl, env.amp)


def _lee_hand(env: Env, h: float = 1e-2) -> Callable[[], int]:
    from invariscope.measure.lee import lie_family

    families = [lie_family(name) for name in env.s.lee_transforms]

    def loop() -> int:
        done = 0
        set_format(env.model, env.floor_cl)
        try:
            with torch.inference_mode(), autocast(env.device, env.amp):
                for family in families:
                    for xc in chunks(env.x, env.floor_batch):
                        t = torch.full((len(xc),), h, dtype=xc.dtype, device=xc.device)
                        plus = env.model(as_format(family.apply(xc, t), env.floor_cl))
                        minus = env.model(as_format(family.apply(xc, -t), env.floor_cl))
                        ((plus.float() - minus.float()) / (2 * h)).pow(2).sum(1).cpu()
                        done += 2 * len(xc)
        finally:
            set_format(env.model, False)
        return done

    return loop


def _alignment_hand(env: Env) -> Callable[[], int]:
    from invariscope.transforms import get_transform

    m = env.s.align_margin
    model = env.model
    mean = getattr(model, "mean", torch.zeros(3)).to(env.x).view(1, -1, 1, 1)
    std = getattr(model, "std", torch.ones(3)).to(env.x).view(1, -1, 1, 1)
    net = getattr(model, "net", model)

    class Net(nn.Module):  # the network on the canvas, normalised, without the size check
        def forward(self, x):
            return net((x - mean) / std)

    wrapped = Net()

    def stream():
        for xc in chunks(env.x, env.floor_batch):
            canvas = F.pad(xc, (m, m, m, m))
            side = canvas.shape[-1]
            for name, values in env.s.align_magnitudes.items():
                yield canvas
                spec = get_transform(name)
                for v in values:  # alignment's translations are in pixels
                    yield spec(canvas, v / side if name.startswith("translate") else v)

    def loop() -> int:
        fwd = Forwarder(wrapped, env.floor_batch, env.floor_cl, env.amp)
        set_format(net, env.floor_cl)
        try:
            with torch.inference_mode(), autocast(env.device, env.amp):
                for images in stream():
                    fwd.add(images)
                fwd.finish()
        finally:
            set_format(net, False)
        return fwd.images

    return loop


def build_cases(env: Env, names: Iterable[str]) -> list[Case]:
    """The cases of ``names`` for ``env`` (their configurations come from ``env.s``)."""
    from invariscope.measure.alignment import alignment
    from invariscope.measure.equivariance import equivariance
    from invariscope.measure.itn import invariant_transformer
    from invariscope.measure.lee import lie_derivative
    from invariscope.measure.shift import shift_stability
    from invariscope.measure.stitch import stitch
    from invariscope.measure.sweep import sweep
    from invariscope.measure.worst_case import SpatialBudget, worst_case_spatial
    from invariscope.transforms import get_transform

    s, n, model = env.s, env.n, env.model
    layer = MID_LAYER.get(env.key)
    cases: list[Case] = []
    for name in names:
        if name == "sweep":
            mags = list(s.sweep_magnitudes)
            spec = get_transform("rotation")

            def sweep_stream(mags=mags, spec=spec):
                for xc in chunks(env.x, env.floor_batch):
                    for v in mags:
                        yield spec(xc, v)

            cases.append(
                Case(
                    "sweep",
                    f"rotation x{len(mags)}",
                    f"sweep: rotation at {', '.join(f'{v:g}' for v in mags)} deg",
                    "N x T magnitudes",
                    n * len(mags),
                    lambda out, mags=mags: sweep(
                        model,
                        env.test,
                        ["rotation"],
                        {"rotation": mags},
                        images=n,
                        out=out,
                        figures=False,
                        **env.engine(),
                    ),
                    lambda st=sweep_stream: hand_forward(
                        model, st(), env.floor_batch, env.floor_cl, env.amp
                    ),
                    "rotate (registry) + forward",
                )
            )
        elif name == "worst_case":
            budget = SpatialBudget(**s.budget)
            per = 1 + budget.k + budget.points
            cases.append(
                Case(
                    "worst_case",
                    f"{budget.angles}x{budget.shifts}x{budget.shifts} grid, k={budget.k}",
                    f"worst_case: {budget.describe()}",
                    "N x (1 natural + k draws + grid points)",
                    n * per,
                    lambda out, b=budget: worst_case_spatial(
                        model, env.test, b, images=n, out=out, **env.engine()
                    ),
                    _worst_hand(env),
                    "warp_affine(rot+trans) + forward",
                )
            )
        elif name == "shift":
            per = s.shift_steps + 2 * s.shift_pairs
            cases.append(
                Case(
                    "shift",
                    f"embed {s.shift_steps} steps, {s.shift_pairs} pairs",
                    f"shift: protocol embed (factor 0.5, inpaint), {s.shift_steps} steps, "
                    f"{s.shift_pairs} consistency pairs, nonshiftability on every activation layer",
                    "N x (steps + 2 x pairs)",
                    n * per,
                    lambda out: shift_stability(
                        model,
                        env.test,
                        "embed",
                        frames=s.shift_steps,
                        consistency_pairs=s.shift_pairs,
                        images=n,
                        out=out,
                        **env.engine(),
                    ),
                    _shift_hand(env),
                    "protocol frames/pairs + forward (no layer sums)",
                )
            )
        elif name == "lee":
            ts = list(s.lee_transforms)
            cases.append(
                Case(
                    "lee",
                    f"{','.join(ts)}, logits",
                    f"lee: {', '.join(ts)}; logits only (layers=(), decompose=False)",
                    "N x T transformations (1 per image and transformation)",
                    n * len(ts),
                    lambda out, ts=ts: lie_derivative(
                        model,
                        env.test,
                        ts,
                        layers=(),
                        decompose=False,
                        images=n,
                        out=out,
                        **env.engine(),
                    ),
                    _lee_hand(env),
                    "central finite difference (2 fwd / T)",
                )
            )
        elif name == "alignment":
            mags = {k: list(v) for k, v in s.align_magnitudes.items()}
            per = sum(1 + len(v) for v in mags.values())
            desc = "; ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in mags.items())
            cases.append(
                Case(
                    "alignment",
                    desc,
                    f"alignment: {desc}; every placeable layer; margin {s.align_margin} "
                    f"(canvas {224 + 2 * s.align_margin} px), exact + floor (no best case)",
                    "N x sum over T of (1 + magnitudes), canvas forwards",
                    n * per,
                    lambda out, mags=mags: alignment(
                        model,
                        env.test,
                        list(mags),
                        magnitudes=mags,
                        margin=s.align_margin,
                        images=n,
                        out=out,
                        **env.engine(),
                    ),
                    _alignment_hand(env),
                    "canvas forwards only (no layer warps)",
                )
            )
        elif name == "equivariance":
            steps, tb = s.equiv_steps, s.equiv_batch
            n_t = len(s.equiv_transforms.split(","))
            cases.append(
                Case(
                    "equivariance",
                    f"{layer} {s.equiv_transforms}, TL {steps}x{tb}",
                    f"equivariance: {layer}, {s.equiv_transforms}, method none, transformation "
                    f"layer l2 (3x3), {steps} Adam steps x {tb} train images",
                    "N x (2 + T x (2 + 2 L)) eval + steps x batch x 2 (x and g^-1 x to the "
                    "layer; the l2 loss does not backpropagate through the net)",
                    n * (2 + n_t * (2 + 2)) + steps * tb * 2,
                    lambda out: equivariance(
                        model,
                        env.test,
                        env.train,
                        s.equiv_transforms,
                        layers=[layer],
                        method="none",
                        transformation_layer="l2",
                        kernel_size=3,
                        train_steps=s.equiv_steps,
                        train_batch=s.equiv_batch,
                        images=n,
                        out=out,
                        **env.engine(),
                    ),
                    per_step=steps,
                )
            )
        elif name == "stitch":
            steps, tb = s.stitch_steps, s.stitch_batch
            cases.append(
                Case(
                    "stitch",
                    f"{layer} self, {steps}x{tb}",
                    f"stitch: A = the model, B = a copy; {layer} -> {layer} (1x1), {steps} Adam "
                    f"steps x {tb} train images, CKA on",
                    "2 N (CKA) + steps x batch x 3 (forward + backward) + 2 N (stitched eval)",
                    2 * n + 3 * steps * tb + 2 * n,
                    lambda out: stitch(
                        model,
                        copy.deepcopy(model),
                        env.test,
                        env.train,
                        layers_a=[layer],
                        layers_b=[layer],
                        train_steps=s.stitch_steps,
                        train_batch=s.stitch_batch,
                        images=n,
                        out=out,
                        **env.engine(),
                    ),
                    per_step=steps,
                )
            )
        elif name == "itn":
            steps, tb = s.itn_steps, s.itn_batch
            g, sp = s.itn_grid, s.itn_sweep_points
            cases.append(
                Case(
                    "itn",
                    f"{steps}x{tb} steps, grid {g}, {sp} k1",
                    f"itn: {steps} Adam steps x {tb} train images (chunks of {s.itn_save_every}), "
                    f"grid {g}x{g}, {sp} sweep points, {s.itn_examples} examples",
                    "train split (clean accuracy) + steps x batch x 3 + N x (grid^2 + sweep "
                    "points)",
                    len(env.train) + 3 * steps * tb + n * (g * g + sp),
                    lambda out: invariant_transformer(
                        model,
                        env.test,
                        env.train,
                        train_steps=s.itn_steps,
                        save_every=s.itn_save_every,
                        train_batch=s.itn_batch,
                        grid=s.itn_grid,
                        sweep_points=s.itn_sweep_points,
                        examples=s.itn_examples,
                        images=n,
                        out=out,
                        **env.engine(),
                    ),
                    per_step=steps,
                )
            )
        elif name == "stn_benchmark":
            cases.append(stn_case(env))
        else:
            raise SystemExit(f"unknown analysis '{name}'; choose from {', '.join(ANALYSES)}")
    return cases


def stn_case(env: Env) -> Case:
    """``stn_benchmark`` on its own data: simple-cnn and STNs on rotated-digits."""
    from invariscope.data import create_dataset
    from invariscope.measure.stn import stn_benchmark
    from invariscope.models import create_model

    s = env.s
    archs, steps = list(s.stn_archs), s.stn_steps

    def run(out):
        test = create_dataset("rotated-digits", "test")
        train = create_dataset("rotated-digits", "train")
        return stn_benchmark(
            create_model("simple-cnn"),
            test,
            train,
            archs=archs,
            seeds=1,
            train_steps=steps,
            train_batch=s.stn_batch,
            images=env.n,
            out=out,
            **env.engine(),
        )

    return Case(
        "stn_benchmark",
        f"own data: {','.join(archs)}, {steps}x{s.stn_batch}",
        f"stn_benchmark: not an ImageNet-model analysis (it trains its own small classifiers); "
        f"simple-cnn + {', '.join(archs)} on rotated-digits, 1 seed, {steps} Adam steps x "
        f"{s.stn_batch}, {env.n} test images",
        "no floor: seconds per training step (archs x steps), evaluation included",
        0,
        run,
        floor_free=True,
        per_step=len(archs) * steps,
    )


# ------------------------------------------------------------------------ running


@dataclass
class Row:
    analysis: str
    model: str
    config: str
    seconds: float | None = None
    equivalents: int = 0
    ratio: float | None = None
    net_images: int | None = None
    hand_seconds: float | None = None
    hand_ratio: float | None = None
    execution: str = ""
    error: str = ""
    per_step: float | None = None
    goal: float | None = None
    hand_error: str = ""
    detail: str = ""
    counting: str = ""
    global_ratio: float | None = None
    floor_used: float | None = None

    def verdict(self) -> str:
        if self.error or self.goal is None or self.ratio is None:
            return ""
        ok = self.ratio <= self.goal
        if self.analysis == "lee" and self.hand_seconds is not None:
            ok = ok and self.seconds < self.hand_seconds  # same work, back to back
        return "OK" if ok else "MISSED"


def probe(env: Env) -> float:
    """Seconds per image of one forward pass at the floor's batch size and memory format
    (the floor again, now: the load of a shared machine changes during a run)."""
    x = env.x.repeat(math.ceil(env.floor_batch / len(env.x)), 1, 1, 1)[: env.floor_batch]
    set_format(env.model, env.floor_cl)
    try:
        with torch.inference_mode(), autocast(env.device, env.amp):
            x = as_format(x, env.floor_cl)
            sync(env.device)
            start = time.perf_counter()
            env.model(x)
            sync(env.device)
            return (time.perf_counter() - start) / len(x)
    finally:
        set_format(env.model, False)


def run_case(
    case: Case, env: Env, floor: float, *, hand: bool = True, bracket: bool = False
) -> Row:
    """Times the case's one-line call (and its hand loop), one row of the table.

    ``bracket``: the ratios use the mean of floor probes taken right before and after
    the call (and after the hand loop) instead of ``floor``; ``row.global_ratio`` keeps
    the ratio over ``floor``."""
    probes = [probe(env)] if bracket and not case.floor_free else []
    row = Row(
        case.name, env.key, case.config, equivalents=case.equivalents, goal=GOALS.get(case.name)
    )
    row.detail, row.counting = case.detail, case.counting
    out = env.out / f"{env.key}-{case.name}"
    models = [env.model]
    try:
        with counting(*models) as count:
            sync(env.device)
            start = time.perf_counter()
            result = case.run(out)
            sync(env.device)
            row.seconds = time.perf_counter() - start
        row.net_images = None if case.floor_free else count[0]
        row.execution = execution_of(getattr(result, "run_dir", None) or out)
    except Exception as error:  # a finding: print it in the table
        row.error = one_line(error)
        return row
    finally:
        set_format(env.model, False)
    if case.per_step:
        row.per_step = row.seconds / case.per_step
    if probes:
        probes.append(probe(env))
    if not case.floor_free and case.equivalents:
        row.global_ratio = row.seconds / (case.equivalents * floor)
        local = sum(probes) / len(probes) if probes else floor
        row.ratio = row.seconds / (case.equivalents * local)
        row.floor_used = local
    if hand and case.hand is not None:
        try:
            sync(env.device)
            start = time.perf_counter()
            done = case.hand()
            sync(env.device)
            row.hand_seconds = time.perf_counter() - start
            local = floor
            if probes:
                probes.append(probe(env))
                local = (probes[-2] + probes[-1]) / 2
            # the finite difference does 2 forwards per equivalent; the others 1
            row.hand_ratio = row.hand_seconds / (case.equivalents * local)
            expected = case.equivalents * (2 if case.name == "lee" else 1)
            if done != expected:
                row.hand_error = f"hand loop forwarded {done} images, expected {expected}"
        except Exception as error:
            row.hand_error = one_line(error)
    return row


def warm_up(names: list[str], out: Path) -> None:
    """Each analysis once on simple-cnn and 4 digits, untimed: imports and first-call costs
    (e.g. the forward-mode AD and Adam paths import ``torch._dynamo``, 1-2 s)."""
    from invariscope.data import create_dataset
    from invariscope.models import create_model

    torch.manual_seed(0)
    test, train = create_dataset("digits", "test"), create_dataset("digits", "train")
    x = torch.stack([test[i][0] for i in range(4)])
    model = create_model("simple-cnn").eval()
    env = Env("simple-cnn", model, test, train, x, settings(True, 4), torch.device("cpu"), out)
    env.floor_batch = 4
    for case in build_cases(env, [n for n in names if n != "stn_benchmark"]):
        try:
            case.run(out / f"warm-{case.name}")
        except Exception as error:
            print(f"  warm-up of {case.name} on simple-cnn failed: {one_line(error)}")
        if case.hand is not None and case.name != "alignment":  # its fc takes 28 px only
            try:
                case.hand()
            except Exception as error:
                print(f"  warm-up of the {case.name} hand loop failed: {one_line(error)}")


def load(key: str, device: torch.device) -> nn.Module:
    """The model ``key`` in eval mode on ``device`` (ResNet-50: random init, seed 0)."""
    from invariscope.models import create_model, load_model

    torch.manual_seed(0)
    if key == "efficientnet-lite0":
        model = load_model("efficientnet-lite0")
    elif key == "resnet50":
        model = create_model("resnet50", num_classes=1000)
    else:
        raise SystemExit(f"unknown model '{key}'; choose from {', '.join(MODELS)}")
    return model.eval().to(device)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    """The final table: one row per (analysis, model)."""
    header = (
        "analysis",
        "model",
        "config",
        "time s",
        "equiv",
        "net imgs",
        "x floor",
        "hand x floor",
        "vs hand",
        "goal",
        "s/step",
        "engine",
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append(
                (r.analysis, r.model, r.config, "FAILED", "", "", "", "", "", "", "", r.error)
            )
            continue
        ratio = _fmt(r.ratio, ".2f")
        goal = ""
        if r.goal is not None:
            goal = f"<= {r.goal:g}" + (" & < hand" if r.analysis == "lee" else "")
            goal += f" {r.verdict()}"
        hand = r.hand_error[:40] if r.hand_error else _fmt(r.hand_ratio, ".2f")
        vs_hand = "-"
        if r.hand_seconds and r.seconds is not None and not r.hand_error:
            vs_hand = f"{r.seconds / r.hand_seconds:.2f}"
        lines.append(
            (
                r.analysis,
                r.model,
                r.config,
                _fmt(r.seconds, ".1f"),
                str(r.equivalents or "-"),
                _fmt(r.net_images, "d"),
                ratio,
                hand,
                vs_hand,
                goal,
                _fmt(r.per_step, ".2f"),
                r.execution,
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="test photos (default 64)")
    parser.add_argument("--quick", action="store_true", help="8 photos, tiny configurations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--analyses", default=",".join(ANALYSES))
    parser.add_argument("--no-hand", action="store_true", help="skip the hand-written loops")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from invariscope.data import create_dataset
    from invariscope.engine.registry import list_analyses

    registered = [e.name for e in list_analyses()]
    names = [a.strip() for a in args.analyses.split(",") if a.strip()]
    missing = sorted(set(registered) - set(ANALYSES))
    images = 8 if args.quick and args.images == 64 else args.images
    s = settings(args.quick, images)
    device = torch.device("cpu")
    test = create_dataset("photos", "test")
    train = create_dataset("photos", "train")
    if images > len(test):
        raise SystemExit(f"--images {images}: the photos test split has {len(test)} images")
    x = torch.stack([test[i][0] for i in range(images)])
    sizes = (8,) if args.quick else FLOOR_SIZES
    print(
        f"bench_zoo: {images} photos (test split of {len(test)}, train {len(train)}), 224 px, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    if missing:
        print(f"registered analyses not benchmarked here: {', '.join(missing)}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        warm_up(names, Path(tmp))
        took = time.perf_counter() - start
        print(f"warm-up (every analysis on simple-cnn and 4 digits, untimed): {took:.0f} s")
        for i, key in enumerate([m.strip() for m in args.models.split(",") if m.strip()]):
            model = load(key, device)
            floors = forward_floor(model, x[:8], sizes, min_images=8 if args.quick else 32)
            (fmt, bs), floor = min(floors.items(), key=lambda kv: kv[1])
            print(f"\n{key}: forward floor, ms per image (inference_mode)")
            print(f"  {'batch':>5}  {'contiguous':>10}  {'channels_last':>13}")
            for b in sizes:
                c, cl = floors[("contiguous", b)] * 1e3, floors[("channels_last", b)] * 1e3
                print(f"  {b:>5}  {c:>10.1f}  {cl:>13.1f}")
            print(f"  floor: {floor * 1e3:.1f} ms per image ({fmt}, batch {bs})")
            env = Env(key, model, test, train, x, s, device, Path(tmp), floor_batch=bs)
            env.floor_cl = fmt == "channels_last"
            todo = [n for n in names if n != "stn_benchmark" or i == 0]  # stn: once
            for case in build_cases(env, todo):
                print(f"  {case.detail}", flush=True)
                print(f"    equivalents: {case.counting} = {case.equivalents or '-'}")
                row = run_case(case, env, floor, hand=not args.no_hand, bracket=True)
                if case.floor_free:
                    row.model = "simple-cnn"
                rows.append(row)
                if row.error:
                    print(f"    FAILED: {row.error}")
                else:
                    extra = ""
                    if row.ratio is not None:
                        extra = (
                            f", x floor {row.ratio:.2f} (floor probes around it "
                            f"{row.floor_used * 1e3:.1f} ms; x the floor above "
                            f"{row.global_ratio:.2f})"
                        )
                    hand = f", hand loop {row.hand_seconds:.1f} s" if row.hand_seconds else ""
                    print(f"    {row.seconds:.1f} s{extra}{hand}; engine {row.execution}")
                if row.hand_error:
                    print(f"    hand loop: {row.hand_error}")
            del model
    print(
        f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
        f"({os.cpu_count()} CPUs)\n"
    )
    print_table(rows)
    print(
        "\nx floor = time / (equiv x floor), the floor being re-measured right before and after"
        " the call (one pass at the floor's batch and format; mean of the two): the load of a"
        " shared machine drifts. hand x floor: the same for the hand loop (probes after the"
        " call and after the loop; LEE's finite difference does 2 forwards per equivalent)."
        " vs hand = the call's time / the hand loop's time (same work, run back to back)."
        " net imgs = images that entered the network (pre-flight, tuning and partial forwards"
        " included)."
    )
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
