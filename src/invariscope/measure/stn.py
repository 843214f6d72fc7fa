"""The STN benchmark: where to put a spatial transformer (Finnveden, Jansson & Lindeberg 2020).

Finnveden et al. ("Understanding when spatial transformer networks do not support
invariance, and what to do about it", ICPR 2020) prove that a purely spatial warp of
CNN feature maps cannot undo a rotation or scaling of the input, and test it on rotated,
translated and scaled digits: STN-C1 (the transformer after the first conv block)
barely rotates at all (table I: pose SD 47.2 deg against 23.2 for STN-C0 and 18.7 for
STN-SL1) and classifies worse (table II).

:class:`STNBenchmarkAnalysis` trains every architecture (``cnn``, ``C0``, ``C1``,
``DL1``, ``SL1``, any ``C<X>``/``DL<X>``/``SL<X>[x<n>]``, see
:mod:`invariscope.models.stn`) from a fresh seeded initialisation, with the same budget,
around the ARCHITECTURE of the given classifier (a registered name, rebuilt for the
data's image size; its weights are not used), and measures on the test images:

- the top-1 error (table II: mean and SD over seeds, in %);
- the pose statistics (table I): for every test image a fresh perturbation ``t`` of the
  data's family is drawn (seeded per image: angle uniform in ``[-90, 90]`` deg for
  ``rotated-*``, an integer shift in ``[-16, 16]^2`` px for ``translated-*``, a
  ``log2`` scale uniform in ``[-1, 2]`` for ``scaled-*``; the same ``t`` for every
  architecture and seed), the upright digit is rendered with it (with the sample's own
  clutter), the localisation net's transform ``P`` is read, and the final pose ``P @ t``
  is decomposed (:mod:`invariscope.measure.pose`); its within-class spread, averaged
  over classes, is the pose SD (for the angle the circular SD, so that a class
  canonicalised upside down counts as canonicalised; the paper's folded-``arctan`` SD is
  kept beside it as ``angle_sd_arctan_deg``);
- predicted against applied rotation angle (figure 6) with an orthogonal-regression line;
- example inputs and their warped versions (figure 5; for STN-CX the transform it
  applies to its feature map is drawn on the input, as the paper does).

Pixel sizes: the classifier of an input-warping STN on ``translated-*`` (60 px) takes
the 30 px output of the transformer (as in the paper); the plain CNN and STN-CX take
60 px. Every other set keeps its size. Training: Adam, cross-entropy, minibatches drawn
in shuffled epochs from a generator seeded with ``(run seed, seed)``: every
architecture of one seed sees the same images in the same order and starts from the
same classifier weights. ``augment``: each training image is rendered afresh, every
time it is drawn, with a new perturbation of the data's family (instead of the fixed
one stored in the data set).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from invariscope._deprecation import renamed_arguments
from invariscope.engine import (
    Analysis,
    AnalysisEntry,
    Batch,
    Part,
    PartOutput,
    part_id,
    register_analysis,
    uniform_per_image,
)
from invariscope.engine import run as run_analysis
from invariscope.errors import InvariscopeError, hint
from invariscope.measure._present import fmt
from invariscope.measure.pose import (
    forward_pose_matrix,
    perturbation_matrix,
    pose_components,
    pose_sd,
)
from invariscope.models.stn import FAMILIES, ArchSpec, as_chain, build_stn, conv_blocks, parse_arch

__all__ = [
    "STNBenchmarkAnalysis",
    "STNBenchmarkResult",
    "orthogonal_regression",
    "render_perturbed",
    "stn_benchmark",
]

PART_TABLES = ("training", "evaluation", "pose", "examples")
AGGREGATE_TABLES = (
    "error_table",
    "pose_table",
    "errors",
    "pose_sd",
    "angle_fit",
    "angle_points",
    "example_images",
)
#: Stream of the per-image pose perturbations (:func:`uniform_per_image`).
POSE_STREAM = 7
#: The fan-in at which the localisation head's output layer learns at the full
#: localisation learning rate (the fully connected head's width; see ``_param_groups``).
OUT_FAN_IN = 32

#: The mean training loss of the last this many steps is reported as ``final_loss``.
FINAL_STEPS = 10
#: At most this many (applied, predicted) angle pairs per architecture and seed are
#: kept for figure 6.
MAX_POINTS = 5000
#: The quantity table I reports for each kind of data set.
REPORTED = {"rotated": "angle_sd_deg", "translated": "distance_sd_px", "scaled": "log2_det_sd"}


def _seed(*keys: int) -> int:
    """A 63-bit seed from integers, independent of rank and order."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# ------------------------------------------------------------------ pure helpers


