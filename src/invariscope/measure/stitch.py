"""Stitching layers and representation similarity between two networks' layers.

Lenc & Vedaldi (2018, section 4.2 and 6) call a representation ``phi`` *covering*
``phi'`` when a map ``E`` exists with ``phi'(x) ~ E phi(x)``, and two representations
*equivalent* when each covers the other. They test it by learning a **stitching
layer** ``E`` from network A's layer ``i`` to network B's layer ``j`` and measuring the
top-1 error of the stitched network::

    psi_B,j o E o phi_A,i

where ``phi_A,i`` is A up to layer ``i`` and ``psi_B,j`` is B after layer ``j``. Only
``E`` learns, with the task loss (cross-entropy) through B's frozen remainder; A and B
stay frozen in eval mode. A layer stitched to itself in the same network has the
identity as its ideal ``E``; like the paper, ``E`` starts from random weights all the
same, so the diagonal measures what the optimisation recovers.

This module implements, generically for any two ``nn.Module`` classifiers of the same
data (layers named as in ``Classifier.layer_names`` or by module path):

- ``E`` (:class:`StitchingLayer`): for 4-D layers an ``m x m`` convolution (``m`` odd,
  default 1, padding ``m // 2``) from A's ``C_A`` to B's ``C_B`` channels, preceded by
  bilinear resampling (``F.interpolate``, ``align_corners=False``) to B's spatial size
  when the resolutions differ (the paper uses nearest neighbours to down-sample); for
  2-D (flattened, e.g. ``fc``) layers a linear map. Only pairs where both layers are
  4-D or both are 2-D are stitched; other pairs are skipped (they still get a CKA);
- ``phi_A,i``: A's forward pass, stopped right after layer ``i`` by its capture hook;
- ``psi_B,j``: B's full forward pass with a forward hook on layer ``j`` that *returns*
  ``E(phi_A,i(x))`` (a forward hook's return value replaces the module's output). So
  any architecture works, at a cost: B's layers before ``j`` still run (without
  gradients) and their output is discarded;
- linear CKA (Kornblith et al. 2019, :mod:`invariscope.measure.cka`) between every
  layer of A and every layer of B, streamed over the test batches with the unbiased
  HSIC estimator (Nguyen et al. 2021), from ONE forward pass of each network per batch.

Everything runs in float32 on the run's device (``amp`` and the forward batch of the
engine do not apply to these passes).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
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
from invariscope.data.batches import epoch_batches, iter_index_batches
from invariscope.engine import (
    Analysis,
    AnalysisEntry,
    Batch,
    Part,
    PartOutput,
    part_id,
    register_analysis,
)
from invariscope.engine import run as run_analysis
from invariscope.engine.execution import check_logits, optimiser_step
from invariscope.errors import InvariscopeError, hint
from invariscope.measure._present import ci, fmt
from invariscope.measure._present import pivot as tidy_pivot
from invariscope.measure.aggregate import wilson_interval
from invariscope.measure.cka import MIN_IMAGES, cka_table, hsic_table
from invariscope.models.capture import register_layer_hook, resolve_layer
from invariscope.models.classifier import default_layer_names

__all__ = [
    "StitchAnalysis",
    "StitchResult",
    "StitchingLayer",
    "stitch",
    "stitched_logits",
]

ROLES = ("model", "model_b")
PART_TABLES = ("hsic", "base", "stitch")
AGGREGATE_TABLES = ("cka", "stitch_error", "models", "layers")
#: The reported ``final_loss`` is the mean training loss of the last this many steps.
FINAL_STEPS = 10


# ---------------------------------------------------------------------- the stitching map


class StitchingLayer(nn.Module):
    """The stitching map ``E`` from A's layer output to B's layer output (per image shapes).

    4-D layers (``in_shape = (C_A, H_A, W_A)``, ``out_shape = (C_B, H_B, W_B)``): bilinear
    resampling to ``(H_B, W_B)`` when the sizes differ, then an ``m x m`` convolution
    ``C_A -> C_B`` with padding ``m // 2``. 2-D layers (``(D_A,)`` -> ``(D_B,)``): a
    linear map. Weights start at PyTorch's default (random) initialisation.
    """

    def __init__(
        self, in_shape: Sequence[int], out_shape: Sequence[int], kernel_size: int = 1
    ) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        if len(self.in_shape) == 3 and len(self.out_shape) == 3:
            self.map: nn.Module = nn.Conv2d(
                self.in_shape[0], self.out_shape[0], kernel_size, padding=kernel_size // 2
            )
            self.size = self.out_shape[1:]
            self.resample = self.in_shape[1:] != self.size
        elif len(self.in_shape) == 1 and len(self.out_shape) == 1:
            self.map = nn.Linear(self.in_shape[0], self.out_shape[0])
            self.resample = False
        else:
            raise InvariscopeError(
                f"cannot stitch a layer of shape {list(self.in_shape)} to one of shape "
                f"{list(self.out_shape)}: both must be feature maps [C, H, W] or vectors [D]"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.map(x)


def stitchable(shape_a: Sequence[int], shape_b: Sequence[int]) -> bool:
    """Whether two per-image layer shapes can be stitched (both 3-D maps or both vectors)."""
    return (len(shape_a), len(shape_b)) in ((3, 3), (1, 1))


class _Captured(Exception):
    """Raised by a capture hook to stop a forward pass once the layer has run."""


def capture_layer(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` of ``model`` on ``x``; the forward pass stops there."""
    found: list[torch.Tensor] = []

    def hook(module, inputs, output):
        found.append(output)
        raise _Captured

    handle = register_layer_hook(model, layer, hook)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not found:
        raise InvariscopeError(
            f"layer '{layer}' did not run in the forward pass; pick a layer the network uses"
        )
    return found[0]


