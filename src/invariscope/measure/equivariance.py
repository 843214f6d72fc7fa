"""Learned equivariance maps and invariance by layer (Lenc & Vedaldi 2018, sections 5.1-5.3).

A representation ``phi`` (a network layer, or HOG) is *equivariant* to an image
transformation ``g`` when a map ``M_g`` exists with ``phi(x) ~ M_g phi(g^-1 x)``; it is
*invariant* when ``M_g`` needs to move the features only spatially (the permutation /
resampling ``P_g``), not mix the channels. This module learns ``M_g`` from training
images and measures it on held-out test images:

- **regression maps** (:mod:`invariscope.measure.equivariance_fit`): affine
  ``M_g = (A_g, b_g)`` by least squares, ridge or k-sparse forward selection (OMP),
  dense or with the paper's structured sparsity (an output cell is predicted from the
  ``m x m`` input cells nearest to its back-projection, all channels). The statistics
  (sums of ``x x'``, ``x y'``, ``x``, ``y``) are accumulated by parts over the training
  images, so they stream, resume and distribute; each fit is one job part;
- **transformation layers** (CNN layers): ``P_g`` (bilinear resampling at the
  back-projected positions through the warp core) followed by a bank of ``m x m``
  convolutions with biases, trained with Adam on ``g^-1 x`` with an l2 loss (optionally
  after a ReLU) or the task loss through the frozen rest of the network;
- **evaluation** on the test images, per (layer, transformation) and map
  (``none``: ``phi(g^-1 x)`` as it is, the identity map; ``permutation``: ``P_g``;
  ``regression``; ``tl``: the transformation layer):

  * reconstruction error: mean over cells and images of the per-cell distance between
    the mapped features and ``phi(x)``: Hellinger ``sqrt(sum_t (sqrt a_t - sqrt b_t)^2)``
    for HOG (mapped features clamped at 0 first), Euclidean over channels for network
    layers. ``baseline`` is the same distance to all-zero features (the mean per-cell
    norm of ``phi(x)``; for HOG ``sqrt(sum_t b_t)``) and ``relative = error / baseline``;
  * top-1 error of ``psi(phi(x))`` (original), ``psi(phi(g^-1 x))`` (``none``) and
    ``psi(M phi(g^-1 x))`` (each map), where ``psi`` is the network after the layer
    (the layer's output replaced by a forward hook), with 95% Wilson intervals;
  * recovered fraction ``(e_none - e_learned) / (e_none - e_original)`` and the
    **invariance flag**: a layer is invariant to ``g`` when ``P_g`` (identity on the
    channels) does as well as the learned map: ``e_permutation <=`` the upper end of the
    learned map's 95% interval. ``invariant_identity`` is the same test for the identity
    map with no spatial move at all (``e_none``).

Conventions: images ``[B, C, H, W]`` in ``[0, 1]``; transformations from the registry
with zero fill; ``g^-1 x`` is the registry function at the inverse magnitude (exact for
flips and rot90). Everything runs in float32 except the statistics and the solves
(float64, stored maps float32).
"""

from __future__ import annotations

import logging
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
from invariscope.measure._present import ci, fmt, pct
from invariscope.measure._present import pivot as tidy_pivot
from invariscope.measure.aggregate import wilson_interval
from invariscope.measure.alignment import feature_geometries
from invariscope.measure.equivariance_fit import (
    METHODS,
    EquivTransform,
    FeatureGeometry,
    FittedMap,
    Statistics,
    TransformationLayer,
    accumulate,
    apply_map,
    back_projection,
    cells,
    fit_map,
    gather,
    hellinger_per_cell,
    l2_loss,
    l2_per_cell,
    layer_geometry,
    load_state,
    neighbourhoods,
    parse_transforms,
    resample_features,
    stat_entries,
    state_bytes,
    targets,
)
from invariscope.measure.stitch import _frozen, _seed, capture_layer, stitched_logits
from invariscope.models.capture import ActivationCapture, resolve_layer
from invariscope.models.geometry import Layout, from_map, to_map
from invariscope.models.hog import HOG

__all__ = ["EquivarianceAnalysis", "EquivarianceResult", "equivariance"]

MAPS = ("none", "permutation", "regression", "tl")
TL_LOSSES = ("l2", "l2-relu", "task")
PART_TABLES = ("stats", "fit", "tl", "recon", "task", "base")
AGGREGATE_TABLES = (
    "reconstruction",
    "invariance",
    "invariance_summary",
    "models",
    "fits",
    "layers",
    "transforms",
)
log = logging.getLogger(__name__)

#: Largest statistics set (float64 numbers) of one (layer, transformation).
MAX_STAT_ENTRIES = 2**25

#: Largest neighbourhood size of the structured maps fitted by default to layers whose
#: dense map is too large (Lenc & Vedaldi 2018, Sect. 5.1: m = 3 was their best setting);
#: smaller odd sizes (down to 1) where the statistics of m = 3 do not fit.
AUTO_STRUCTURED = 3
#: The reported ``final_loss`` of a transformation layer is the mean of the last this many steps.
FINAL_STEPS = 10


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise InvariscopeError(
            f"{hint(name.replace('-', '_'), '--' + name)} must be an integer >= {low}, got {value!r}"
        )
    return int(value)


def _positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 and math.isfinite(value))
    ):
        raise InvariscopeError(
            f"{hint(name.replace('-', '_'), '--' + name)} must be a positive number, got {value!r}"
        )
    return float(value)