def draw_perturbations(kind: str, u: np.ndarray) -> dict[str, np.ndarray]:
    """Perturbations of family ``kind`` from uniform draws ``u`` ``[B, >= 2]`` in ``[0, 1)``.

    ``rotated``: ``angle_deg = 180 u0 - 90``; ``translated``: ``tx, ty`` integers uniform
    in ``[-16, 16]`` (``floor(33 u) - 16``); ``scaled``: ``log2_scale = 3 u0 - 1``. The
    other entries are zero. Returns ``{angle_deg, tx_px, ty_px, log2_scale}`` float64.
    """
    from invariscope.data.perturbed import LOG2_SCALE_RANGE, MAX_ANGLE_DEG, MAX_SHIFT_PX

    b = len(u)
    out = {k: np.zeros(b) for k in ("angle_deg", "tx_px", "ty_px", "log2_scale")}
    if kind == "rotated":
        out["angle_deg"] = (2 * u[:, 0] - 1) * MAX_ANGLE_DEG
    elif kind == "translated":
        span = 2 * MAX_SHIFT_PX + 1
        out["tx_px"] = np.floor(u[:, 0] * span) - MAX_SHIFT_PX
        out["ty_px"] = np.floor(u[:, 1] * span) - MAX_SHIFT_PX
    elif kind == "scaled":
        lo, hi = LOG2_SCALE_RANGE
        out["log2_scale"] = lo + (hi - lo) * u[:, 0]
    else:
        raise InvariscopeError(f"unknown perturbation '{kind}'")
    return out


def render_perturbed(dataset, indices: np.ndarray, t: dict[str, np.ndarray]) -> torch.Tensor:
    """The samples ``indices`` of a perturbed digit set rendered afresh with perturbations ``t``.

    Uses each sample's upright base digit and its own clutter (the set's ``clutter``),
    through the same functions that built the set (:mod:`invariscope.data.perturbed`).
    Returns ``[B, 1, S, S]`` in ``[0, 1]``.
    """
    from invariscope.data.perturbed import (
        crop_pieces,
        rotate_digits,
        scale_digits,
        translate_digits,
    )

    idx = np.asarray(indices, dtype=np.int64)
    digits = dataset.base.images[dataset.base_indices[torch.as_tensor(idx)]]
    pieces = centres = None
    clutter = getattr(dataset, "clutter", None)
    if clutter is not None:
        pieces = crop_pieces(dataset.base.images, clutter.sources[idx], clutter.crop_yx[idx])
        centres = torch.as_tensor(clutter.centre_yx[idx])
    if dataset.kind == "rotated":
        out = rotate_digits(digits, torch.as_tensor(t["angle_deg"], dtype=torch.float32))
    elif dataset.kind == "translated":
        out = translate_digits(
            digits,
            torch.as_tensor(t["tx_px"]).long(),
            torch.as_tensor(t["ty_px"]).long(),
            pieces,
            centres,
        )
    else:
        out = scale_digits(digits, torch.as_tensor(t["log2_scale"]), pieces, centres)
    return out.clamp_(0, 1)