def stitched_logits(
    model_b: nn.Module, layer_b: str, x: torch.Tensor, replacement: Any
) -> torch.Tensor:
    """B's logits on ``x`` with the output of ``layer_b`` replaced by ``replacement``
    (``psi_B,j`` applied to it): a forward hook that returns the replacement. A callable
    ``replacement`` is given the layer's own output and returns the new one."""

    def hook(module, inputs, output):
        return replacement(output) if callable(replacement) else replacement

    handle = register_layer_hook(model_b, layer_b, hook)
    try:
        return model_b(x)
    finally:
        handle.remove()


def _seed(*keys: int) -> int:
    """A 63-bit seed from integers, independent of rank and order."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# ------------------------------------------------------------------------- the analysis


def _model_layers(model: nn.Module) -> list[str]:
    names = getattr(model, "layer_names", None)
    return list(names) if names is not None else default_layer_names(model)


def _layer_shapes(
    model: nn.Module, layers: Sequence[str], x: torch.Tensor
) -> dict[str, tuple[tuple[int, ...] | None, int]]:
    """``{layer: (per-image output shape or None, number of calls)}`` from one forward."""
    seen: dict[str, list] = {n: [None, 0] for n in layers}

    def hook(name):
        def record(module, inputs, output):
            seen[name][1] += 1
            if isinstance(output, torch.Tensor):
                seen[name][0] = tuple(int(s) for s in output.shape[1:])

        return record

    handles = [register_layer_hook(model, n, hook(n)) for n in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (s[0], s[1]) for n, s in seen.items()}


class _Features:
    """Forward hooks recording, per layer, the output flattened per image (detached)."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [register_layer_hook(model, n, self._hook(n)) for n in layers]

    def _hook(self, name: str):
        def record(module, inputs, output) -> None:
            self.out[name] = output.detach().reshape(output.shape[0], -1)

        return record

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _frozen(models: Sequence[nn.Module]):
    """Set ``requires_grad=False`` on every parameter; return a function that restores."""
    saved = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)

    def restore() -> None:
        for p, flag in saved:
            p.requires_grad_(flag)

    return restore


