"""The Invariant Transformer Net on the engine: learn a family of transformations a frozen
classifier is invariant to (Bunne et al. 2018, "Studying invariances of trained
convolutional neural networks", strategy 2, section III.D and figures 4-5).

An :class:`~invariscope.models.itn.InvariantTransformerNet` ``F(k1, k2)`` (two control
nets giving a spatial affine ``A_theta`` and a colour affine ``A_phi``; see that module
for the conventions) is trained in front of the FROZEN classifier with Adam. Per step a
minibatch of training images gets one ``(k1, k2)`` per image, drawn uniformly from
``[0, 1]^2``, and the batch uses

- the classifier's cross-entropy on the transformed images when the batch accuracy is
  below ``acc_orig`` (pull the transformations back to where the classifier still works),
- else ``L_k(spatial) + c_theta L_k(colour)``, with ``L_k(A) = mean_j k_j L(A_j)`` and
  ``L(A) = -(1/|S|) sum_{x in S} ||A_hat x - x||^2`` over fresh random unit vectors
  ``S`` (push the transformations to be large, the more so the larger the control).

``acc_orig = tolerance x`` the classifier's clean accuracy on the whole training split
(measured in stage 0). ``c_theta`` weighs the COLOUR term, as in the paper, where it
"increase[s] the influence of color transformations" (its formula writes ``c_theta
L_k1(A_phi)``: ``k1`` drives the colour there). Step 0 always uses the classifier's loss:
both nets start at the identity, where the invariance loss and its gradient are exactly
zero, so without that first step Adam would never leave the identity.

Parts (one stage each, in order):

- stage 0, job part ``clean``: the classifier's clean accuracy on the training split;
- stages ``1..n``, job parts ``train-<c>``: the steps ``[c s, (c + 1) s)`` (``s`` =
  ``save_every``), starting from the previous chunk's blob ``state`` (ITN weights, Adam
  state, step); images, controls and unit vectors from a generator seeded with
  ``(seed, c)``. Table ``training``, blob ``state``. A killed run resumes at the last
  finished chunk;
- stage ``n + 1``, batch parts ``eval-<b>`` over the selected TEST images, with the
  final ITN: accuracy on a ``grid x grid`` lattice of ``(k1, k2)`` (corners included),
  softmax of ``F([k1, 0])`` for ``k1`` in ``linspace(0, 1, sweep_points)`` (the paper's
  figure 4b) and, for the ``examples`` images evenly spaced through the selection (which
  is grouped by class), the images at the corner controls (figure 5).

All passes run in float32 on the run's device (the engine's ``amp`` and forward batch
do not apply to them).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from invariscope._deprecation import renamed_arguments
from invariscope.data.batches import iter_index_batches
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
from invariscope.measure.stitch import _frozen, _optional, _seed
from invariscope.models.itn import (
    CONTROLS,
    InvariantTransformerNet,
    control_loss,
    decompose_colour,
    decompose_spatial,
    mean_displacement,
    rms_displacement,
    select_loss,
    theta_to_pixel_matrix,
    unit_vectors,
)

__all__ = ["ITNAnalysis", "ITNResult", "invariant_transformer", "parse_controls"]

PART_TABLES = (
    "clean_count",
    "training_steps",
    "grid_count",
    "k1_sweep",
    "k1_class",
    "example_images",
    "example_probs",
)
AGGREGATE_TABLES = (
    "clean",
    "training",
    "accuracy",
    "k1_curve",
    "class_probabilities",
    "example_probabilities",
    "examples",
    "learned_transforms",
    "classes",
)
#: Seed streams (with the run's seed) of the ITN's initialisation, of the training chunks
#: and of the unit vectors of the reported mean displacement.
INIT_STREAM, TRAIN_STREAM, DISPLACEMENT_STREAM = 1, 2, 3
#: Unit vectors of ``mean_displacement`` in ``learned_transforms``.
DISPLACEMENT_VECTORS = 4096
#: Images per forward pass of the clean-accuracy stage.
CLEAN_BATCH = 256


def _check_number(name: str, value: Any, low: float, high: float | None = None, *, open_low=False):
    ok = not isinstance(value, bool) and isinstance(value, int | float | np.floating | np.integer)
    ok = ok and math.isfinite(value) and (value > low if open_low else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        side = f"> {low:g}" if open_low else f">= {low:g}"
        bound = f" and <= {high:g}" if high is not None else ""
        raise InvariscopeError(
            f"{hint(name.replace('-', '_'), '--' + name)} must be a number {side}{bound}, "
            f"got {value!r}"
        )
    return float(value)


#: Widest hidden layer of a control net: each net holds about (2 + outputs) x hidden
#: parameters (and Adam 3 times as many numbers); Bunne et al. use tens of units.
MAX_HIDDEN = 2**16


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise InvariscopeError(
            f"{hint(name.replace('-', '_'), '--' + name)} must be an integer >= {low}, "
            f"got {value!r}"
        )
    if high is not None and value > high:
        raise InvariscopeError(
            f"{hint(name.replace('-', '_'), '--' + name)} must be at most {high:,}, got "
            f"{int(value):,}"
        )
    return int(value)


def parse_controls(controls: str | Sequence[str]) -> tuple[str, str]:
    """``"spatial,colour"`` / ``("colour", "spatial")`` -> the validated mapping (k1 first)."""
    items = (
        [c.strip() for c in controls.split(",")] if isinstance(controls, str) else list(controls)
    )
    items = [{"color": "colour"}.get(str(c).lower(), str(c).lower()) for c in items if str(c)]
    if sorted(items) != sorted(CONTROLS):
        raise InvariscopeError(
            f"unknown {hint('controls', '--controls')} '{','.join(map(str, items))}': give "
            "spatial,colour (k1 spatial, k2 colour) or colour,spatial"
        )
    return items[0], items[1]


class ITNAnalysis(Analysis):
    """Train an Invariant Transformer Net in front of the frozen ``model``, then measure it.

    Data: ``"data"`` is the TEST split (the learned family is evaluated on its selected
    images); the training split is given here (the ITN trains on it, and the clean
    accuracy behind ``acc_orig`` is measured on all of it).

    Args:
        train_set: the training split.
        steps: Adam steps in all; save_every: steps per training part (the unit of
            resumption); train_batch: training images per step.
        lr: Adam's learning rate.
        tolerance: ``acc_orig = tolerance x clean accuracy``, in ``(0, 1]``.
        c_theta: weight of the colour term of the invariance loss (> 0).
        controls: which transformation ``k1`` and ``k2`` drive (default ``("spatial",
            "colour")``; see :mod:`invariscope.models.itn`).
        hidden: hidden width of each control net.
        vectors: ``|S|``, random unit vectors per step in the invariance loss.
        grid: points per axis of the ``(k1, k2)`` accuracy lattice (``linspace(0, 1)``, >= 2).
        sweep_points: values of ``k1`` (``k2 = 0``) in the class-probability sweep (>= 2).
        examples: test images shown at the corners (evenly spaced through the selection).

    Tables per part: ``clean_count`` (``n, correct``), ``training_steps`` (``step, chunk,
    loss_used, loss, classifier_loss, l_k1, l_k2, batch_accuracy``: ``loss_used`` is
    ``"classifier"`` or ``"invariance"``, ``loss`` its value), ``grid_count`` (``k1, k2,
    n, correct``), ``k1_sweep`` (``k1, n, correct, p_true_sum, p_other_sum``),
    ``k1_class`` (``k1, label, prob_sum``), ``example_images`` and ``example_probs``.
    Aggregates: ``clean``, ``training``, ``accuracy`` (with 95% Wilson intervals),
    ``k1_curve``, ``class_probabilities``, ``examples``, ``example_probabilities``,
    ``learned_transforms`` (per control and ``k`` in ``linspace(0, 1, grid)``: the
    decomposition, ``displacement`` = mean ``||A_hat x - x||`` over 4096 unit vectors,
    ``rms_displacement`` exact, ``matrix`` as JSON) and ``classes``.
    """

    name = "itn"
    grad = True
    classifier = True
    part_tables = PART_TABLES
    aggregate_tables = AGGREGATE_TABLES

    def __init__(
        self,
        train_set: Dataset,
        steps: int = 400,
        save_every: int = 100,
        train_batch: int = 64,
        lr: float = 1e-3,
        tolerance: float = 0.9,
        c_theta: float = 1.0,
        controls: str | Sequence[str] = CONTROLS,
        hidden: int = 32,
        vectors: int = 16,
        grid: int = 5,
        sweep_points: int = 11,
        examples: int = 6,
    ) -> None:
        if train_set is None:
            raise InvariscopeError(
                "the Invariant Transformer Net needs a training split to learn on; pass "
                + hint("train_set=...", "--data with a train split")
            )
        self.train_set = train_set
        self.steps = _check_int("train-steps", steps, 1)
        self.save_every = _check_int("save-every", save_every, 1)
        self.train_batch = _check_int("train-batch", train_batch, 1)
        self.lr = _check_number("lr", lr, 0.0, open_low=True)
        self.tolerance = _check_number("tolerance", tolerance, 0.0, 1.0, open_low=True)
        self.c_theta = _check_number("c-theta", c_theta, 0.0, open_low=True)
        self.controls = parse_controls(controls)
        self.hidden = _check_int("hidden", hidden, 1, MAX_HIDDEN)
        self.vectors = _check_int("vectors", vectors, 1)
        self.grid = _check_int("grid", grid, 2)
        self.sweep_points = _check_int("sweep-points", sweep_points, 2)
        self.examples = _check_int("examples", examples, 0)
        self.image_shape: tuple[int, int, int] | None = None
        self._example_of: dict[int, int] = {}

    # -- settings
    @property
    def chunks(self) -> int:
        """Training parts: ``ceil(steps / save_every)``."""
        return -(-self.steps // self.save_every)

    def config(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "save_every": self.save_every,
            "train_batch": self.train_batch,
            "lr": self.lr,
            "tolerance": self.tolerance,
            "c_theta": self.c_theta,
            "controls": list(self.controls),
            "hidden": self.hidden,
            "vectors": self.vectors,
            "grid": self.grid,
            "sweep_points": self.sweep_points,
            "examples": self.examples,
            "train_data": {
                "name": getattr(self.train_set, "name", type(self.train_set).__name__),
                "fingerprint": getattr(self.train_set, "fingerprint", None),
                "size": len(self.train_set),
            },
        }

    def check(self, ctx) -> None:
        x, _ = ctx.datasets["data"][int(ctx.indices["data"][0])][:2]
        shape = tuple(torch.as_tensor(x).shape)
        if len(shape) != 3:
            raise InvariscopeError(f"images must be [C, H, W], got {list(shape)}")
        n = len(self.train_set)
        if n == 0:
            raise InvariscopeError("the training split is empty; check --data and its train split")
        image = torch.as_tensor(self.train_set[0][0])
        if tuple(image.shape) != shape:
            raise InvariscopeError(
                f"training images are {list(image.shape)} but test images are {list(shape)}; "
                "use the two splits of one dataset"
            )
        classes = getattr(self.train_set, "classes", None)
        if classes is not None and len(classes) != ctx.num_classes:
            raise InvariscopeError(
                f"the training split has {len(classes)} classes but the test data has "
                f"{ctx.num_classes}; use the two splits of one dataset"
            )
        self.image_shape = shape  # type: ignore[assignment]

    def work(self, ctx) -> int:
        n = len(ctx.indices["data"])
        return (
            len(self.train_set)
            + self.steps * self.train_batch
            + n * (self.grid**2 + self.sweep_points)
        )

    def max_forward_batch(self, ctx) -> int:
        return max(len(b) for b in ctx.batches["data"])

    def plan(self, ctx) -> list[Part]:
        selected = np.asarray(ctx.indices["data"])
        m = min(self.examples, len(selected))
        # evenly spaced through the selection (grouped by class): examples of many classes
        positions = (
            np.unique(np.round(np.linspace(0, len(selected) - 1, m)).astype(int)) if m else []
        )
        self._example_of = {int(selected[p]): e for e, p in enumerate(positions)}
        parts = [Part("clean", stage=0, key="clean")]
        parts += [Part(part_id("train", c), stage=1 + c, key=c) for c in range(self.chunks)]
        stage = 1 + self.chunks
        parts += [
            Part(part_id("eval", b), stage=stage, batch=b) for b in range(len(ctx.batches["data"]))
        ]
        return parts

    # -- the ITN and its stored state
    def build(self, seed: int) -> InvariantTransformerNet:
        """A fresh ITN at the identity, its hidden layers initialised from ``(seed, INIT_STREAM)``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(seed, INIT_STREAM))
            return InvariantTransformerNet(
                self.image_shape[0], hidden=self.hidden, controls=self.controls
            )

    def final_state(self, results) -> dict[str, Any]:
        """The stored state of the last training part (``itn``, ``opt``, ``step``)."""
        return _load(results.read_blob(part_id("train", self.chunks - 1), "state"))

    def acc_orig(self, results) -> tuple[float, int, int]:
        """``(acc_orig, n, correct)`` from the stored ``clean`` table."""
        clean = results.read_table("clean_count")
        n, correct = int(clean["n"].sum()), int(clean["correct"].sum())
        return self.tolerance * correct / n, n, correct

    # -- computing
    def compute(self, part: Part, ctx, batch: Batch | None):
        model = ctx.models["model"]
        restore = _frozen([model])
        try:
            if part.key == "clean":
                with torch.no_grad():
                    return {"clean_count": self._clean(ctx)}
            if part.batch is None:
                return self._train(ctx, int(part.key))
            with torch.no_grad():
                return self._evaluate(ctx, batch)
        finally:
            restore()

    def _clean(self, ctx) -> pd.DataFrame:
        n_train = len(self.train_set)
        chunks = [
            list(range(s, min(s + CLEAN_BATCH, n_train))) for s in range(0, n_train, CLEAN_BATCH)
        ]
        n = correct = 0
        for _, x, y, _ in iter_index_batches(self.train_set, chunks, num_workers=ctx.num_workers):
            x, y = x.to(ctx.device), y.to(ctx.device)
            logits = ctx.models["model"](x)
            check_logits(logits, int(x.shape[0]), ctx.num_classes, "on the training split")
            correct += int((logits.argmax(dim=1) == y).sum())
            n += int(x.shape[0])
        return pd.DataFrame({"n": [n], "correct": [correct]}).astype(np.int64)

    def _train(self, ctx, chunk: int) -> PartOutput:
        model = ctx.models["model"]
        acc_orig, _, _ = self.acc_orig(ctx.results)
        itn = self.build(ctx.seed).to(ctx.device)
        opt = torch.optim.Adam(itn.parameters(), lr=self.lr)
        start = chunk * self.save_every
        if chunk > 0:
            state = _load(ctx.results.read_blob(part_id("train", chunk - 1), "state"))
            itn.load_state_dict(state["itn"])
            opt.load_state_dict(state["opt"])
            if int(state["step"]) != start:
                raise InvariscopeError(
                    f"the stored training state is at step {state['step']}, expected {start}; "
                    "rerun with --overwrite"
                )
        stop = min(start + self.save_every, self.steps)
        count, B, C = stop - start, self.train_batch, self.image_shape[0]
        g = torch.Generator().manual_seed(_seed(ctx.seed, TRAIN_STREAM, chunk))
        picks = torch.randint(len(self.train_set), (count, B), generator=g)
        controls = torch.rand(count, B, 2, generator=g)
        s_spatial = torch.stack([unit_vectors(self.vectors, 3, generator=g) for _ in range(count)])
        s_colour = torch.stack(
            [unit_vectors(self.vectors, C + 1, generator=g) for _ in range(count)]
        )
        rows = []
        itn.train()
        with torch.enable_grad():
            for i, (_, x, y, _) in enumerate(
                iter_index_batches(self.train_set, picks.tolist(), num_workers=ctx.num_workers)
            ):
                step = start + i
                x, y = x.to(ctx.device), y.to(ctx.device)
                k = controls[i].to(ctx.device)
                theta, phi = itn.matrices(k[:, 0], k[:, 1])
                logits = model(itn.transform(x, theta, phi))
                ce = F.cross_entropy(logits, y)
                accuracy = float((logits.argmax(dim=1) == y).float().mean())
                k_spatial, k_colour = itn.split(k[:, 0], k[:, 1])
                l_spatial = control_loss(theta, k_spatial, s_spatial[i].to(ctx.device))
                l_colour = control_loss(phi, k_colour, s_colour[i].to(ctx.device))
                used = "classifier" if step == 0 else select_loss(accuracy, acc_orig)
                loss = ce if used == "classifier" else l_spatial + self.c_theta * l_colour
                optimiser_step(opt, loss, f"the Invariant Transformer Net at step {step}")
                l_k1, l_k2 = (
                    (l_spatial, l_colour)
                    if self.controls[0] == "spatial"
                    else (l_colour, l_spatial)
                )
                rows.append(
                    (
                        step,
                        chunk,
                        used,
                        *(float(v.detach()) for v in (loss, ce, l_k1, l_k2)),
                        accuracy,
                    )
                )
        table = pd.DataFrame(
            rows,
            columns=[
                "step",
                "chunk",
                "loss_used",
                "loss",
                "classifier_loss",
                "l_k1",
                "l_k2",
                "batch_accuracy",
            ],
        ).astype({"step": np.int64, "chunk": np.int64})
        buffer = io.BytesIO()
        torch.save(
            {
                "itn": {k: v.detach().cpu() for k, v in itn.state_dict().items()},
                "opt": opt.state_dict(),
                "step": stop,
            },
            buffer,
        )
        return PartOutput({"training_steps": table}, {"state": buffer.getvalue()})

    def _final_itn(self, ctx) -> InvariantTransformerNet:
        itn = self.build(ctx.seed)
        itn.load_state_dict(self.final_state(ctx.results)["itn"])
        return itn.to(ctx.device).eval()

    def _evaluate(self, ctx, batch: Batch) -> dict[str, pd.DataFrame]:
        model, itn = ctx.models["model"], self._final_itn(ctx)
        x, y = batch.x.float(), batch.y
        n = int(x.shape[0])

        def logits_at(k1: float, k2: float, images: torch.Tensor = x) -> torch.Tensor:
            out = model(itn(images, k1, k2))
            check_logits(out, int(images.shape[0]), ctx.num_classes, f"on batch {batch.number}")
            return out.float()

        ks = np.linspace(0.0, 1.0, self.grid)
        acc_rows = [
            (float(a), float(b), n, int((logits_at(float(a), float(b)).argmax(1) == y).sum()))
            for a in ks
            for b in ks
        ]
        sweep_rows, class_rows = [], []
        K = ctx.num_classes
        for k1 in np.linspace(0.0, 1.0, self.sweep_points):
            p = logits_at(float(k1), 0.0).softmax(dim=1)
            true = p.gather(1, y[:, None])[:, 0]
            other = p.scatter(1, y[:, None], -1.0).max(dim=1).values
            correct = int((p.argmax(1) == y).sum())
            sweep_rows.append((float(k1), n, correct, float(true.sum()), float(other.sum())))
            sums = p.sum(dim=0).cpu().numpy()
            class_rows += [(float(k1), c, float(sums[c])) for c in range(K)]
        tables = {
            "grid_count": pd.DataFrame(acc_rows, columns=["k1", "k2", "n", "correct"]).astype(
                {"n": np.int64, "correct": np.int64}
            ),
            "k1_sweep": pd.DataFrame(
                sweep_rows, columns=["k1", "n", "correct", "p_true_sum", "p_other_sum"]
            ).astype({"n": np.int64, "correct": np.int64}),
            "k1_class": pd.DataFrame(class_rows, columns=["k1", "label", "prob_sum"]).astype(
                {"label": np.int64}
            ),
        }
        chosen = [
            (i, self._example_of[int(t)])
            for i, t in enumerate(batch.index.tolist())
            if int(t) in self._example_of
        ]
        if chosen:
            tables.update(self._examples(batch, chosen, itn, logits_at))
        return tables

    def _examples(self, batch: Batch, chosen, itn, logits_at) -> dict[str, pd.DataFrame]:
        """The example images of this batch (``chosen``: ``(position in batch, example
        number)``): pixels at the corners (``examples``, long format: one row per pixel;
        ``original`` rows are the untransformed images) and their class probabilities
        along ``F([k1, 0])`` (``example_probabilities``)."""
        rows = torch.as_tensor([i for i, _ in chosen], dtype=torch.int64)
        numbers = [e for _, e in chosen]
        x = batch.x[rows.to(batch.x.device)].float()
        index = batch.index[rows].numpy()
        label = batch.y[rows.to(batch.y.device)].cpu().numpy()
        m = len(chosen)
        panels = [(None, None)] + [(a, b) for b in (0.0, 1.0) for a in (0.0, 1.0)]
        frames = []
        C, H, W = x.shape[1:]
        cc, rr, ww = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
        for k1, k2 in panels:
            values = (x if k1 is None else itn(x, k1, k2)).cpu().numpy()
            for e in range(m):
                frames.append(
                    pd.DataFrame(
                        {
                            "example": np.int64(numbers[e]),
                            "index": np.int64(index[e]),
                            "label": np.int64(label[e]),
                            "original": k1 is None,
                            "k1": np.nan if k1 is None else k1,
                            "k2": np.nan if k2 is None else k2,
                            "channel": cc.ravel().astype(np.int64),
                            "row": rr.ravel().astype(np.int64),
                            "col": ww.ravel().astype(np.int64),
                            "value": values[e].ravel().astype(np.float32),
                        }
                    )
                )
        prob_rows = []
        for k1 in np.linspace(0.0, 1.0, self.sweep_points):
            p = logits_at(float(k1), 0.0, x).softmax(dim=1).cpu().numpy()
            for e in range(m):
                prob_rows += [
                    (numbers[e], int(index[e]), int(label[e]), float(k1), c, float(p[e, c]))
                    for c in range(p.shape[1])
                ]
        probs = pd.DataFrame(
            prob_rows, columns=["example", "index", "label", "k1", "class", "probability"]
        ).astype({"example": np.int64, "index": np.int64, "label": np.int64, "class": np.int64})
        return {"example_images": pd.concat(frames, ignore_index=True), "example_probs": probs}

    # -- aggregating
    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        r = ctx.results
        classes = list(ctx.classes["data"])
        out: dict[str, pd.DataFrame] = {
            "classes": pd.DataFrame(
                {"label": np.arange(len(classes), dtype=np.int64), "name": classes}
            )
        }
        acc_orig, n_clean, correct_clean = self.acc_orig(r)
        out["clean"] = pd.DataFrame(
            {
                "split": ["train"],
                "n": np.array([n_clean], dtype=np.int64),
                "correct": np.array([correct_clean], dtype=np.int64),
                "clean_accuracy": [correct_clean / n_clean],
                "tolerance": [self.tolerance],
                "acc_orig": [acc_orig],
            }
        )
        out["training"] = r.read_table("training_steps").sort_values("step").reset_index(drop=True)
        acc = (
            r.read_table("grid_count")
            .groupby(["k1", "k2"], sort=True)[["n", "correct"]]
            .sum()
            .reset_index()
        )
        out["accuracy"] = _with_interval(acc)
        sweep = r.read_table("k1_sweep").groupby("k1", sort=True).sum().reset_index()
        curve = _with_interval(sweep[["k1", "n", "correct"]].copy())
        curve["p_true"] = sweep["p_true_sum"] / sweep["n"]
        curve["p_other"] = sweep["p_other_sum"] / sweep["n"]
        out["k1_curve"] = curve
        per_class = r.read_table("k1_class").groupby(["k1", "label"], sort=True)["prob_sum"].sum()
        per_class = per_class.reset_index()
        totals = sweep.set_index("k1")["n"]
        per_class["probability"] = per_class["prob_sum"] / per_class["k1"].map(totals)
        per_class["name"] = [classes[int(c)] for c in per_class["label"]]
        out["class_probabilities"] = per_class[["k1", "label", "name", "probability"]]
        for name, part_name in (
            ("examples", "example_images"),
            ("example_probabilities", "example_probs"),
        ):
            table = _optional(r, part_name)
            if len(table):
                out[name] = table.sort_values("example", kind="stable").reset_index(drop=True)
        out["learned_transforms"] = self.learned_transforms(ctx)
        return out

    def learned_transforms(self, ctx) -> pd.DataFrame:
        """The final matrices for ``k`` in ``linspace(0, 1, grid)`` of each control, decomposed."""
        itn = self.build(ctx.seed)
        itn.load_state_dict(self.final_state(ctx.results)["itn"])
        itn.eval()
        C, H, W = self.image_shape
        g = torch.Generator().manual_seed(_seed(ctx.seed, DISPLACEMENT_STREAM))
        s3 = unit_vectors(DISPLACEMENT_VECTORS, 3, generator=g)
        sc = unit_vectors(DISPLACEMENT_VECTORS, C + 1, generator=g)
        ks = torch.linspace(0.0, 1.0, self.grid)
        frames = []
        with torch.no_grad():
            for control, kind in zip(("k1", "k2"), self.controls, strict=True):
                net = itn.spatial if kind == "spatial" else itn.colour
                mats = net(ks)
                frame = pd.DataFrame(
                    {"control": control, "transform": kind, "k": ks.numpy().astype(np.float64)}
                )
                nan = np.full(len(ks), np.nan)
                if kind == "spatial":
                    parts = decompose_spatial(theta_to_pixel_matrix(mats, H, W), H, W)
                    for name in ("rotation_deg", "scale_x", "scale_y", "shear", "tx_px", "ty_px"):
                        frame[name] = parts[name].double().numpy()
                    for name in ("contrast", "brightness", "mixing"):
                        frame[name] = nan
                    frame["displacement"] = mean_displacement(mats, s3).double().numpy()
                else:
                    for name in ("rotation_deg", "scale_x", "scale_y", "shear", "tx_px", "ty_px"):
                        frame[name] = nan
                    parts = decompose_colour(mats)
                    for name in ("contrast", "brightness", "mixing"):
                        frame[name] = parts[name].double().numpy()
                    frame["displacement"] = mean_displacement(mats, sc).double().numpy()
                frame["rms_displacement"] = rms_displacement(mats).double().numpy()
                frame["matrix"] = [json.dumps(m.tolist()) for m in mats.double().numpy()]
                frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        acc = aggregates.get("accuracy") if "accuracy" in aggregates else None
        if acc is None or not len(acc):
            return super().headline(summary, aggregates, config)

        def at(k1: float, k2: float) -> str:
            r = acc[(acc["k1"] == k1) & (acc["k2"] == k2)]
            if r.empty:
                return "n/a"
            r = r.iloc[0]
            return ci(r.accuracy, r.accuracy_low, r.accuracy_high)

        low = acc.loc[acc["accuracy"].idxmin()]
        top1, top2 = float(acc["k1"].max()), float(acc["k2"].max())
        text = (
            f"Top-1 accuracy of the classifier behind the ITN on {summary.get('num_images')} "
            f"test images: {at(0.0, 0.0)} without the invariance loss (k1 = k2 = 0), "
            f"{at(top1, top2)} at k1 = {top1:g}, k2 = {top2:g}; lowest on the grid "
            f"{ci(low.accuracy, low.accuracy_low, low.accuracy_high)} at k1 = {low.k1:g}, "
            f"k2 = {low.k2:g} (95% intervals)."
        )
        lt = aggregates.get("learned_transforms") if "learned_transforms" in aggregates else None
        if lt is not None and len(lt):
            sp = lt[(lt["transform"] == "spatial")].sort_values("k")
            co = lt[(lt["transform"] == "colour")].sort_values("k")
            bits = []
            if len(sp):
                r = sp.iloc[-1]
                bits.append(
                    f"at k1 = {r.k:g} the spatial transformation rotates by {fmt(r.rotation_deg)} "
                    f"deg, scales by {fmt(r.scale_x)} x {fmt(r.scale_y)} and shifts by "
                    f"({fmt(r.tx_px)}, {fmt(r.ty_px)}) px"
                )
            if len(co):
                r = co.iloc[-1]
                bits.append(
                    f"at k2 = {r.k:g} the colour transformation scales contrast by "
                    f"{fmt(r.contrast)} and adds {fmt(r.brightness)} brightness"
                )
            if bits:
                text += " Learned: " + "; ".join(bits) + "."
        return text

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        out: dict[str, pd.DataFrame] = {}
        acc = aggregates.get("accuracy") if "accuracy" in aggregates else None
        if acc is not None and len(acc):
            p = tidy_pivot(acc.sort_values(["k1", "k2"]), "k1", "k2", "accuracy")
            p.index.name = "k1 (spatial invariance weight)"
            p.columns = [f"k2 = {v:g}" for v in p.columns]
            out["Top-1 accuracy (fraction correct), k1 x k2"] = p
        curve = aggregates.get("k1_curve") if "k1_curve" in aggregates else None
        if curve is not None and len(curve):
            out["Accuracy and mean probabilities along k1"] = pd.DataFrame(
                {
                    "accuracy (fraction correct)": curve["accuracy"].to_numpy(),
                    "95% low": curve["accuracy_low"].to_numpy(),
                    "95% high": curve["accuracy_high"].to_numpy(),
                    "p(true class)": curve["p_true"].to_numpy(),
                    "p(other classes)": curve["p_other"].to_numpy(),
                },
                index=pd.Index(curve["k1"].to_numpy(), name="k1"),
            )
        lt = aggregates.get("learned_transforms") if "learned_transforms" in aggregates else None
        if lt is not None and len(lt):
            columns = {
                "rotation_deg": "rotation (degrees)",
                "scale_x": "scale x",
                "scale_y": "scale y",
                "shear": "shear",
                "tx_px": "shift x (px)",
                "ty_px": "shift y (px)",
                "contrast": "contrast (factor)",
                "brightness": "brightness (intensity)",
                "displacement": "mean displacement",
            }
            t = lt.assign(
                setting=[f"{c} = {k:g}" for c, k in zip(lt["control"], lt["k"], strict=True)]
            )
            t = t.set_index(["transform", "setting"])[[c for c in columns if c in lt.columns]]
            out["The learned transformations"] = t.rename(columns=columns)
        return out

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        clean = aggregates["clean"].iloc[0]
        acc = aggregates["accuracy"].set_index(["k1", "k2"])["accuracy"]
        tr = aggregates["training"]
        lt = aggregates["learned_transforms"]
        result: dict[str, Any] = {
            "num_images": int(len(ctx.indices["data"])),
            "clean_accuracy_train": round(float(clean["clean_accuracy"]), 6),
            "acc_orig": round(float(clean["acc_orig"]), 6),
            "accuracy_k00": round(float(acc.loc[(0.0, 0.0)]), 6),
            "accuracy_k11": round(float(acc.loc[(1.0, 1.0)]), 6),
            "min_grid_accuracy": round(float(acc.min()), 6),
            "invariance_steps": round(float((tr["loss_used"] == "invariance").mean()), 6),
        }
        for kind in CONTROLS:
            row = lt[(lt["transform"] == kind) & (lt["k"] == 1.0)].iloc[0]
            result[f"{kind}_displacement_k1"] = round(float(row["displacement"]), 6)
            if kind == "spatial":
                for name in ("rotation_deg", "scale_x", "scale_y", "shear", "tx_px", "ty_px"):
                    result[f"spatial_{name}_k1"] = round(float(row[name]), 4)
            else:
                for name in ("contrast", "brightness"):
                    result[f"colour_{name}_k1"] = round(float(row[name]), 4)
        return result