class EquivarianceAnalysis(Analysis):
    """Learned equivariance maps of layers (or HOG) and invariance by layer, on the engine.

    Data: ``"data"`` is the TEST split (maps are evaluated on its selected images); the
    training split the maps learn from is given here. Model: ``"model"``, a classifier
    of the data, unless ``hog`` is given (then no model: HOG features, reconstruction only).

    Stages and parts:

    0. ``stats-<b>`` (job parts, when ``method`` is not ``"none"``): training images
       ``[b s, (b + 1) s)`` of a seeded subset of ``train_images``; per (layer,
       transformation) the sums of the regression, blob ``s<layer>t<transform>``;
    1. ``fit-<l>-<t>``: sums every stats part's blob, fits ``M_g`` (blob ``map``,
       table ``fit``); ``tl-<l>-<t>`` (with ``transformation_layer``): trains a
       transformation layer (blob ``tl``, table ``tl``);
    2. ``eval-<b>`` (batch parts on the test images): tables ``recon``, ``task``, ``base``.

    Args:
        train_set: the training split.
        transforms: e.g. ``"hflip,vflip,rot90,zoom=0.5,rotation=45"`` or a list.
        layers: layers with 4-D outputs (default: every such layer of ``layer_names``).
        hog: a :class:`~invariscope.models.hog.HOG` to map HOG features instead of layers.
        method: ``"lsq"``, ``"ridge"``, ``"omp"`` or ``"none"`` (no regression map).
        structured: neighbourhood size ``m`` of structured sparsity. None: a dense map
            where its statistics fit (:data:`MAX_STAT_ENTRIES`), else structured with
            ``m =`` :data:`AUTO_STRUCTURED` (the paper's structured maps for convolutional
            layers), said in a warning and recorded per layer (``structured_layers``).
        ridge: ridge strength relative to the mean input variance; k: OMP non-zeros per output.
        train_images: training images for the regression statistics (default min(1000, all)).
        stats_batch: training images per statistics part.
        transformation_layer: ``"l2"``, ``"l2-relu"``, ``"task"`` or None.
        kernel_size: odd ``m`` of the transformation layer's convolutions; steps, lr,
        train_batch: its Adam steps, learning rate and images per step.
    """

    name = "equivariance"
    grad = True
    classifier = True
    part_tables = PART_TABLES
    aggregate_tables = AGGREGATE_TABLES

    def __init__(
        self,
        train_set: Dataset,
        transforms: str | Sequence[str] = "hflip,vflip,rot90,zoom=0.5,rotation=45",
        layers: Sequence[str] | None = None,
        *,
        hog: HOG | None = None,
        method: str = "ridge",
        structured: int | None = None,
        ridge: float = 1e-3,
        k: int = 5,
        train_images: int | None = None,
        stats_batch: int = 256,
        transformation_layer: str | None = None,
        kernel_size: int = 3,
        steps: int = 300,
        lr: float = 1e-3,
        train_batch: int = 64,
    ) -> None:
        if train_set is None:
            raise InvariscopeError(
                "equivariance maps need a training split to learn from; pass "
                + hint("train_set=...", "--data with a train split")
            )
        self.train_set = train_set
        self.transforms: list[EquivTransform] = parse_transforms(transforms)
        self.hog = hog
        if hog is not None:
            self.models = ()
            self.classifier = False
            if layers is not None and list(layers) not in (["hog"], []):
                raise InvariscopeError(
                    "HOG has no layers; leave out " + hint("layers", "--layers") + " with HOG"
                )
            self.layers: list[str] | None = ["hog"]
        else:
            self.layers = None if layers is None else [str(n) for n in layers]
            if self.layers is not None and not self.layers:
                raise InvariscopeError(
                    f"{hint('layers', '--layers')} is empty; name at least one layer"
                )
            if self.layers is not None and len(set(self.layers)) != len(self.layers):
                raise InvariscopeError(f"a layer is listed twice: {', '.join(self.layers)}")
        if method not in (*METHODS, "none"):
            raise InvariscopeError(
                f"unknown {hint('method', '--method')} '{method}'; use one of "
                f"{', '.join((*METHODS, 'none'))}"
            )
        self.method = method
        self.structured = None if structured is None else _int("structured", structured, 1)
        self.ridge = _positive("ridge", ridge)
        self.k = _int("k", k, 1)
        self.train_images = None if train_images is None else _int("train-images", train_images, 2)
        self.stats_batch = _int("stats-batch", stats_batch, 1)
        if transformation_layer is not None and transformation_layer not in TL_LOSSES:
            raise InvariscopeError(
                f"unknown {hint('transformation_layer', '--transformation-layer')} loss "
                f"'{transformation_layer}'; use one of {', '.join(TL_LOSSES)}"
            )
        if transformation_layer is not None and hog is not None:
            raise InvariscopeError(
                "transformation layers are for network layers; with HOG use a regression "
                "method only"
            )
        if method == "none" and transformation_layer is None:
            raise InvariscopeError(
                f"nothing to learn: {hint('method', '--method')} is 'none' and no "
                f"{hint('transformation_layer', '--transformation-layer')} is asked for"
            )
        self.tl = transformation_layer
        self.kernel_size = _int("kernel-size", kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise InvariscopeError(
                f"{hint('kernel_size', '--kernel-size')} must be odd (1, 3, 5...), got {kernel_size}"
            )
        self.steps = _int("train-steps", steps, 1)
        self.lr = _positive("lr", lr)
        self.train_batch = _int("train-batch", train_batch, 1)
        self.geometry: dict[str, FeatureGeometry] = {}
        self.layouts: dict[str, Layout] = {}  # token / channels-last layers: their grid
        self.index: dict[tuple[int, int], np.ndarray | None] = {}
        self.back: dict[tuple[int, int], np.ndarray] = {}
        self.image_hw: tuple[int, int] = (0, 0)
        self.n_train = 0
        self._maps: dict[str, Any] = {}

    # -- checks
    def check(self, ctx) -> None:
        x, _ = ctx.datasets["data"][int(ctx.indices["data"][0])][:2]
        x = torch.as_tensor(x)[None].to(ctx.device)
        H, W = int(x.shape[-2]), int(x.shape[-1])
        self.image_hw = (H, W)
        self._maps = {}  # fitted maps are read afresh from this run's parts
        for t in self.transforms:
            if t.name == "rot90" and int(round(t.magnitude)) % 2 and H != W:
                raise InvariscopeError(f"'{t.label}' needs square images, got {H}x{W}")
        if self.hog is None:
            with torch.no_grad():  # the model must fit the data before layers are looked at
                check_logits(ctx.models["model"](x), 1, ctx.num_classes, "on the first image")
        self._check_train(ctx, x)
        n = len(self.train_set)
        if self.train_images is not None and self.train_images > n:
            raise InvariscopeError(
                f"{hint('train_images', '--train-images')} is {self.train_images} but the "
                f"training split has {n} images; ask for at most {n}"
            )
        self.n_train = self.train_images if self.train_images is not None else min(1000, n)
        if self.method != "none" and self.n_train < 2:
            raise InvariscopeError("the training split needs at least 2 images to fit a map")
        default_layers = self.layers is None
        shapes = self._shapes(ctx, x)
        self.geometry = {}
        model = None if self.hog is not None else ctx.models["model"]
        for name, shape in shapes.items():
            if self.hog is not None:
                s, o = self.hog.cell_centre()
                self.geometry[name] = FeatureGeometry(shape[0], shape[1], shape[2], (s, s), (o, o))
            else:
                self.geometry[name] = layer_geometry(model, name, (H, W), shape)
        self.index, self.back = {}, {}
        self.layer_structured: dict[str, int | None] = {}
        self._auto_structured: list[str] = []
        too_big = []
        for name in self.layers:
            try:
                self.layer_structured[name] = self._neighbourhood(name, self.geometry[name])
            except InvariscopeError:
                if not default_layers:
                    raise
                too_big.append(name)
        if too_big:  # by default, layers too large for any map are left out (said once)
            if len(too_big) == len(self.layers):
                raise InvariscopeError(
                    f"the regression statistics of every layer would exceed "
                    f"{MAX_STAT_ENTRIES:,} numbers, even with 1x1 structured maps; use a "
                    "transformation layer alone (--method none --transformation-layer l2) or "
                    "smaller images"
                )
            log.warning(
                "equivariance: layer(s) %s left out: their regression statistics would exceed "
                "%s numbers even with 1x1 structured maps (a transformation layer alone, "
                "--method none, can map them)",
                ", ".join(too_big),
                f"{MAX_STAT_ENTRIES:,}",
            )
            self.layers = [n for n in self.layers if n not in too_big]
        for li, name in enumerate(self.layers):
            geom = self.geometry[name]
            m = self.layer_structured[name]
            for ti, t in enumerate(self.transforms):
                back = back_projection(geom, geom, t, H, W)
                self.back[(li, ti)] = back
                if m is not None:
                    self.index[(li, ti)] = neighbourhoods(back, geom, geom, m)
                else:
                    self.index[(li, ti)] = None
        if self._auto_structured:
            log.warning(
                "equivariance: dense maps of %d layer(s) would exceed %s numbers, so they get "
                "structured maps (each cell from the m x m cells around its back-projection, "
                "Lenc & Vedaldi Sect. 5.1): %s; set --structured to choose",
                len(self._auto_structured),
                f"{MAX_STAT_ENTRIES:,}",
                ", ".join(self._auto_structured),
            )

    def _neighbourhood(self, name: str, geom) -> int | None:
        """The structured-sparsity size ``m`` of layer ``name`` (None: a dense map)."""
        m = self.structured
        if self.method == "none":
            return m
        c, p = geom.channels, geom.cells
        dense = stat_entries(1, p * c, p * c)
        if m is None and dense > MAX_STAT_ENTRIES:
            fits = [
                n
                for n in range(AUTO_STRUCTURED, 0, -2)
                if stat_entries(p, n**2 * c, c) <= MAX_STAT_ENTRIES
            ]
            m = fits[0] if fits else 1
            auto = f"{name} ({c}x{geom.height}x{geom.width}): m = {m}"
        else:
            auto = None
        size = dense if m is None else stat_entries(p, m**2 * c, c)
        if size > MAX_STAT_ENTRIES:
            raise InvariscopeError(
                f"the regression statistics of layer '{name}' ({c}x{geom.height}x"
                f"{geom.width}) would hold {size:,} numbers (limit {MAX_STAT_ENTRIES:,}); "
                f"use {hint('structured=M', '--structured M')} with a small M, a "
                "smaller layer, or a transformation layer with method 'none'"
            )
        if auto is not None:
            self._auto_structured.append(auto)
        return m

    def _check_train(self, ctx, x: torch.Tensor) -> None:
        if len(self.train_set) == 0:
            raise InvariscopeError("the training split is empty; check --data and its train split")
        image = torch.as_tensor(self.train_set[0][0])
        if tuple(image.shape) != tuple(x.shape[1:]):
            raise InvariscopeError(
                f"training images are {list(image.shape)} but test images are "
                f"{list(x.shape[1:])}; use the two splits of one dataset"
            )
        classes = getattr(self.train_set, "classes", None)
        if classes is not None and len(classes) != ctx.num_classes:
            raise InvariscopeError(
                f"the training split has {len(classes)} classes but the test data has "
                f"{ctx.num_classes}; use the two splits of one dataset"
            )

    def _shapes(self, ctx, x: torch.Tensor) -> dict[str, tuple[int, int, int]]:
        if self.hog is not None:
            cy, cx = self.hog.grid(int(x.shape[-2]), int(x.shape[-1]))
            return {"hog": (self.hog.orientations, cy, cx)}
        model = ctx.models["model"]
        if self.layers is None:
            names = list(getattr(model, "layer_names", []))
        else:
            names = list(self.layers)
            for name in names:
                resolve_layer(model, name)  # unknown layer -> error listing the known ones
        with torch.no_grad(), ActivationCapture(model, names) as cap:
            model(x)
        shapes = {}
        self.layouts = {}
        odd = [
            n
            for n in names
            if isinstance(cap.activations.get(n), torch.Tensor) and cap.activations[n].ndim != 4
        ]
        geos = feature_geometries(model, odd, tuple(x.shape[-2:])) if odd else {}
        for name in names:
            out = cap.activations.get(name)
            geo = geos.get(name)
            if geo is not None:  # tokens [B, N, D] (a ViT) or channels-last: a grid all the same
                self.layouts[name] = geo.layout
                out = to_map(out, geo.layout, geo.grid.size)
            ok = isinstance(out, torch.Tensor) and out.ndim == 4
            if ok:
                shapes[name] = tuple(int(s) for s in out.shape[1:])
            elif self.layers is not None:
                got = list(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InvariscopeError(
                    f"layer '{name}' gives {got}, not a feature map [C, H, W]; equivariance maps "
                    "need spatial layers (e.g. conv or pool layers)"
                )
        if not shapes:
            raise InvariscopeError(
                "the model has no layer with a 4-D output; name one with --layers"
            )
        self.layers = list(shapes)
        return shapes

    # -- configuration and planning
    def config(self) -> dict[str, Any]:
        return {
            "representation": "hog" if self.hog is not None else "layers",
            "hog": None if self.hog is None else self.hog.config(),
            "layers": self.layers,
            "transforms": [t.label for t in self.transforms],
            "method": self.method,
            "structured": self.structured,
            "structured_layers": {
                n: m or 0 for n, m in getattr(self, "layer_structured", {}).items()
            },
            "ridge": self.ridge,
            "k": self.k,
            "train_images": self.n_train or self.train_images,
            "stats_batch": self.stats_batch,
            "transformation_layer": self.tl,
            "kernel_size": self.kernel_size,
            "steps": self.steps,
            "lr": self.lr,
            "train_batch": self.train_batch,
            "train_data": {
                "name": getattr(self.train_set, "name", type(self.train_set).__name__),
                "fingerprint": getattr(self.train_set, "fingerprint", None),
                "size": len(self.train_set),
            },
        }

    def work(self, ctx) -> int:
        n, T, L = len(ctx.indices["data"]), len(self.transforms), len(self.layers or [])
        train = self.n_train * (1 + T) if self.method != "none" else 0
        tl = L * T * self.steps * self.train_batch * 2 if self.tl else 0
        return train + tl + n * (1 + T) + n * T * L * 3

    def _stats_parts(self) -> list[str]:
        if self.method == "none":
            return []
        count = math.ceil(self.n_train / self.stats_batch)
        return [part_id("stats", b) for b in range(count)]

    def plan(self, ctx) -> list[Part]:
        parts = [Part(pid, stage=0, key=("stats", b)) for b, pid in enumerate(self._stats_parts())]
        for li in range(len(self.layers)):
            for ti in range(len(self.transforms)):
                if self.method != "none":
                    parts.append(Part(part_id("fit", li, ti), stage=1, key=("fit", li, ti)))
                if self.tl is not None:
                    parts.append(Part(part_id("tl", li, ti), stage=1, key=("tl", li, ti)))
        parts += [
            Part(part_id("eval", b), stage=2, batch=b) for b in range(len(ctx.batches["data"]))
        ]
        return parts

    # -- helpers
    def _train_indices(self, seed: int) -> np.ndarray:
        g = torch.Generator().manual_seed(_seed(seed, 7919))
        return torch.randperm(len(self.train_set), generator=g)[: self.n_train].numpy()

    def _features(self, ctx, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.hog is not None:
            return {"hog": self.hog(images)}
        model = ctx.models["model"]
        with ActivationCapture(model, self.layers) as cap:
            model(images)
        out = {}
        for n in self.layers:
            act = cap.activations[n].detach().float()
            layout = self.layouts.get(n)
            out[n] = (
                act
                if layout is None
                else to_map(act, layout, (self.geometry[n].height, self.geometry[n].width))
            )
        return out

    def _as_map(self, name: str, act: torch.Tensor) -> torch.Tensor:
        layout = self.layouts.get(name)
        if layout is None:
            return act
        return to_map(act, layout, (self.geometry[name].height, self.geometry[name].width))

    def _replacement(self, name: str, pred: torch.Tensor) -> Any:
        """What replaces layer ``name``'s output in a stitched forward: the map itself, or
        for a token layer a function putting the map back among the layer's own tokens."""
        layout = self.layouts.get(name)
        if layout is None:
            return pred
        return lambda output: from_map(pred, layout, output)

    def _forward_map(self, li: int, ti: int) -> np.ndarray:
        """P_g's forward map in cell coordinates (the inverse of the back-projection)."""
        return np.linalg.inv(self.back[(li, ti)])

    # -- computing
    def compute(self, part: Part, ctx, batch: Batch | None) -> dict[str, pd.DataFrame] | PartOutput:
        if part.batch is not None:
            with torch.no_grad():
                return self._evaluate(ctx, batch)
        kind = part.key[0]
        if kind == "stats":
            with torch.no_grad():
                return self._stats(ctx, part.key[1])
        if kind == "fit":
            return self._fit(ctx, *part.key[1:])
        return self._train_tl(ctx, *part.key[1:])

    def _stats(self, ctx, b: int) -> PartOutput:
        chunk = self._train_indices(ctx.seed)[b * self.stats_batch : (b + 1) * self.stats_batch]
        blobs: dict[str, Statistics] = {}
        n = 0
        for _, x, _, _ in iter_index_batches(self.train_set, [chunk], num_workers=ctx.num_workers):
            x = x.to(ctx.device)
            n += int(x.shape[0])
            phi_x = self._features(ctx, x)
            for ti, t in enumerate(self.transforms):
                phi_z = self._features(ctx, t.apply_inverse(x))
                for li, name in enumerate(self.layers):
                    index = self.index[(li, ti)]
                    s = accumulate(
                        gather(cells(phi_z[name]), index),
                        targets(cells(phi_x[name]), index is not None),
                    )
                    key = f"s{li}t{ti}"
                    blobs[key] = blobs[key] + s if key in blobs else s
        table = pd.DataFrame({"part": [b], "n": [n]}).astype({"part": np.int64, "n": np.int64})
        return PartOutput({"stats": table}, {k: v.to_bytes() for k, v in blobs.items()})

    def _fit(self, ctx, li: int, ti: int) -> PartOutput:
        total: Statistics | None = None
        for pid in self._stats_parts():
            s = Statistics.from_bytes(ctx.results.read_blob(pid, f"s{li}t{ti}"))
            total = s if total is None else total + s
        fitted = fit_map(total, self.method, ridge=self.ridge, k=self.k, index=self.index[(li, ti)])
        table = pd.DataFrame(
            {
                "layer": [self.layers[li]],
                "order": np.array([li], dtype=np.int64),
                "transform": [self.transforms[ti].label],
                "method": [self.method],
                "structured": np.array(
                    [self.layer_structured[self.layers[li]] or 0], dtype=np.int64
                ),
                "n_train": np.array([total.n], dtype=np.int64),
                "coefficients": np.array([fitted.A.size], dtype=np.int64),
                "nonzeros": np.array([fitted.nonzeros()], dtype=np.int64),
            }
        )
        return PartOutput({"fit": table}, {"map": fitted.to_bytes()})

    def _tl_module(self, li: int, ti: int) -> TransformationLayer:
        geom = self.geometry[self.layers[li]]
        return TransformationLayer(geom.channels, self._forward_map(li, ti), self.kernel_size)

    def _tl_batches(self, seed: int) -> list[list[int]]:
        return epoch_batches(len(self.train_set), self.steps, self.train_batch, seed)

    def _train_tl(self, ctx, li: int, ti: int) -> PartOutput:
        layer, t = self.layers[li], self.transforms[ti]
        model = ctx.models["model"]
        tl = self._tl_module(li, ti).to(ctx.device)
        opt = torch.optim.Adam(tl.parameters(), lr=self.lr)
        seed = _seed(ctx.seed, 104729, li, ti)
        losses: list[float] = []
        restore = _frozen([model])
        try:
            with torch.enable_grad():
                tl.train()
                for _, x, y, _ in iter_index_batches(
                    self.train_set, self._tl_batches(seed), num_workers=ctx.num_workers
                ):
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    z = t.apply_inverse(x)
                    with torch.no_grad():
                        phi_z = self._as_map(layer, capture_layer(model, layer, z))
                    out = tl(phi_z)
                    if self.tl == "task":
                        logits = stitched_logits(model, layer, z, self._replacement(layer, out))
                        loss = F.cross_entropy(logits, y)
                    else:
                        with torch.no_grad():
                            phi_x = self._as_map(layer, capture_layer(model, layer, x))
                        loss = l2_loss(out, phi_x, relu=self.tl == "l2-relu")
                    what = f"the transformation layer of {layer} for {t.label}"
                    losses.append(optimiser_step(opt, loss, what))
        finally:
            restore()
        tl.eval()
        table = pd.DataFrame(
            {
                "layer": [layer],
                "order": np.array([li], dtype=np.int64),
                "transform": [t.label],
                "loss": [self.tl],
                "steps": np.array([self.steps], dtype=np.int64),
                "final_loss": np.array([float(np.mean(losses[-FINAL_STEPS:]))], dtype=np.float64),
            }
        )
        return PartOutput({"tl": table}, {"tl": state_bytes(tl)})

    def _map(self, ctx, kind: str, li: int, ti: int):
        key = f"{kind}-{li}-{ti}"
        if key not in self._maps:
            data = ctx.results.read_blob(part_id(kind, li, ti), "map" if kind == "fit" else "tl")
            if kind == "fit":
                self._maps[key] = FittedMap.from_bytes(data)
            else:
                self._maps[key] = load_state(self._tl_module(li, ti), data).to(ctx.device).eval()
        return self._maps[key]

    def _evaluate(self, ctx, batch: Batch) -> dict[str, pd.DataFrame]:
        x, y = batch.x, batch.y
        n = int(x.shape[0])
        hog = self.hog is not None
        distance = hellinger_per_cell if hog else l2_per_cell
        model = None if hog else ctx.models["model"]
        recon, task = [], []
        tables: dict[str, pd.DataFrame] = {}
        if not hog:
            correct = int((model(x).argmax(1) == y).sum())
            tables["base"] = pd.DataFrame({"n": [n], "correct": [correct]}).astype(np.int64)
        phi_x = self._features(ctx, x)
        for ti, t in enumerate(self.transforms):
            z = t.apply_inverse(x)
            phi_z = self._features(ctx, z)
            none_correct = None if hog else int((model(z).argmax(1) == y).sum())
            for li, name in enumerate(self.layers):
                target = phi_x[name]
                preds = {"none": phi_z[name]}
                preds["permutation"] = resample_features(phi_z[name], self._forward_map(li, ti))
                if self.method != "none":
                    preds["regression"] = apply_map(
                        self._map(ctx, "fit", li, ti), phi_z[name], target.shape[1:]
                    )
                if self.tl is not None:
                    preds["tl"] = self._map(ctx, "tl", li, ti)(phi_z[name])
                norm = float(distance(torch.zeros_like(target), target).double().sum())
                for kind, pred in preds.items():
                    err = distance(pred.float(), target)
                    recon.append(
                        (
                            name,
                            li,
                            t.label,
                            ti,
                            kind,
                            int(err.numel()),
                            float(err.double().sum()),
                            norm,
                        )
                    )
                    if hog:
                        continue
                    if kind == "none":
                        c = none_correct
                    else:
                        logits = stitched_logits(
                            model, name, z, self._replacement(name, pred.float())
                        )
                        c = int((logits.argmax(1) == y).sum())
                    task.append((name, li, t.label, ti, kind, n, c))
        tables["recon"] = pd.DataFrame(
            recon,
            columns=[
                "layer",
                "order",
                "transform",
                "transform_order",
                "map",
                "cells",
                "sum_error",
                "sum_norm",
            ],
        ).astype({"order": np.int64, "transform_order": np.int64, "cells": np.int64})
        if not hog:
            tables["task"] = pd.DataFrame(
                task,
                columns=["layer", "order", "transform", "transform_order", "map", "n", "correct"],
            ).astype({c: np.int64 for c in ("order", "transform_order", "n", "correct")})
        return tables

    # -- aggregating
    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        r = ctx.results
        keys = ["order", "layer", "transform_order", "transform", "map"]
        rec = (
            r.read_table("recon").groupby(keys, sort=True)[["cells", "sum_error", "sum_norm"]].sum()
        )
        rec = rec.reset_index()
        rec["error"] = rec["sum_error"] / rec["cells"]
        rec["baseline"] = rec["sum_norm"] / rec["cells"]
        rec["relative"] = rec["error"] / rec["baseline"].where(rec["baseline"] > 0)
        out = {
            "reconstruction": rec[
                [
                    "layer",
                    "order",
                    "transform",
                    "transform_order",
                    "map",
                    "error",
                    "baseline",
                    "relative",
                    "cells",
                ]
            ].reset_index(drop=True)
        }
        fits = [_optional(r, "fit"), _optional(r, "tl")]
        fit_rows = []
        for table, kind in zip(fits, ("regression", "tl"), strict=True):
            if len(table):
                t = table.copy()
                t.insert(0, "map", kind)
                fit_rows.append(t)
        out["fits"] = (
            pd.concat(fit_rows, ignore_index=True).sort_values(
                ["map", "order", "transform"], kind="stable"
            )
            if fit_rows
            else pd.DataFrame({"map": [], "layer": [], "transform": []})
        ).reset_index(drop=True)
        out["layers"] = pd.DataFrame(
            [
                (
                    name,
                    li,
                    g.channels,
                    g.height,
                    g.width,
                    float(g.stride[1]),
                    float(g.stride[0]),
                    float(g.offset[1]),
                    float(g.offset[0]),
                )
                for li, (name, g) in enumerate((n, self.geometry[n]) for n in self.layers)
            ],
            columns=[
                "layer",
                "order",
                "channels",
                "height",
                "width",
                "stride_x",
                "stride_y",
                "offset_x",
                "offset_y",
            ],
        ).astype({"order": np.int64, "channels": np.int64, "height": np.int64, "width": np.int64})
        out["transforms"] = pd.DataFrame(
            {
                "transform": [t.label for t in self.transforms],
                "transform_order": np.arange(len(self.transforms), dtype=np.int64),
                "name": [t.name for t in self.transforms],
                "magnitude": [t.magnitude for t in self.transforms],
            }
        )
        if self.hog is None:
            base = r.read_table("base")
            n, correct = int(base["n"].sum()), int(base["correct"].sum())
            low, high = wilson_interval(n - correct, n)
            original = 1.0 - correct / n
            out["models"] = pd.DataFrame(
                {
                    "error": [original],
                    "error_low": [float(low)],
                    "error_high": [float(high)],
                    "n": [n],
                }
            ).astype({"n": np.int64})
            task = (
                r.read_table("task").groupby(keys, sort=True)[["n", "correct"]].sum().reset_index()
            )
            wrong = (task["n"] - task["correct"]).to_numpy()
            low, high = wilson_interval(wrong, task["n"].to_numpy())
            task["error"] = wrong / task["n"]
            task["error_low"], task["error_high"] = np.asarray(low, float), np.asarray(high, float)
            out["invariance"] = task[
                [
                    "layer",
                    "order",
                    "transform",
                    "transform_order",
                    "map",
                    "error",
                    "error_low",
                    "error_high",
                    "n",
                ]
            ]
            out["invariance_summary"] = _summary_table(task, original)
        return out

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        inv = aggregates.get("invariance_summary") if "invariance_summary" in aggregates else None
        models = aggregates.get("models") if "models" in aggregates else None
        if inv is None or not len(inv) or models is None or not len(models):
            rec = summary.get("mean_relative_error")
            if isinstance(rec, dict) and rec:
                return (
                    f"Mean relative reconstruction error of the feature maps on "
                    f"{summary.get('num_images')} images: "
                    + ", ".join(f"{k} map {fmt(v)}" for k, v in rec.items())
                    + "."
                )
            return super().headline(summary, aggregates, config)
        m = models.iloc[0]
        shown = inv if len(inv) <= 6 else inv.nsmallest(6, "recovered")
        pairs = "; ".join(
            f"{r.layer}/{r.transform} {fmt(r.error_none)} -> {fmt(r.error_learned)}"
            for r in shown.itertuples(index=False)
        )
        which = "" if len(shown) == len(inv) else f" (the {len(shown)} least recovered pairs)"
        text = (
            f"Top-1 error on g^-1 x ({summary.get('num_images')} images), no map -> learned "
            f"map M_g{which}: {pairs}; on the original images "
            f"{ci(m.error, m.error_low, m.error_high)} (95% interval)."
        )
        recovered = inv["recovered"].dropna()
        if len(recovered):
            text += (
                f" The learned maps recover {pct(recovered.mean())} of the lost accuracy on "
                f"average; {int(inv['invariant'].sum())} of {len(inv)} (layer, transformation) "
                "pairs are invariant (a permutation of the maps does as well)."
            )
        return text

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        out: dict[str, pd.DataFrame] = {}

        def pivot(table: pd.DataFrame, columns: str, value: str) -> pd.DataFrame:
            p = tidy_pivot(
                table.sort_values("order", kind="stable"), ["order", "layer"], columns, value
            )
            p.index = pd.Index(p.index.get_level_values("layer"), name="layer")
            p.columns.name = None
            return p

        inv = aggregates.get("invariance_summary") if "invariance_summary" in aggregates else None
        if inv is not None and len(inv):
            out["Top-1 error on g^-1 x with the learned map M_g (layer x transformation)"] = pivot(
                inv, "transform", "error_learned"
            )
            out["Top-1 error on g^-1 x with no map (layer x transformation)"] = pivot(
                inv, "transform", "error_none"
            )
            out[
                "Fraction of the lost accuracy the learned map recovers (layer x transformation)"
            ] = pivot(inv, "transform", "recovered")
        rec = aggregates.get("reconstruction") if "reconstruction" in aggregates else None
        if rec is not None and len(rec):
            rec = rec.assign(
                column=[f"{t} / {m}" for t, m in zip(rec["transform"], rec["map"], strict=True)]
            )
            out[
                "Relative reconstruction error of the feature maps (layer x transformation / map)"
            ] = pivot(rec, "column", "relative")
        return out

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        rec = aggregates["reconstruction"]
        result: dict[str, Any] = {"num_images": int(len(ctx.indices["data"]))}
        means = rec.groupby("map")["relative"].mean()
        result["mean_relative_error"] = {k: round(float(v), 6) for k, v in means.items()}
        if "models" in aggregates:
            result["error_original"] = round(float(aggregates["models"]["error"].iloc[0]), 6)
            s = aggregates["invariance_summary"]
            result["invariant_pairs"] = int(s["invariant"].sum())
            result["mean_recovered"] = (
                round(float(s["recovered"].mean()), 6) if s["recovered"].notna().any() else None
            )
        return result


def _summary_table(task: pd.DataFrame, original: float) -> pd.DataFrame:
    """Per (layer, transformation): the errors of each map, the learned map (``tl`` if
    trained, else ``regression``), the recovered fraction and the invariance flags."""
    rows = []
    for (order, layer, to, transform), sub in task.groupby(
        ["order", "layer", "transform_order", "transform"], sort=True
    ):
        by = sub.set_index("map")
        learned = "tl" if "tl" in by.index else "regression"
        e = {m: float(by.loc[m, "error"]) if m in by.index else math.nan for m in MAPS}
        hi = float(by.loc[learned, "error_high"])
        lost = e["none"] - original
        rows.append(
            {
                "layer": layer,
                "order": order,
                "transform": transform,
                "transform_order": to,
                "error_original": original,
                "error_none": e["none"],
                "error_permutation": e["permutation"],
                "error_regression": e["regression"],
                "error_tl": e["tl"],
                "learned": learned,
                "error_learned": e[learned],
                "error_learned_high": hi,
                "recovered": (e["none"] - e[learned]) / lost if lost > 0 else math.nan,
                "invariant": bool(e["permutation"] <= hi),
                "invariant_identity": bool(e["none"] <= hi),
            }
        )
    return pd.DataFrame(rows).astype({"order": np.int64, "transform_order": np.int64})


def _optional(results, name: str) -> pd.DataFrame:
    return results.read_table(name) if name in results.tables() else pd.DataFrame()


# ------------------------------------------------------------------------- Python API


@dataclass
class EquivarianceResult:
    """What :func:`equivariance` returns: the reconstruction table, the invariance
    summary (None for HOG), all aggregate tables and the run directory."""

    reconstruction: pd.DataFrame
    invariance_summary: pd.DataFrame | None
    tables: dict[str, pd.DataFrame]
    run_dir: Path | None = None


def with_magnitudes(
    transforms: str | Sequence[str],
    magnitudes: Mapping[str, float | Sequence[float]],
    *,
    command_line: bool = False,
) -> list[str]:
    """``transforms`` with the ``magnitudes`` of its names written in, one ``NAME=V`` item
    per value (``equivariance(..., magnitudes=...)`` and ``--magnitudes``; the errors speak
    the command line's words when ``command_line``)."""
    names = (
        [t.strip() for t in transforms.split(",")]
        if isinstance(transforms, str)
        else list(transforms)
    )
    names = [n for n in names if n]
    plain = {n.partition("=")[0].strip() for n in names}
    extra = sorted(set(magnitudes) - plain)
    if extra:
        listed, known = ", ".join(extra), ", ".join(sorted(plain))
        raise InvariscopeError(
            f"--magnitudes names {listed}, which is not among --transforms ({known}); add it "
            "to --transforms"
            if command_line
            else f"magnitudes for {listed}, which is not among the transforms ({known}); add "
            "it to the transforms"
        )
    items: list[str] = []
    for name in names:
        if name not in magnitudes:
            if "=" in name and name.partition("=")[0].strip() in magnitudes:
                raise InvariscopeError(
                    f"'{name}': give the magnitude once, with --magnitudes"
                    if command_line
                    else f"'{name}': give its magnitude once"
                )
            items.append(name)
            continue
        values = magnitudes[name]
        values = [values] if isinstance(values, int | float) else list(values)
        items.extend(f"{name}={float(v):.12g}" for v in values)
    return items


@renamed_arguments(steps="train_steps")
def equivariance(
    model: nn.Module | HOG | str,
    test_set: Dataset,
    train_set: Dataset,
    transforms: str | Sequence[str] = "hflip,vflip,rot90,zoom=0.5,rotation=45",
    *,
    magnitudes: Mapping[str, float | Sequence[float]] | None = None,
    layers: Sequence[str] | None = None,
    method: str = "ridge",
    structured: int | None = None,
    ridge: float = 1e-3,
    k: int = 5,
    train_images: int | None = None,
    stats_batch: int = 256,
    transformation_layer: str | None = None,
    kernel_size: int = 3,
    train_steps: int = 300,
    lr: float = 1e-3,
    train_batch: int = 64,
    images: int | Sequence[int] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    **engine: Any,
) -> EquivarianceResult:
    """Learn equivariance maps of ``model``'s layers (or of HOG: ``model="hog"`` or a
    :class:`HOG`) on ``train_set`` and evaluate them on ``test_set``; see
    :class:`EquivarianceAnalysis`. Resumable with ``out``.

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    ``magnitudes``: ``{name: value or values}`` for names in ``transforms``, one map per
    value (``{"rotation": [15, 45]}`` is ``"rotation=15,rotation=45"``).

    >>> from invariscope.data import create_dataset
    >>> r = equivariance("hog", create_dataset("digits", "test"), create_dataset("digits", "train"),
    ...                  "hflip", train_images=64, images=16, progress=False)
    >>> sorted(set(r.reconstruction["map"]))
    ['none', 'permutation', 'regression']
    """
    if magnitudes:
        transforms = with_magnitudes(transforms, magnitudes)
    hog = model if isinstance(model, HOG) else (HOG(cell=4) if model == "hog" else None)
    analysis = EquivarianceAnalysis(
        train_set,
        transforms,
        layers,
        hog=hog,
        method=method,
        structured=structured,
        ridge=ridge,
        k=k,
        train_images=train_images,
        stats_batch=stats_batch,
        transformation_layer=transformation_layer,
        kernel_size=kernel_size,
        steps=train_steps,
        lr=lr,
        train_batch=train_batch,
    )
    result = run_analysis(
        analysis,
        {} if hog is not None else {"model": model},
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
    return EquivarianceResult(
        aggregates["reconstruction"],
        aggregates.get("invariance_summary"),
        aggregates,
        result.run_dir,
    )


register_analysis(
    AnalysisEntry(
        name="equivariance",
        analysis=EquivarianceAnalysis,
        title="Learned equivariance maps and invariance by layer",
        paper=(
            "Lenc & Vedaldi 2018, Understanding image representations by measuring their "
            "equivariance and equivalence (sections 5.1-5.3)"
        ),
        about=(
            "For each layer (or HOG) and image transformation g, a map M_g learned on training "
            "images (regression with optional structured sparsity, or a transformation layer: "
            "resampling then m x m convolutions) predicts phi(x) from phi(g^-1 x). On test images: "
            "the per-cell reconstruction error (Hellinger for HOG, l2 for layers) of the identity, "
            "of the spatial permutation P_g and of M_g, and the top-1 error when the rest of the "
            "network classifies M_g phi(g^-1 x). A layer is flagged invariant to g when P_g does "
            "as well as M_g (within M_g's 95% Wilson interval)."
        ),
        command="equivariance",
        report_tables=("invariance_summary", "reconstruction", "models"),
        figures="invariscope.plots.equivariance:render_equivariance_run",
        demo="invariscope.demo:equivariance_stage",
        conformance=(
            "--data",
            "digits",
            "--transforms",
            "hflip,vflip",
            "--layers",
            "conv1,relu2",
            "--structured",
            "1",
            "--images",
            "16",
            "--batch-size",
            "8",
            "--train-images",
            "32",
            "--stats-batch",
            "16",
        ),
        figure_order=("equivariance_invariance", "equivariance_reconstruction"),
        bad_inputs=(
            (("--data", "digits", "--layers", "wobble"), "unknown layer"),
            (("--data", "digits", "--transforms", "brightness"), "geometric"),
            (("--data", "digits", "--method", "magic"), "method"),
            (("--data", "digits", "--layers", "conv1", "--structured", "40"), "structured"),
            (("--data", "digits", "--train-images", "99999"), "train-images"),
        ),
    )
)