class StitchAnalysis(Analysis):
    """Stitching error and linear CKA between the layers of two networks, on the engine.

    Models: ``"model"`` (network A, whose early layers compute ``phi_A,i``) and
    ``"model_b"`` (network B, whose later layers classify). Data: ``"data"`` is the
    TEST split (errors and CKA are measured on its selected images); the training split
    that ``E`` learns from is given here.

    Parts (all in stage 0):

    - ``cka-<b>``, one per test batch (``mixed_batches``: the batches are seeded random
      samples of the selected images, not class-sorted runs): one forward pass of A and one of B with hooks on
      every layer; table ``hsic`` (the per-batch unbiased HSIC of every layer pair,
      ``kind="ab"``, and of every layer with itself, ``"aa"`` / ``"bb"``) and table
      ``base`` (each network's correct count). Batches of fewer than 4 images (a short
      last batch) have no ``hsic`` rows: the unbiased estimator needs 4;
    - ``stitch-<i>-<j>``, one job per stitchable pair (A's layer ``i``, B's layer ``j``):
      ``steps`` Adam steps on minibatches of ``train_batch`` training images, drawn (in
      shuffled epochs) from a generator seeded with ``(seed, i, j)``, which also seeds
      ``E``'s initialisation; then the top-1 error on the selected test images. Table
      ``stitch`` and blob ``E`` (``torch.save`` of ``E``'s state dict).

    Args:
        train_set: the training split (``E`` learns on it).
        layers_a, layers_b: layers of A and B (default: every probe-able layer whose
            output is a 4-D map, in order; e.g. ``conv1, pool1, relu1, conv2, pool2,
            relu2`` for ``simple-cnn``).
        kernel_size: odd size ``m`` of the stitching convolution (1: a 1x1 convolution).
        steps: Adam steps per pair; lr: its learning rate; train_batch: images per step.
        cka: compute the CKA matrix (False: only the networks' own errors and stitching).
    """

    name = "stitch"
    version = 2  # 2: CKA batches are seeded random samples (1: class-sorted)
    grad = True
    models = ROLES
    classifier = True
    mixed_batches = True
    part_tables = PART_TABLES
    aggregate_tables = AGGREGATE_TABLES

    def __init__(
        self,
        train_set: Dataset,
        layers_a: Sequence[str] | None = None,
        layers_b: Sequence[str] | None = None,
        kernel_size: int = 1,
        steps: int = 300,
        lr: float = 1e-3,
        train_batch: int = 64,
        cka: bool = True,
    ) -> None:
        if train_set is None:
            raise InvariscopeError(
                "stitching needs a training split to learn the stitching layers; pass "
                + hint("train_set=...", "--data with a train split")
            )
        self.train_set = train_set
        self.layers_a = None if layers_a is None else [str(n) for n in layers_a]
        self.layers_b = None if layers_b is None else [str(n) for n in layers_b]
        for what, given in (("layers-a", self.layers_a), ("layers-b", self.layers_b)):
            if given is not None and not given:
                raise InvariscopeError(
                    f"{hint(what.replace('-', '_'), '--' + what)} is empty; name at least one "
                    "layer (or leave it out for every 4-D layer)"
                )
            if given is not None and len(set(given)) != len(given):
                raise InvariscopeError(f"a layer is listed twice in {what}: {', '.join(given)}")
        self.kernel_size = self._int("kernel-size", kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise InvariscopeError(
                f"{hint('kernel_size', '--kernel-size')} must be odd (1, 3, 5...) so that the "
                f"stitching convolution keeps the map's size, got {kernel_size}"
            )
        self.steps = self._int("train-steps", steps, 1)
        self.train_batch = self._int("train-batch", train_batch, 1)
        if (
            isinstance(lr, bool)
            or not isinstance(lr, int | float)
            or not (lr > 0 and math.isfinite(lr))
        ):
            raise InvariscopeError(f"{hint('lr', '--lr')} must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.cka = bool(cka)
        self.resolved: dict[str, list[str]] = {}
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self.pairs: list[tuple[int, int]] = []

    @staticmethod
    def _int(name: str, value: Any, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise InvariscopeError(
                f"{hint(name.replace('-', '_'), '--' + name)} must be an integer >= {low}, "
                f"got {value!r}"
            )
        return int(value)

    # -- checks and planning
    def _sample(self, ctx) -> torch.Tensor:
        x, _ = ctx.datasets["data"][int(ctx.indices["data"][0])][:2]
        return torch.as_tensor(x)[None].to(ctx.device)

    def check(self, ctx) -> None:
        x = self._sample(ctx)
        k = ctx.num_classes
        for role, what in zip(ROLES, ("A", "B"), strict=True):
            classes = getattr(ctx.models[role], "num_classes", None)
            if isinstance(classes, int) and classes != k:
                raise InvariscopeError(
                    f"model {what} has {classes} classes but the data has {k}; stitch two "
                    "classifiers of the data's classes"
                )
        try:
            with torch.no_grad():
                logits = ctx.models["model_b"](x)
            check_logits(logits, 1, k, "of model B")
        except InvariscopeError as err:
            raise InvariscopeError(f"model B does not fit the data: {err}") from None
        except RuntimeError as err:
            message = " ".join(str(err).split())
            raise InvariscopeError(
                f"model B does not fit the data ({message}); use a model B trained on images "
                "like these"
            ) from None
        self._check_train(ctx, x)
        given = {"model": self.layers_a, "model_b": self.layers_b}
        flags = {"model": "layers-a", "model_b": "layers-b"}
        self.resolved, self.shapes = {}, {}
        for role in ROLES:
            model = ctx.models[role]
            names = given[role]
            if names is not None:
                for n in names:
                    try:
                        resolve_layer(model, n)
                    except InvariscopeError as err:
                        raise InvariscopeError(
                            f"{hint(flags[role].replace('-', '_'), '--' + flags[role])}: {err}"
                        ) from None
            seen = _layer_shapes(model, names if names is not None else _model_layers(model), x)
            if names is None:
                names = [
                    n for n, (s, c) in seen.items() if c == 1 and s is not None and len(s) == 3
                ]
                if not names:
                    raise InvariscopeError(
                        f"model {'A' if role == 'model' else 'B'} has no probe-able layer with a "
                        "4-D output; name its layers with "
                        + hint(flags[role].replace("-", "_"), "--" + flags[role])
                    )
            for n in names:
                shape, calls = seen[n]
                if calls != 1 or shape is None:
                    how = "did not run" if calls == 0 else f"ran {calls} times"
                    how = how if shape is not None or calls == 0 else "returned no tensor"
                    raise InvariscopeError(
                        f"layer '{n}' {how} in one forward pass, so it cannot be stitched; "
                        "pick a module that runs exactly once (e.g. its parent block)"
                    )
            self.resolved[role] = list(names)
            self.shapes[role] = {n: seen[n][0] for n in names}
        self.pairs = [
            (i, j)
            for i, la in enumerate(self.resolved["model"])
            for j, lb in enumerate(self.resolved["model_b"])
            if stitchable(self.shapes["model"][la], self.shapes["model_b"][lb])
        ]
        if not self.pairs and not self.cka:
            raise InvariscopeError(
                "no layer pair can be stitched (both layers must be 4-D maps or both vectors) "
                "and CKA is off; pick matching layers"
            )
        if self.cka and all(len(b) < MIN_IMAGES for b in ctx.batches["data"]):
            raise InvariscopeError(
                f"CKA needs batches of >= {MIN_IMAGES} images (the unbiased HSIC), but every "
                f"batch has fewer; use a larger {hint('batch_size', '--batch-size')} or more "
                "images"
            )

    def _check_train(self, ctx, x: torch.Tensor) -> None:
        n = len(self.train_set)
        if n == 0:
            raise InvariscopeError("the training split is empty; check --data and its train split")
        image, label = self.train_set[0][:2]
        if tuple(torch.as_tensor(image).shape) != tuple(x.shape[1:]):
            raise InvariscopeError(
                f"training images are {list(torch.as_tensor(image).shape)} but test images are "
                f"{list(x.shape[1:])}; use the two splits of one dataset"
            )
        classes = getattr(self.train_set, "classes", None)
        if classes is not None and len(classes) != ctx.num_classes:
            raise InvariscopeError(
                f"the training split has {len(classes)} classes but the test data has "
                f"{ctx.num_classes}; use the two splits of one dataset"
            )

    def config(self) -> dict[str, Any]:
        return {
            "layers_a": self.resolved.get("model", self.layers_a),
            "layers_b": self.resolved.get("model_b", self.layers_b),
            "kernel_size": self.kernel_size,
            "steps": self.steps,
            "lr": self.lr,
            "train_batch": self.train_batch,
            "cka": self.cka,
            "train_data": {
                "name": getattr(self.train_set, "name", type(self.train_set).__name__),
                "fingerprint": getattr(self.train_set, "fingerprint", None),
                "size": len(self.train_set),
            },
            "final_steps": FINAL_STEPS,
        }

    def work(self, ctx) -> int:
        n = len(ctx.indices["data"])
        return 2 * n + len(self.pairs) * (2 * self.steps * self.train_batch + 2 * n)

    def max_forward_batch(self, ctx) -> int:
        return max(len(b) for b in ctx.batches["data"])

    def plan(self, ctx) -> list[Part]:
        parts = [Part(part_id("cka", b), batch=b) for b in range(len(ctx.batches["data"]))]
        parts += [Part(part_id("stitch", i, j), key=(i, j)) for i, j in self.pairs]
        return parts

    # -- computing
    def compute(self, part: Part, ctx, batch: Batch | None) -> dict[str, pd.DataFrame] | PartOutput:
        if part.batch is not None:
            with torch.no_grad():
                return self._batch(ctx, batch)
        return self._stitch(ctx, *part.key)

    def _batch(self, ctx, batch: Batch) -> dict[str, pd.DataFrame]:
        n = int(batch.x.shape[0])
        want_cka = self.cka and n >= MIN_IMAGES
        feats: dict[str, dict[str, torch.Tensor]] = {}
        rows = []
        for role in ROLES:
            hooks = _Features(ctx.models[role], self.resolved[role]) if want_cka else None
            try:
                logits = ctx.models[role](batch.x)
            finally:
                if hooks is not None:
                    hooks.close()
            check_logits(logits, n, ctx.num_classes, f"of {role} on batch {batch.number}")
            correct = int((logits.argmax(dim=1) == batch.y).sum())
            rows.append((role, n, correct))
            if hooks is not None:
                feats[role] = {name: hooks.out[name] for name in self.resolved[role]}
        tables = {
            "base": pd.DataFrame(rows, columns=["model", "n", "correct"]).astype(
                {"n": np.int64, "correct": np.int64}
            )
        }
        if want_cka:
            tables["hsic"] = hsic_table(feats["model"], feats["model_b"])
        return tables

    def _train_batches(self, seed: int) -> list[list[int]]:
        return epoch_batches(len(self.train_set), self.steps, self.train_batch, seed)

    def _stitch(self, ctx, i: int, j: int) -> PartOutput:
        la, lb = self.resolved["model"][i], self.resolved["model_b"][j]
        model_a, model_b = ctx.models["model"], ctx.models["model_b"]
        seed = _seed(ctx.seed, i, j)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stitch_map = StitchingLayer(
                self.shapes["model"][la], self.shapes["model_b"][lb], self.kernel_size
            )
        stitch_map.to(ctx.device)
        opt = torch.optim.Adam(stitch_map.parameters(), lr=self.lr)
        losses: list[float] = []
        restore = _frozen([model_a, model_b])
        try:
            with torch.enable_grad():
                stitch_map.train()
                for _, x, y, _ in iter_index_batches(
                    self.train_set, self._train_batches(seed), num_workers=ctx.num_workers
                ):
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    with torch.no_grad():
                        phi = capture_layer(model_a, la, x)
                    logits = stitched_logits(model_b, lb, x, stitch_map(phi))
                    loss = F.cross_entropy(logits, y)
                    losses.append(optimiser_step(opt, loss, f"the stitching layer {la} -> {lb}"))
            stitch_map.eval()
            n = correct = 0
            with torch.no_grad():
                for _, x, y, _ in iter_index_batches(
                    ctx.datasets["data"], ctx.batches["data"], num_workers=ctx.num_workers
                ):
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    logits = stitched_logits(
                        model_b, lb, x, stitch_map(capture_layer(model_a, la, x))
                    )
                    correct += int((logits.argmax(dim=1) == y).sum())
                    n += int(x.shape[0])
        finally:
            restore()
        final = float(np.mean(losses[-FINAL_STEPS:])) if losses else float("nan")
        table = pd.DataFrame(
            {
                "layer_a": [la],
                "layer_b": [lb],
                "order_a": np.array([i], dtype=np.int64),
                "order_b": np.array([j], dtype=np.int64),
                "steps": np.array([self.steps], dtype=np.int64),
                "final_loss": np.array([final], dtype=np.float64),
                "n": np.array([n], dtype=np.int64),
                "correct": np.array([correct], dtype=np.int64),
                "error": np.array([1.0 - correct / n if n else float("nan")], dtype=np.float64),
            }
        )
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in stitch_map.state_dict().items()}, buffer)
        return PartOutput({"stitch": table}, {"E": buffer.getvalue()})

    # -- aggregating
    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        r = ctx.results
        la, lb = self.resolved["model"], self.resolved["model_b"]
        out: dict[str, pd.DataFrame] = {}
        if self.cka:
            out["cka"] = cka_table(_optional(r, "hsic"), la, lb)
        stitched = _optional(r, "stitch")
        cols = ["layer_a", "layer_b", "order_a", "order_b", "error", "error_low", "error_high", "n"]
        if len(stitched):
            s = stitched.sort_values(["order_a", "order_b"]).reset_index(drop=True)
            n, wrong = s["n"].to_numpy(), (s["n"] - s["correct"]).to_numpy()
            low, high = wilson_interval(wrong, n)
            s["error_low"], s["error_high"] = np.asarray(low), np.asarray(high)
            out["stitch_error"] = s[cols].astype(
                {"error_low": np.float64, "error_high": np.float64}
            )
        else:
            out["stitch_error"] = pd.DataFrame({c: [] for c in cols})
        base = r.read_table("base").groupby("model", sort=False)[["n", "correct"]].sum()
        rows = []
        for role in ROLES:
            n, correct = int(base.loc[role, "n"]), int(base.loc[role, "correct"])
            low, high = wilson_interval(n - correct, n)
            rows.append(
                {
                    "model": role,
                    "label": str(ctx.options.get(f"{role}_label", role)),
                    "error": 1.0 - correct / n if n else float("nan"),
                    "error_low": float(low),
                    "error_high": float(high),
                    "n": n,
                }
            )
        out["models"] = pd.DataFrame(rows).astype({"n": np.int64})
        out["layers"] = pd.DataFrame(
            [(role, name, k) for role in ROLES for k, name in enumerate(self.resolved[role])],
            columns=["model", "layer", "order"],
        ).astype({"order": np.int64})
        return out

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        models = aggregates.get("models")
        s = aggregates.get("stitch_error") if "stitch_error" in aggregates else None
        if models is None or s is None or not len(s):
            return super().headline(summary, aggregates, config)
        m = models.set_index("model")
        label = {k: str(m.loc[k, "label"]) if "label" in m.columns else k for k in m.index}
        alone = ", ".join(
            f"{label[k]} {ci(r.error, r.error_low, r.error_high)}" for k, r in m.iterrows()
        )
        worst = s.loc[s["error"].idxmax()]
        a, b = (label.get(k, k) for k in ("model", "model_b"))
        text = (
            f"Stitching {a} (layer a) into {b} (layer b) on {summary.get('num_images')} "
            f"images: top-1 error {fmt(summary.get('mean_stitch_error'))} on average over "
            f"{len(s)} layer pairs ({fmt(summary.get('mean_diagonal_error'))} at the same "
            f"layer), against {alone} for the models alone; the worst pair is "
            f"{worst.layer_a} -> {worst.layer_b}: "
            f"{ci(worst.error, worst.error_low, worst.error_high)} (95% intervals)."
        )
        cka = aggregates.get("cka") if "cka" in aggregates else None
        if cka is not None and len(cka) and cka["cka"].notna().any():
            low = cka.loc[cka["cka"].idxmin()]
            text += (
                f" Linear CKA {fmt(cka['cka'].mean())} on average, lowest "
                f"{fmt(low.cka)} ({low.layer_a} vs {low.layer_b})."
            )
        return text

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        out: dict[str, pd.DataFrame] = {}
        for name, value, caption in (
            ("stitch_error", "error", "Top-1 error of the stitched model (layer a x layer b)"),
            ("cka", "cka", "Linear CKA (layer of model a x layer of model b)"),
        ):
            t = aggregates.get(name) if name in aggregates else None
            if t is None or not len(t):
                continue
            t = t.sort_values(["order_a", "order_b"], kind="stable")
            pivot = tidy_pivot(t, ["order_a", "layer_a"], "layer_b", value)
            pivot.index = pd.Index(pivot.index.get_level_values("layer_a"), name="layer a")
            pivot.columns = [f"b: {c}" for c in pivot.columns]
            out[caption] = pivot
        models = aggregates.get("models") if "models" in aggregates else None
        if models is not None and len(models):
            out["Each model alone"] = pd.DataFrame(
                {
                    "top-1 error (fraction)": models["error"].to_numpy(),
                    "95% low": models["error_low"].to_numpy(),
                    "95% high": models["error_high"].to_numpy(),
                    "images": models["n"].to_numpy(),
                },
                index=pd.Index(models["label"].astype(str).to_numpy(), name="model"),
            )
        return out

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        m = aggregates["models"].set_index("model")
        result: dict[str, Any] = {
            "num_images": int(len(ctx.indices["data"])),
            "error_a": float(m.loc["model", "error"]),
            "error_b": float(m.loc["model_b", "error"]),
        }
        s = aggregates["stitch_error"]
        result["pairs"] = int(len(s))
        if len(s):
            same = s[s["layer_a"] == s["layer_b"]]
            diag = same if len(same) else s[s["order_a"] == s["order_b"]]
            result["mean_stitch_error"] = round(float(s["error"].mean()), 6)
            result["mean_diagonal_error"] = (
                round(float(diag["error"].mean()), 6) if len(diag) else None
            )
        if "cka" in aggregates and len(aggregates["cka"]):
            result["mean_cka"] = round(float(aggregates["cka"]["cka"].mean()), 6)
        return result


def _optional(results, name: str) -> pd.DataFrame:
    """A stored table, or an empty frame when no part wrote it."""
    return results.read_table(name) if name in results.tables() else pd.DataFrame()


# ------------------------------------------------------------------------- Python API


@dataclass
class StitchResult:
    """What :func:`stitch` returns: the CKA and stitching-error tables, all aggregate
    tables and the run directory."""

    cka: pd.DataFrame | None
    stitch_error: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    run_dir: Path | None = None


@renamed_arguments(steps="train_steps")
def stitch(
    model_a: nn.Module,
    model_b: nn.Module,
    test_set: Dataset,
    train_set: Dataset,
    *,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    kernel_size: int = 1,
    train_steps: int = 300,
    lr: float = 1e-3,
    train_batch: int = 64,
    cka: bool = True,
    images: int | Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    labels: Mapping[str, str] | None = None,
    **engine: Any,
) -> StitchResult:
    """Stitch every layer of ``model_a`` into every layer of ``model_b`` (and their CKA).

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    Runs :class:`StitchAnalysis` on the engine: ``E`` learns on ``train_set``; errors
    and CKA are measured on ``test_set`` (``images``: a seeded subset). ``model_b`` may
    be ``model_a`` itself (self-stitching). ``labels`` names the networks
    (``{"model": "A", "model_b": "B"}``). Resumable with ``out``.

    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> net = create_model("simple-cnn")
    >>> r = stitch(net, net, create_dataset("digits", "test"), create_dataset("digits", "train"),
    ...            layers_a=["relu2"], layers_b=["relu2"], train_steps=2, images=8, progress=False)
    >>> list(r.stitch_error.columns)[:5]
    ['layer_a', 'layer_b', 'order_a', 'order_b', 'error']
    """
    analysis = StitchAnalysis(
        train_set,
        layers_a=layers_a,
        layers_b=layers_b,
        kernel_size=kernel_size,
        steps=train_steps,
        lr=lr,
        train_batch=train_batch,
        cka=cka,
    )
    options = {f"{k}_label": v for k, v in (labels or {}).items()}
    result = run_analysis(
        analysis,
        {"model": model_a, "model_b": model_b},
        {"data": test_set},
        images=images,
        batch_size=batch_size,
        seed=seed,
        device=device,
        out=out,
        overwrite=overwrite,
        figures=figures,
        options={**options, **engine.pop("options", {})},
        **engine,
    )
    aggregates = dict(result.aggregates)
    return StitchResult(
        aggregates.get("cka"), aggregates["stitch_error"], aggregates, result.run_dir
    )


register_analysis(
    AnalysisEntry(
        name="stitch",
        analysis=StitchAnalysis,
        title="Stitching and representation similarity",
        paper=(
            "Lenc & Vedaldi 2018, Understanding image representations by measuring their "
            "equivariance and equivalence; Kornblith et al. 2019, Similarity of neural "
            "network representations revisited (linear CKA)"
        ),
        about=(
            "A stitching layer E (a 1x1 convolution, with resampling where the sizes differ) "
            "learns to map network A's layer into network B's layer through B's frozen "
            "remainder; a low top-1 error of the stitched network means A's layer carries "
            "what B's layer needs (it covers it). Linear CKA, streamed over batches with the "
            "unbiased HSIC, measures how similar the two layers' representations are without "
            "training anything (errors: 95% Wilson intervals)."
        ),
        command="stitch",
        report_tables=("stitch_error", "cka", "models"),
        figures="invariscope.plots.stitch:render_stitch_run",
        demo="invariscope.demo:stitch_stage",
        conformance=(
            "--data",
            "digits",
            "--layers-a",
            "pool1,relu2",
            "--layers-b",
            "pool1,relu2",
            "--train-steps",
            "20",
            "--train-batch",
            "16",
            "--images",
            "24",
            "--batch-size",
            "8",
        ),
        figure_order=("stitch_cka",),
        bad_inputs=(
            (("--data", "digits", "--layers-a", "wobble"), "unknown layer"),
            (("--data", "digits", "--train-steps", "0"), "train-steps"),
            (("--data", "digits", "--batch-size", "2", "--images", "8"), "batch"),
            (("--data", "digits", "--kernel-size", "2"), "odd"),
        ),
    )
)