def _with_interval(table: pd.DataFrame) -> pd.DataFrame:
    n, correct = table["n"].to_numpy(), table["correct"].to_numpy()
    low, high = wilson_interval(correct, n)
    table = table.astype({"n": np.int64, "correct": np.int64})
    table["accuracy"] = correct / n
    table["accuracy_low"], table["accuracy_high"] = np.asarray(low, float), np.asarray(high, float)
    return table


def _load(blob: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------- Python API


@dataclass
class ITNResult:
    """What :func:`invariant_transformer` returns: the aggregate tables, the summary, the
    trained :class:`~invariscope.models.itn.InvariantTransformerNet` (on the CPU, in eval
    mode) and the run directory."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    itn: InvariantTransformerNet | None = None
    run_dir: Path | None = None
    figures: list[Path] = field(default_factory=list)


@renamed_arguments(steps="train_steps")
def invariant_transformer(
    model: nn.Module,
    test_set: Dataset,
    train_set: Dataset,
    *,
    train_steps: int = 400,
    save_every: int = 100,
    train_batch: int = 64,
    lr: float = 1e-3,
    tolerance: float = 0.9,
    c_theta: float = 1.0,
    controls: str | Sequence[str] = CONTROLS,
    hidden: int = 32,
    vectors: int = 16,
    grid: int = 5,
    sweep_points: int = 11,
    examples: int = 6,
    images: int | Sequence[int] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    **engine: Any,
) -> ITNResult:
    """Learn the transformations ``model`` is invariant to with an Invariant Transformer Net.

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    Runs :class:`ITNAnalysis` on the engine: the ITN trains on ``train_set`` in front of
    the frozen ``model`` (its parameters are never updated), then the learned family is
    evaluated on ``test_set`` (``images``: a seeded subset). Resumable with ``out``
    (from the last finished chunk of ``save_every`` steps).

    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> net = create_model("simple-cnn")
    >>> r = invariant_transformer(net, create_dataset("digits", "test"),
    ...     create_dataset("digits", "train"), train_steps=2, save_every=1, images=8, progress=False)
    >>> sorted(r.tables["accuracy"].columns)[:3]
    ['accuracy', 'accuracy_high', 'accuracy_low']
    """
    analysis = ITNAnalysis(
        train_set,
        steps=train_steps,
        save_every=save_every,
        train_batch=train_batch,
        lr=lr,
        tolerance=tolerance,
        c_theta=c_theta,
        controls=controls,
        hidden=hidden,
        vectors=vectors,
        grid=grid,
        sweep_points=sweep_points,
        examples=examples,
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
    itn = None
    if result.aggregated and result._store is not None:
        itn = analysis.build(seed)
        itn.load_state_dict(analysis.final_state(result._store)["itn"])
        itn.eval()
    return ITNResult(dict(result.aggregates), result.summary, itn, result.run_dir, result.figures)


register_analysis(
    AnalysisEntry(
        name="itn",
        analysis=ITNAnalysis,
        title="Invariant Transformer Net: learned invariances",
        paper=(
            "Bunne, Rahmann & Wolf 2018, Studying invariances of trained convolutional neural "
            "networks (strategy 2: the Invariant Transformer Net)"
        ),
        about=(
            "Two small nets map controls k1, k2 in [0, 1] to a spatial affine transformation "
            "(A_theta, normalised centred coordinates) and a colour affine transformation "
            "(A_phi, homogeneous); the image is colour-transformed, warped and fed to the "
            "FROZEN classifier. Each batch uses the classifier's loss when its accuracy is "
            "below acc_orig (tolerance x clean accuracy on the train split), else the loss "
            "-k ||A x - x||^2 that makes the transformations large: the result is a family "
            "of transformations, growing with k, that the classifier is nearly invariant to. "
            "Accuracies: 95% Wilson intervals."
        ),
        command="itn",
        report_tables=("clean", "learned_transforms", "accuracy", "k1_curve"),
        figures="invariscope.plots.itn:render_itn_run",
        demo="invariscope.demo:itn_stage",
        conformance=(
            "--data",
            "digits",
            "--train-steps",
            "4",
            "--save-every",
            "2",
            "--train-batch",
            "8",
            "--grid",
            "2",
            "--sweep-points",
            "3",
            "--examples",
            "2",
            "--images",
            "16",
            "--batch-size",
            "8",
        ),
        figure_order=("itn_training", "itn_k1_probabilities", "itn_examples"),
        bad_inputs=(
            (("--data", "digits", "--train-steps", "0"), "train-steps"),
            (("--data", "digits", "--controls", "spatial,shape"), "controls"),
            (("--data", "digits", "--tolerance", "2"), "tolerance"),
            (("--data", "digits", "--save-every", "0"), "save-every"),
        ),
    )
)