def orthogonal_regression(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` of the total-least-squares line through points ``(x, y)``:
    the first principal axis of the centred points (NaN for fewer than 2 points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan"), float("nan")
    mx, my = x.mean(), y.mean()
    cov = np.cov(np.stack([x - mx, y - my]))
    values, vectors = np.linalg.eigh(cov)
    vx, vy = vectors[:, int(np.argmax(values))]
    if abs(vx) < 1e-12:
        return float("inf"), float("nan")
    slope = vy / vx
    return float(slope), float(my - slope * mx)


def parameter_count(model: nn.Module) -> int:
    """Learnable parameters (shared ones counted once)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


# --------------------------------------------------------------------- the analysis


class STNBenchmarkAnalysis(Analysis):
    """Train and compare STN architectures (Finnveden et al. 2020, tables I-II, figures 5-6).

    Model ``"model"``: the base classifier; only its ARCHITECTURE (registered name and
    its settings, preprocessing) is used, rebuilt for the data's image size with fresh
    seeded weights for every (architecture, seed). Data ``"data"``: the TEST split of a
    perturbed digit set (``rotated-``, ``translated-``, ``scaled-<base>``); the training
    split is given here.

    Parts:

    - stage 0, ``train-<a>-<s>`` (job): trains architecture ``a`` with seed ``s``; table
      ``training`` (parameter counts, final loss) and blob ``weights``;
    - stage 1, ``eval-<a>-<s>-<b>`` (test batch ``b``): table ``evaluation`` (correct
      count on the stored test images), for STNs table ``pose`` (one row per image:
      applied perturbation, predicted transform, final pose) and, for seed 0, table
      ``examples`` (figure 5: the first selected image of each of the first
      ``examples`` classes, rendered with its pose perturbation, and what the
      transformer makes of it; flattened pixels).

    Args:
        train_set: the training split of the same perturbed set.
        archs: architecture names (:func:`invariscope.models.stn.parse_arch`).
        seeds: number of seeds (training runs) per architecture.
        steps, train_batch, lr: Adam steps, images per step, learning rate (the same
            budget for every architecture).
        train_images: train on a seeded subset of this many training images (None: all).
        augment: render every training image afresh with a new perturbation.
        family: the transform family the localisation nets predict.
        examples: images per architecture kept for figure 5.
        loc_lr_scale: the localisation nets' own parameters learn at ``lr * loc_lr_scale``
            (SLX's shared blocks count as the classifier's). The classifier can learn the
            rotated digits by itself long before the localisation net is pushed to undo
            the rotation; a faster localisation net (3, with ``family="rotation"``: the
            command's ``--quick`` preset on rotated sets) wins that race at 800 steps.
            The head's output layer learns at a further ``min(1, 32 / fan_in)``
            (see ``_param_groups``).
    """

    name = "stn_benchmark"
    version = 2  # 2: the output layer's fan-in-scaled rate (changes 60 / 112 px training)
    grad = True
    models = ("model",)
    classifier = False
    part_tables = PART_TABLES
    aggregate_tables = AGGREGATE_TABLES

    def __init__(
        self,
        train_set: Dataset,
        archs: Sequence[str] = ("cnn", "C0", "C1", "DL1", "SL1"),
        *,
        seeds: int = 3,
        steps: int = 2000,
        train_batch: int = 64,
        lr: float = 1e-3,
        train_images: int | None = None,
        augment: bool = False,
        family: str = "affine",
        examples: int = 6,
        loc_lr_scale: float = 1.0,
    ) -> None:
        if train_set is None:
            raise InvariscopeError(
                "the STN benchmark needs a training split; pass "
                + hint("train_set=...", "--data with a train split")
            )
        self.train_set = train_set
        if isinstance(archs, str):
            archs = [a for a in archs.split(",") if a.strip()]
        if not archs:
            raise InvariscopeError(
                f"{hint('archs', '--archs')} is empty; name at least one, e.g. cnn,C0,C1"
            )
        self.specs = [parse_arch(a) for a in archs]
        names = [s.name for s in self.specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InvariscopeError(f"architecture {', '.join(dup)} is listed twice in --archs")
        self.seeds = self._int("seeds", seeds, 1)
        self.steps = self._int("train-steps", steps, 1)
        self.train_batch = self._int("train-batch", train_batch, 1)
        self.train_images = (
            None if train_images is None else self._int("train-images", train_images, 1)
        )
        self.examples = self._int("examples", examples, 0)
        if (
            isinstance(lr, bool)
            or not isinstance(lr, int | float)
            or not (lr > 0 and math.isfinite(lr))
        ):
            raise InvariscopeError(f"{hint('lr', '--lr')} must be a positive number, got {lr!r}")
        self.lr = float(lr)
        if (
            isinstance(loc_lr_scale, bool)
            or not isinstance(loc_lr_scale, int | float)
            or not (loc_lr_scale > 0 and math.isfinite(loc_lr_scale))
        ):
            raise InvariscopeError(
                f"{hint('loc_lr_scale', '--loc-lr-scale')} must be a positive number, "
                f"got {loc_lr_scale!r}"
            )
        self.loc_lr_scale = float(loc_lr_scale)
        if family not in FAMILIES:
            raise InvariscopeError(
                f"unknown transform family '{family}'; use one of {', '.join(FAMILIES)}"
            )
        self.family = family
        self.augment = bool(augment)
        self.kind: str | None = None
        self.arch_model: dict[str, Any] = {}
        self._cache: dict[tuple[int, int], nn.Module] = {}

    @staticmethod
    def _int(name: str, value: Any, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise InvariscopeError(
                f"{hint(name.replace('-', '_'), '--' + name)} must be an integer >= {low}, "
                f"got {value!r}"
            )
        return int(value)

    # -- checks
    def check(self, ctx) -> None:
        data = ctx.datasets["data"]
        kind = getattr(data, "kind", None)
        if kind not in REPORTED or getattr(data, "base", None) is None:
            raise InvariscopeError(
                f"the STN benchmark needs a perturbed digit set (rotated-, translated- or "
                f"scaled-<base>, e.g. rotated-glyphs), got '{getattr(data, 'name', data)}'"
            )
        train = self.train_set
        if getattr(train, "kind", None) != kind or getattr(train, "base", None) is None:
            raise InvariscopeError(
                f"the training split must be the same perturbed set as the test data "
                f"({kind}-...), got '{getattr(train, 'name', train)}'"
            )
        self.kind = kind
        image = torch.as_tensor(data[int(ctx.indices["data"][0])][0])
        c, h, w = image.shape
        if tuple(torch.as_tensor(train[0][0]).shape) != (c, h, w):
            raise InvariscopeError("training and test images differ in shape; use one data set")
        base = ctx.models["model"]
        arch = getattr(base, "arch", None)
        from invariscope.models import list_models, model_info

        if not isinstance(arch, str) or arch not in list_models():
            raise InvariscopeError(
                "the STN benchmark rebuilds the classifier's architecture for every run, so "
                "--model must be a registered architecture or a checkpoint of one "
                f"({', '.join(list_models())}), got {type(base).__name__} "
                f"(arch {arch!r})"
            )
        channels = int(base.input_size[0])
        from invariscope.models import model_info as _info

        if channels != c and "in_channels" not in _info(arch).defaults:
            raise InvariscopeError(
                f"the model takes {channels} channel(s) but the data has {c} (instead of "
                f"{channels}); use a {c}-channel architecture"
            )
        accepted = set(model_info(arch).defaults)
        if "image_size" not in accepted:
            raise InvariscopeError(
                f"architecture '{arch}' cannot be built for another image size (no "
                "image_size setting)"
            )
        self.arch_model = {
            "arch": arch,
            "kwargs": {
                k: v
                for k, v in dict(base.arch_kwargs).items()
                if k not in ("in_channels", "image_size", "num_classes")
            },
            "mean": [float(v) for v in base.mean.tolist()],
            "std": [float(v) for v in base.std.tolist()],
        }
        self.input_size = (int(c), int(h), int(w))
        # every architecture must be buildable (X within the blocks, sizes that fit)
        probe_net = self._classifier(h, ctx.num_classes, 0).net
        if any(s.name not in ("cnn", "C0") for s in self.specs):
            blocks = len(conv_blocks(probe_net))  # one line if the net is not a chain
        else:
            blocks = len(conv_blocks(probe_net)) if isinstance(probe_net, nn.Sequential) else 0
        self.specs = [parse_arch(s.name, blocks) for s in self.specs]
        for a, spec in enumerate(self.specs):
            try:
                self._build(a, 0, ctx.num_classes, ctx.seed)
            except InvariscopeError as err:
                raise InvariscopeError(f"architecture {spec.name}: {err}") from None
            except RuntimeError as err:
                message = " ".join(str(err).split())
                raise InvariscopeError(
                    f"architecture {spec.name} does not fit {h}x{w} images ({message})"
                ) from None
        n = len(train) if self.train_images is None else self.train_images
        if self.train_images is not None and self.train_images > len(train):
            raise InvariscopeError(
                f"{hint('train_images', '--train-images')} is {self.train_images} but the "
                f"training split has {len(train)} images"
            )
        if n < 1:
            raise InvariscopeError("the training split is empty")

    # -- building models
    def _classifier(self, size: int, num_classes: int, seed: int) -> nn.Module:
        from invariscope.models import create_model

        spec = self.arch_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(
                spec["arch"],
                **spec["kwargs"],
                in_channels=self.input_size[0],
                image_size=size,
                num_classes=num_classes,
            )
        mean, std = spec["mean"], spec["std"]
        if len(mean) != self.input_size[0]:  # e.g. an RGB architecture rebuilt for digits
            mean = [sum(mean) / len(mean)] * self.input_size[0]
            std = [sum(std) / len(std)] * self.input_size[0]
        model.set_preprocessing(mean=mean, std=std)
        return as_chain(model)

    def _output_size(self, spec: ArchSpec) -> int:
        h = self.input_size[1]
        return h // 2 if self.kind == "translated" and spec.warps_input else h

    def _build(self, a: int, s: int, num_classes: int, run_seed: int) -> nn.Module:
        spec = self.specs[a]
        size = self._output_size(spec)
        classifier = self._classifier(size, num_classes, _seed(run_seed, s, 0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(run_seed, s, 1000 + a))
            model = build_stn(
                classifier,
                spec,
                family=self.family,
                input_size=self.input_size,
                output_size=size if spec.warps_input else None,
            )
        return model

    def config(self) -> dict[str, Any]:
        return {
            "archs": [s.name for s in self.specs],
            "seeds": self.seeds,
            "steps": self.steps,
            "train_batch": self.train_batch,
            "lr": self.lr,
            "loc_lr_scale": self.loc_lr_scale,
            "train_images": self.train_images,
            "augment": self.augment,
            "family": self.family,
            "examples": self.examples,
            "base_architecture": self.arch_model,
            "train_data": {
                "name": getattr(self.train_set, "name", type(self.train_set).__name__),
                "fingerprint": getattr(self.train_set, "fingerprint", None),
                "size": len(self.train_set),
            },
            "pose_stream": POSE_STREAM,
            "optimiser": "adam",
        }

    def work(self, ctx) -> int:
        n = len(ctx.indices["data"])
        runs = len(self.specs) * self.seeds
        return runs * (3 * self.steps * self.train_batch + 2 * n)

    def plan(self, ctx) -> list[Part]:
        runs = [(a, s) for a in range(len(self.specs)) for s in range(self.seeds)]
        parts = [Part(part_id("train", a, s), stage=0, key=(a, s)) for a, s in runs]
        parts += [
            Part(part_id("eval", a, s, b), stage=1, batch=b, key=(a, s))
            for a, s in runs
            for b in range(len(ctx.batches["data"]))
        ]
        return parts

    # -- computing
    def compute(self, part: Part, ctx, batch: Batch | None) -> dict[str, pd.DataFrame] | PartOutput:
        a, s = part.key
        if part.batch is None:
            return self._train(ctx, a, s)
        with torch.no_grad():
            return self._evaluate(ctx, a, s, batch)

    def _train_order(self, ctx, s: int) -> list[np.ndarray]:
        n_all = len(self.train_set)
        rng = np.random.default_rng(_seed(ctx.seed, s, 101))
        if self.train_images is None:
            pool = np.arange(n_all)
        else:
            pool = np.sort(
                np.random.default_rng(_seed(ctx.seed, 99)).permutation(n_all)[: self.train_images]
            )
        total = self.steps * self.train_batch
        order: list[np.ndarray] = []
        count = 0
        while count < total:
            order.append(pool[rng.permutation(len(pool))])
            count += len(pool)
        flat = np.concatenate(order)[:total]
        b = self.train_batch
        return [flat[i * b : (i + 1) * b] for i in range(self.steps)]

    def _train_images(
        self, ctx, s: int, step: int, idx: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train_set
        y = data.labels[torch.as_tensor(idx)].long()
        if self.augment:
            u = uniform_per_image(_seed(ctx.seed, s, 202), np.arange(len(idx)) + step * len(idx), 2)
            x = render_perturbed(data, idx, draw_perturbations(self.kind, u))
        else:
            x = data.images[torch.as_tensor(idx)]
        return x, y

    def _param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Adam groups: the localisation net's own parameters at ``lr * loc_lr_scale``
        (SLX's shared blocks belong to the classifier), everything else at ``lr``.

        The head's last linear layer (the one that outputs theta) learns at a further
        ``min(1, OUT_FAN_IN / fan_in)``: under Adam every weight moves by about ``lr`` per
        step whatever its gradient's size, so theta moves by about ``lr * fan_in`` times
        the features' size. The fully connected head (fan-in 32) is unchanged; the
        convolutional head of 60 / 112 px inputs (fan-in 2880 / 12500) would otherwise
        throw theta off the image within a few steps (an all-black warp, chance error).
        """
        loc_params = getattr(model, "loc_parameters", None)
        loc = loc_params() if loc_params is not None else []
        ids = {id(p) for p in loc}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest, "lr": self.lr}]
        if not loc:
            return groups
        out = getattr(getattr(model, "head", None), "out", None)
        factor = min(1.0, OUT_FAN_IN / out.in_features) if isinstance(out, nn.Linear) else 1.0
        if factor < 1.0:
            out_ids = {id(p) for p in out.parameters()}
            groups.append(
                {
                    "params": [p for p in loc if id(p) not in out_ids],
                    "lr": self.lr * self.loc_lr_scale,
                }
            )
            groups.append(
                {"params": list(out.parameters()), "lr": self.lr * self.loc_lr_scale * factor}
            )
        else:
            groups.append({"params": loc, "lr": self.lr * self.loc_lr_scale})
        return groups

    def _train(self, ctx, a: int, s: int) -> PartOutput:
        from invariscope.engine.execution import deterministic_training, optimiser_step

        spec = self.specs[a]
        model = self._build(a, s, ctx.num_classes, ctx.seed).to(ctx.device)
        opt = torch.optim.Adam(self._param_groups(model), lr=self.lr)
        losses: list[float] = []
        with deterministic_training(), torch.enable_grad():
            model.train()
            for step, idx in enumerate(self._train_order(ctx, s)):
                x, y = self._train_images(ctx, s, step, idx)
                x, y = x.to(ctx.device), y.to(ctx.device)
                loss = F.cross_entropy(model(x), y)
                losses.append(optimiser_step(opt, loss, f"{spec.label} (seed {s}) at step {step}"))
        model.eval()
        loc = model.loc_parameters() if spec.variant is not None else []
        table = pd.DataFrame(
            {
                "arch": [spec.name],
                "label": [spec.label],
                "seed": np.array([s], dtype=np.int64),
                "order": np.array([a], dtype=np.int64),
                "params": np.array([parameter_count(model)], dtype=np.int64),
                "loc_params": np.array([sum(p.numel() for p in loc)], dtype=np.int64),
                "steps": np.array([self.steps], dtype=np.int64),
                "final_loss": np.array([float(np.mean(losses[-FINAL_STEPS:]))], dtype=np.float64),
            }
        )
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        return PartOutput({"training": table}, {"weights": buffer.getvalue()})

    def _trained(self, ctx, a: int, s: int) -> nn.Module:
        key = (a, s)
        if key not in self._cache:
            model = self._build(a, s, ctx.num_classes, ctx.seed)
            blob = ctx.results.read_blob(part_id("train", a, s), "weights")
            model.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
            self._cache[key] = model.to(ctx.device).eval()
        return self._cache[key]

    def _evaluate(self, ctx, a: int, s: int, batch: Batch) -> dict[str, pd.DataFrame]:
        spec = self.specs[a]
        model = self._trained(ctx, a, s)
        n = int(batch.x.shape[0])
        correct = int((model(batch.x).argmax(1) == batch.y).sum())
        tables = {
            "evaluation": pd.DataFrame(
                {
                    "arch": [spec.name],
                    "seed": np.array([s], dtype=np.int64),
                    "batch": np.array([batch.number], dtype=np.int64),
                    "n": np.array([n], dtype=np.int64),
                    "correct": np.array([correct], dtype=np.int64),
                }
            )
        }
        if spec.variant is None:
            return tables
        idx = batch.index.numpy()
        t = draw_perturbations(self.kind, uniform_per_image(ctx.seed, idx, 2, POSE_STREAM))
        x = render_perturbed(ctx.datasets["data"], idx, t).to(ctx.device)
        theta = model.transform(x)
        H, W = x.shape[-2:]
        predicted = forward_pose_matrix(theta.cpu(), H, W)
        applied = perturbation_matrix(
            torch.as_tensor(t["angle_deg"]),
            torch.as_tensor(t["tx_px"]),
            torch.as_tensor(t["ty_px"]),
            torch.as_tensor(t["log2_scale"]),
        )
        a3 = predicted[:, :, :2]
        final = torch.cat([a3 @ applied[:, :, :2], a3 @ applied[:, :, 2:] + predicted[:, :, 2:]], 2)
        p, f = pose_components(predicted), pose_components(final)
        tables["pose"] = pd.DataFrame(
            {
                "arch": spec.name,
                "seed": np.full(n, s, dtype=np.int64),
                "index": idx.astype(np.int64),
                "label": batch.y.cpu().numpy().astype(np.int64),
                "applied_angle_deg": t["angle_deg"],
                "applied_tx_px": t["tx_px"],
                "applied_ty_px": t["ty_px"],
                "applied_log2_scale": t["log2_scale"],
                "predicted_angle_deg": p["angle_deg"],
                "predicted_tx_px": p["tx_px"],
                "predicted_ty_px": p["ty_px"],
                "predicted_log2_det": p["log2_det"],
                "angle_deg": f["angle_deg"],
                "tx_px": f["tx_px"],
                "ty_px": f["ty_px"],
                "log2_det": f["log2_det"],
            }
        )
        chosen = self._example_indices(ctx) if s == 0 else []
        picks = [(chosen.index(int(j)), i) for i, j in enumerate(idx) if int(j) in chosen]
        if picks:
            rows_at = torch.as_tensor([i for _, i in picks])
            warped = _warp_for_display(model, x[rows_at], theta[rows_at])
            rows = []
            for k, (number, i) in enumerate(picks):
                for what, img in (("input", x[i]), ("warped", warped[k])):
                    rows.append(
                        {
                            "arch": spec.name,
                            "example": number,
                            "image": what,
                            "index": int(idx[i]),
                            "height": int(img.shape[-2]),
                            "width": int(img.shape[-1]),
                            "pixels": img[0].detach().cpu().numpy().astype(np.float32).ravel(),
                        }
                    )
            tables["examples"] = pd.DataFrame(rows).astype(
                {"example": np.int64, "index": np.int64, "height": np.int64, "width": np.int64}
            )
        return tables

    def _example_indices(self, ctx) -> list[int]:
        """Figure 5's images: the first selected image of each class, for the first
        ``examples`` classes (in the order of the selection)."""
        if not self.examples:
            return []
        selected = np.asarray(ctx.indices["data"])
        labels = ctx.datasets["data"].labels[torch.as_tensor(selected)].numpy()
        _, first = np.unique(labels, return_index=True)
        return [int(selected[i]) for i in sorted(first)[: self.examples]]

    # -- aggregating
    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        r = ctx.results
        order = {s.name: i for i, s in enumerate(self.specs)}
        labels = {s.name: s.label for s in self.specs}
        training = r.read_table("training")
        ev = (
            r.read_table("evaluation")
            .groupby(["arch", "seed"], as_index=False)[["n", "correct"]]
            .sum()
        )
        ev = ev.merge(
            training[["arch", "seed", "params", "loc_params", "final_loss"]], on=["arch", "seed"]
        )
        ev["error_pct"] = 100.0 * (1.0 - ev["correct"] / ev["n"])
        ev["order"] = ev["arch"].map(order).astype(np.int64)
        ev = ev.sort_values(["order", "seed"]).reset_index(drop=True)
        errors = ev[
            ["arch", "seed", "n", "correct", "error_pct", "params", "loc_params", "final_loss"]
        ]
        rows = []
        for name, g in ev.groupby("arch", sort=False):
            rows.append(
                {
                    "arch": name,
                    "label": labels[name],
                    "data": self.kind,
                    "error_mean_pct": float(g["error_pct"].mean()),
                    "error_std_pct": float(g["error_pct"].std(ddof=1))
                    if len(g) > 1
                    else float("nan"),
                    "seeds": int(len(g)),
                    "params": int(g["params"].iloc[0]),
                    "loc_params": int(g["loc_params"].iloc[0]),
                    "n": int(g["n"].iloc[0]),
                }
            )
        out: dict[str, pd.DataFrame] = {
            "errors": errors.reset_index(drop=True),
            "error_table": pd.DataFrame(rows).astype(
                {"seeds": np.int64, "params": np.int64, "loc_params": np.int64, "n": np.int64}
            ),
        }
        pose = r.read_table("pose") if "pose" in r.tables() else pd.DataFrame()
        if len(pose):
            per_seed = pose_sd(pose, ["arch", "seed"])
            per_seed["order"] = per_seed["arch"].map(order).astype(np.int64)
            per_seed = per_seed.sort_values(["order", "seed"]).reset_index(drop=True)
            out["pose_sd"] = per_seed.drop(columns="order")
            metric = REPORTED[self.kind]
            # what a transformer that leaves its input alone scores: the pose SD of the
            # applied perturbations themselves (the same for every architecture and seed)
            first = pose[
                (pose["arch"] == pose["arch"].iloc[0]) & (pose["seed"] == pose["seed"].iloc[0])
            ]
            applied = pd.DataFrame(
                {
                    "label": first["label"],
                    "angle_deg": first["applied_angle_deg"],
                    "tx_px": first["applied_tx_px"],
                    "ty_px": first["applied_ty_px"],
                    "log2_det": 2.0 * first["applied_log2_scale"],
                }
            )
            unaligned = float(pose_sd(applied).iloc[0][metric])
            rows = []
            for name, g in per_seed.groupby("arch", sort=False):
                rows.append(
                    {
                        "arch": name,
                        "label": labels[name],
                        "data": self.kind,
                        "measure": metric,
                        "pose_sd": float(g[metric].mean()),
                        "pose_sd_std": float(g[metric].std(ddof=1)) if len(g) > 1 else float("nan"),
                        "angle_sd_deg": float(g["angle_sd_deg"].mean()),
                        "angle_sd_arctan_deg": float(g["angle_sd_arctan_deg"].mean()),
                        "distance_sd_px": float(g["distance_sd_px"].mean()),
                        "log2_det_sd": float(g["log2_det_sd"].mean()),
                        "unaligned_pose_sd": unaligned,
                        "seeds": int(len(g)),
                        "n": int((pose["arch"] == name).sum() // len(g)),
                    }
                )
            out["pose_table"] = pd.DataFrame(rows).astype({"seeds": np.int64, "n": np.int64})
            fits, points = [], []
            if self.kind == "rotated":
                for (name, seed), g in pose.groupby(["arch", "seed"], sort=False):
                    slope, intercept = orthogonal_regression(
                        g["applied_angle_deg"], g["predicted_angle_deg"]
                    )
                    fits.append(
                        {
                            "arch": name,
                            "label": labels[name],
                            "seed": int(seed),
                            "slope": slope,
                            "intercept": intercept,
                            "n": int(len(g)),
                        }
                    )
                    keep = g.sort_values("index").head(MAX_POINTS)
                    points.append(
                        keep[["arch", "seed", "index", "applied_angle_deg", "predicted_angle_deg"]]
                    )
            out["angle_fit"] = (
                pd.DataFrame(fits).astype({"seed": np.int64, "n": np.int64})
                if fits
                else pd.DataFrame(
                    {c: [] for c in ("arch", "label", "seed", "slope", "intercept", "n")}
                )
            )
            out["angle_points"] = (
                pd.concat(points, ignore_index=True)
                if points
                else pd.DataFrame(
                    {
                        c: []
                        for c in (
                            "arch",
                            "seed",
                            "index",
                            "applied_angle_deg",
                            "predicted_angle_deg",
                        )
                    }
                )
            )
        if "examples" in r.tables():
            ex = r.read_table("examples").copy()
            ex = ex.assign(
                order=ex["arch"].map(order).astype(np.int64), label=ex["arch"].map(labels)
            )
            out["example_images"] = ex.sort_values(["order", "example", "image"]).reset_index(
                drop=True
            )
        return out

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        from invariscope.measure.aggregate import wilson_interval

        errors = aggregates.get("error_table")
        if errors is None or not len(errors):
            return super().headline(summary, aggregates, config)
        parts = []
        for r in errors.itertuples(index=False):
            if r.seeds > 1 and math.isfinite(r.error_std_pct):
                parts.append(
                    f"{r.label} {r.error_mean_pct:.1f}% (SD {r.error_std_pct:.1f} over {r.seeds} seeds)"
                )
            else:
                k = round(r.error_mean_pct * r.n / 100)
                lo, hi = wilson_interval(k, r.n)
                parts.append(
                    f"{r.label} {r.error_mean_pct:.1f}% [{100 * float(lo):.1f}, {100 * float(hi):.1f}]"
                )
        data = errors["data"].iloc[0] if "data" in errors.columns else summary.get("data")
        text = (
            f"Top-1 test error on {data} data ({summary.get('num_images')} images, 95% "
            "intervals): " + ", ".join(parts) + "."
        )
        pose = aggregates.get("pose_table") if "pose_table" in aggregates else None
        if pose is not None and len(pose) and pose["pose_sd"].notna().any():
            measure = str(pose["measure"].iloc[0])
            unaligned = pose["unaligned_pose_sd"].iloc[0]
            text += (
                f" Pose spread after the transformer ({measure.replace('_sd_deg', ' SD, degrees').replace('_', ' ')}, lower = more "
                "of the pose undone): "
                + ", ".join(f"{r.label} {fmt(r.pose_sd)}" for r in pose.itertuples(index=False))
                + f", against {fmt(unaligned)} without alignment."
            )
        return text

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        out: dict[str, pd.DataFrame] = {}
        errors = aggregates.get("error_table")
        if errors is not None and len(errors):
            out["Test error per architecture"] = pd.DataFrame(
                {
                    "data": errors["data"].to_numpy(),
                    "top-1 error (%)": errors["error_mean_pct"].to_numpy(),
                    "SD over seeds (%)": errors["error_std_pct"].to_numpy(),
                    "seeds": errors["seeds"].to_numpy(),
                    "parameters": errors["params"].to_numpy(),
                    "localisation parameters": errors["loc_params"].to_numpy(),
                },
                index=pd.Index(errors["label"].to_numpy(), name="architecture"),
            )
        pose = aggregates.get("pose_table") if "pose_table" in aggregates else None
        if pose is not None and len(pose):
            out["Pose spread of the transformed features within a class"] = pd.DataFrame(
                {
                    "angle SD (degrees)": pose["angle_sd_deg"].to_numpy(),
                    "angle SD, arctan (degrees)": pose["angle_sd_arctan_deg"].to_numpy(),
                    "distance SD (pixels)": pose["distance_sd_px"].to_numpy(),
                    "log2 det SD": pose["log2_det_sd"].to_numpy(),
                    "unaligned pose SD": pose["unaligned_pose_sd"].to_numpy(),
                },
                index=pd.Index(pose["label"].to_numpy(), name="architecture"),
            )
        return out

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        result: dict[str, Any] = {"data": self.kind, "num_images": int(len(ctx.indices["data"]))}
        for row in aggregates["error_table"].itertuples(index=False):
            result[f"error_pct_{row.arch}"] = round(float(row.error_mean_pct), 4)
        if "pose_table" in aggregates:
            for row in aggregates["pose_table"].itertuples(index=False):
                # NaN (no class with two test images) is stored as null
                sd = float(row.pose_sd)
                result[f"pose_sd_{row.arch}"] = round(sd, 4) if math.isfinite(sd) else None
        return result


def _warp_for_display(model: nn.Module, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """What the transformer makes of ``x``: the warped input for input-warping STNs; for
    STN-CX its feature-map transform applied to the input (an illustration, as in the
    paper's figure 5)."""
    from invariscope.models.stn import warp_theta

    spec = model.spec
    size = model.output_size if spec.warps_input else None
    return warp_theta(x, theta, size)


# ------------------------------------------------------------------------- Python API


@dataclass
class STNBenchmarkResult:
    """What :func:`stn_benchmark` returns: table II (``error_table``), table I
    (``pose_table``; None without STNs), all aggregate tables and the run directory."""

    error_table: pd.DataFrame
    pose_table: pd.DataFrame | None
    tables: dict[str, pd.DataFrame]
    run_dir: Path | None = None


@renamed_arguments(steps="train_steps", augment="fresh_perturbations")
def stn_benchmark(
    model: nn.Module,
    test_set: Dataset,
    train_set: Dataset,
    *,
    archs: Sequence[str] = ("cnn", "C0", "C1", "DL1", "SL1"),
    seeds: int = 3,
    train_steps: int = 2000,
    train_batch: int = 64,
    lr: float = 1e-3,
    train_images: int | None = None,
    fresh_perturbations: bool = False,
    family: str = "affine",
    loc_lr_scale: float = 1.0,
    examples: int = 6,
    images: int | Sequence[int] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    **engine: Any,
) -> STNBenchmarkResult:
    """Train and compare STN architectures around ``model``'s architecture.

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    Runs :class:`STNBenchmarkAnalysis` on the engine (resumable with ``out``).

    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> r = stn_benchmark(create_model("simple-cnn"), create_dataset("rotated-digits", "test"),
    ...                   create_dataset("rotated-digits", "train"), archs=["cnn", "C0"],
    ...                   seeds=1, train_steps=2, train_batch=8, images=8, progress=False)
    >>> list(r.error_table["arch"])
    ['cnn', 'C0']
    """
    analysis = STNBenchmarkAnalysis(
        train_set,
        archs,
        seeds=seeds,
        steps=train_steps,
        train_batch=train_batch,
        lr=lr,
        train_images=train_images,
        augment=fresh_perturbations,
        family=family,
        examples=examples,
        loc_lr_scale=loc_lr_scale,
    )
    result = run_analysis(
        analysis,
        {"model": model},
        {"data": test_set},
        images=images,
        batch_size=batch_size,
        seed=seed,
        device=device,
        out=out,
        overwrite=overwrite,
        figures=figures,
        **engine,
    )
    aggregates = dict(result.aggregates)
    return STNBenchmarkResult(
        aggregates["error_table"], aggregates.get("pose_table"), aggregates, result.run_dir
    )


_CONFORMANCE = (
    "--data",
    "rotated-digits",
    "--archs",
    "cnn,C0,C1",
    "--seeds",
    "1",
    "--quick",
    "--train-images",
    "64",
    "--train-steps",
    "2",
    "--images",
    "16",
    "--batch-size",
    "8",
)

register_analysis(
    AnalysisEntry(
        name="stn_benchmark",
        analysis=STNBenchmarkAnalysis,
        title="Spatial transformer networks at any depth",
        paper=(
            "Finnveden, Jansson & Lindeberg 2020, Understanding when spatial transformer "
            "networks do not support invariance, and what to do about it"
        ),
        about=(
            "Every architecture (a plain CNN, STNs whose transformer warps the input: C0, "
            "DLX, SLX, or a feature map after X conv blocks: CX) is trained from a fresh "
            "seeded start with the same budget. Table II is the test error (mean and SD "
            "over seeds); table I is the within-class SD of the final pose of freshly "
            "perturbed digits after the transformer, averaged over classes: a transformer "
            "that undoes the perturbation leaves a small SD, and the theory says a warp of "
            "feature maps (CX) cannot undo rotations or scalings."
        ),
        command="stn-benchmark",
        report_tables=("error_table", "pose_table", "angle_fit"),
        figures="invariscope.plots.stn:render_stn_run",
        demo="invariscope.demo:stn_stage",
        conformance=_CONFORMANCE,
        figure_order=("stn_errors", "stn_pose", "stn_angles", "stn_examples"),
        bad_inputs=(
            (("--data", "rotated-digits", "--archs", "cnn,XL3"), "unknown architecture"),
            (("--data", "rotated-digits", "--archs", "C5"), "beyond"),
            (("--data", "digits", "--archs", "C0"), "perturbed digit set"),
            (("--data", "rotated-digits", "--train-steps", "0"), "train-steps"),
            (("--data", "rotated-digits", "--archs", "C1x2"), "iterations"),
        ),
    )
)
