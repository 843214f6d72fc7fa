"""Feature-map alignment: can a purely spatial warp undo a transformation inside a CNN?

Jansson et al. (2020, "Spatial transformations in convolutional networks and invariant
recognition"; Finnveden, Jansson & Lindeberg 2020, section III) prove that for a CNN
``Gamma`` and an affine image transformation ``T``, ``T_g Gamma(T f) = Gamma(f)`` for
every image ``f`` forces ``T_g = T^-1`` and filters invariant to ``T``: spatially
warping feature maps cannot align them, except for translations (CNNs are translation
covariant) or when the features are themselves invariant (e.g. rotation-invariant,
isotropic filters and rotations). This module measures it numerically, per layer:

    alignment error = ||T^-1 Gamma(T f) - Gamma(f)||_V / ||Gamma(f)||_V

the l2 norms over every channel and every position of the valid region ``V`` below,
one value per image (the per-image errors are averaged, with 95% intervals; the pooled
``sqrt(sum num^2 / sum den^2)`` over images is reported too).

Convention:
    - **Canvas.** Each image ``[C, H, W]`` in ``[0, 1]`` is embedded in a zero canvas
      ``margin`` pixels wider on every side; ``f`` denotes the canvas image extended by
      zeros to the whole plane. This is the image both sides of the equation see, and
      it is what the warp core computes: ``T f`` is ``warp_affine(f, M_T)`` with zeros
      filled in, which is exactly (up to bilinear interpolation) the continuum ``T f``,
      zeros included; content that ``T`` moves off the canvas only matters at positions
      whose receptive field leaves the canvas, and those are excluded. ``Gamma`` is the
      network's layers up to ``layer`` applied to the canvas, normalised with the
      model's mean/std (a Classifier's preprocessing without its size check: convolution
      layers take any size).
    - **Transformations** ``T`` are registered geometric transformations about the
      canvas centre (the image centre): ``translate_x``/``translate_y`` by a magnitude
      in PIXELS of the input (positive right/down), ``rotation`` in degrees
      (counter-clockwise as displayed), ``zoom``/``scale_x``/``scale_y`` by a factor
      (> 1 magnifies), ``shear_x``/``shear_y`` by a shear factor.
      ``M_T`` [2, 3] is the forward pixel matrix of the registry (content at ``p`` moves
      to ``M_T p``).
    - **Feature grid.** A layer's feature position ``j = (x, y)`` (column, row index)
      sits at canvas pixel coordinates ``G j = o + s * j`` (per axis), the centre of its
      receptive field: each convolution / pooling of kernel ``k``, stride ``t``, padding
      ``p`` and dilation ``d`` maps ``(o, s)`` to ``(o + s (d (k - 1) / 2 - p), s t)``
      (:func:`feature_grid`). ``T^-1`` on a feature map is the image transformation
      carried to the feature grid: ``M_feat = G^-1 M_T G``, and ``T^-1 Gamma(T f)`` is
      ``warp_affine(Gamma(T f), M_feat^-1)``, i.e. ``Gamma(T f)`` read (bilinearly) at
      ``M_feat j``: the feature of the transformed image at the place where the content
      of ``j`` went. An integer translation by a multiple of a layer's cumulative stride
      moves its grid by whole feature pixels: both warps are then exact copies.
    - **Valid region** ``V`` (one mask per layer and transformation, the same for every
      image): the positions ``j`` that are *interior* -- computed without any of the
      network's own padding (every input tap of every layer below lies inside the
      array; :attr:`FeatureGrid.interior`) -- and whose sample position ``M_feat j``
      has both bilinear neighbours interior on each axis. Positions where the network
      padded (its padding is not the zero-extended image in normalised units) or where
      the sample leaves the map are thereby excluded. An empty region gives NaN.
    - **Interpolation floor** (``method="floor"``): the same check applied to a
      representation that is exactly equivariant in the continuum, on the same grid
      and region: ``R(f)_j = f(G j)`` (the canvas image read bilinearly at the layer's
      grid positions through the warp core, every channel). Its error is what the two
      resamplings (``T`` on the image, ``T^-1`` on the grid) and the grid's coarseness
      cost by themselves; a layer at this floor is as well aligned as any spatial warp
      of an equivariant representation can be.
    - **Best case** (``method="best"``): per image, the smallest error over purely
      spatial warps ``Q`` near ``T^-1``: ``Q(q) = M_feat^-1(q) + L (q - c) + t`` (``c``
      the map centre; ``L`` [2, 2] and ``t`` [2] free), searched by Adam from ``L = 0,
      t = 0`` (``best_steps`` steps), keeping each image's lowest error, the exact
      inverse included -- so ``best <= exact`` always. Same region ``V``; positions
      read outside the map read zeros.

Example:
    >>> import torch
    >>> from invariscope.models import create_model
    >>> model = create_model("simple-cnn").eval()
    >>> x = torch.rand(2, 1, 28, 28)
    >>> e = alignment_error(model, "conv1", "translate_x", x, 1.0)   # 1 px at stride 1
    >>> bool(e.exact.max() < 1e-4)
    True
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from invariscope.engine import Analysis, AnalysisEntry, Batch, Part, part_id, register_analysis
from invariscope.engine import run as run_analysis
from invariscope.errors import InvariscopeError
from invariscope.measure._present import ci, fmt
from invariscope.measure._present import pivot as tidy_pivot
from invariscope.measure.aggregate import mean_interval
from invariscope.measure.lee import feature_map_layers
from invariscope.models.capture import register_layer_hook, resolve_layer
from invariscope.models.classifier import Classifier
from invariscope.models.geometry import FeatureGrid, LayerGeometry, to_map, trace_geometry
from invariscope.transforms import get_transform, warp_affine

__all__ = [
    "AlignmentAnalysis",
    "AlignmentErrors",
    "AlignmentResult",
    "FeatureGrid",
    "TRANSFORMS",
    "alignment",
    "alignment_error",
    "alignment_errors",
    "alignment_mean",
    "feature_grid",
    "feature_grids",
    "transform_matrix",
]

#: Supported transformations: (unit of the magnitude, default magnitudes).
TRANSFORMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "translate_x": ("pixel", (1.0, 2.0, 4.0)),
    "translate_y": ("pixel", (1.0, 2.0, 4.0)),
    "rotation": ("degree", (15.0, 45.0, 90.0)),
    "zoom": ("factor", (0.8, 1.25, 1.5)),
    "scale_x": ("factor", (0.8, 1.25, 1.5)),
    "scale_y": ("factor", (0.8, 1.25, 1.5)),
    "shear_x": ("shear factor", (0.1, 0.25, 0.5)),
    "shear_y": ("shear factor", (0.1, 0.25, 0.5)),
}
METHODS = ("exact", "best", "floor", "input")
PART_TABLES = ("alignment",)
AGGREGATE_TABLES = ("alignment_mean", "alignment_layers", "transforms")
_EPS = 1e-4  # tolerance (feature pixels) on the valid region's bounds


# ------------------------------------------------------------------------ feature grids


_GEOMETRY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def feature_geometries(
    model: nn.Module, layers: Sequence[str], image_size: tuple[int, int]
) -> dict[str, LayerGeometry | None]:
    """Each layer's :class:`~invariscope.models.geometry.LayerGeometry` (grid and where
    it lies in the output tensor) on ``image_size = (H, W)`` inputs, or None where no grid
    can be placed. Traced once per model, image size and parameter set
    (:func:`~invariscope.models.geometry.trace_geometry`) and cached."""
    H, W = int(image_size[0]), int(image_size[1])
    per_model = _GEOMETRY_CACHE.setdefault(model, {})
    key = (H, W, _parameter_version(model))
    trace = per_model.get(key)
    if trace is None:
        per_model.clear()
        trace = per_model[key] = trace_geometry(model, (H, W))
    return {name: trace.get(model, name) for name in layers}


def _parameter_version(model: nn.Module) -> tuple:
    return tuple((id(m), type(m)) for m in model.modules())


def feature_grids(
    model: nn.Module, layers: Sequence[str], image_size: tuple[int, int]
) -> dict[str, FeatureGrid | None]:
    """The :class:`FeatureGrid` of each layer for ``image_size = (H, W)`` input images.

    Found for any network by :func:`~invariscope.models.geometry.trace_geometry`, which
    follows the grid through every torch operation of one forward pass: convolutions
    (plain, strided, dilated, depthwise), max / average / BlurPool pooling and padding
    move it; activations, normalisations, residual additions, squeeze-excitation
    products, channel-wise linear layers, permutes and token reshapes keep it (a ViT's
    patch tokens are a grid). A layer after a global pool, a resampling or a polyphase
    choice gets None. Layers that run several times are named per call
    (``layer1.0.relu:1``). :meth:`AlignmentAnalysis.check` compares the predicted sizes
    with the real ones.
    """
    geos = feature_geometries(model, layers, image_size)
    return {name: (g.grid if g is not None else None) for name, g in geos.items()}


def feature_grid(model: nn.Module, layer: str, image_size: tuple[int, int]) -> FeatureGrid:
    """The :class:`FeatureGrid` of one layer (see :func:`feature_grids`).

    >>> from invariscope.models import create_model
    >>> g = feature_grid(create_model("simple-cnn"), "pool2", (28, 28))
    >>> g.stride, g.offset, g.size
    ((4.0, 4.0), (11.5, 11.5), (2, 2))

    Raises:
        InvariscopeError: the layer's grid cannot be placed on the image.
    """
    g = feature_grids(model, [layer], image_size)[layer]
    if g is None:
        raise InvariscopeError(_unplaceable(layer))
    return g


def _unplaceable(layer: str) -> str:
    return (
        f"layer '{layer}' has no feature grid that can be placed on the image (it follows a "
        "global pool, a resampling or a data-dependent subsampling); pick a layer before it"
    )


# ------------------------------------------------------------------------ the measure


def transform_matrix(name: str, magnitude: float, H: int, W: int) -> torch.Tensor:
    """Forward pixel matrix ``[1, 2, 3]`` (float64) of ``name`` by ``magnitude`` (in the
    units of :data:`TRANSFORMS`: pixels for translations) about the centre of an
    ``H x W`` image.

    Raises:
        InvariscopeError: unknown or unsupported transformation, magnitude outside its
            domain.
    """
    if name not in TRANSFORMS:
        if name not in _registered():
            get_transform(str(name))  # the registry's "unknown transform" error
        raise InvariscopeError(
            f"{name} is not a transformation the alignment check supports; use one of "
            f"{', '.join(TRANSFORMS)}"
        )
    spec = get_transform(name)
    value = float(magnitude)
    if not math.isfinite(value):
        raise InvariscopeError(f"{name}: magnitude must be finite, got {magnitude}")
    if name == "translate_x":
        value /= W
    elif name == "translate_y":
        value /= H
    m = torch.tensor([value], dtype=torch.float64)
    spec.check(m)
    return spec.matrix_fn(m, H, W)


def _registered() -> list[str]:
    from invariscope.transforms import list_transforms

    return list_transforms()


def _homogeneous(m: torch.Tensor) -> torch.Tensor:
    out = torch.eye(3, dtype=torch.float64)
    out[:2] = m.reshape(2, 3).to(torch.float64)
    return out


def _canvas(images: torch.Tensor, margin: int) -> torch.Tensor:
    return nn.functional.pad(images, (margin, margin, margin, margin))


class _Stop(Exception):
    """Raised by a capture hook once every requested layer has run."""


def _features(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """The outputs of ``layers`` of ``model`` on canvas images ``x`` ``[B, C, H', W']`` in
    ``[0, 1]``; the forward pass stops once they all ran. A Classifier's ``net`` gets the
    images normalised with its mean/std (no size check, no resize)."""
    found: dict[str, torch.Tensor] = {}
    names = list(dict.fromkeys(layers))
    if not names:
        return found

    def hook(name):
        def record(module, inputs, output):
            found.setdefault(name, output)
            if len(found) == len(names):
                raise _Stop

        return record

    if isinstance(model, Classifier):
        mean = model.mean.to(x).view(1, -1, 1, 1)
        std = model.std.to(x).view(1, -1, 1, 1)
        net, inp = model.net, (x - mean) / std
    else:
        net, inp = model, x
    handles = [register_layer_hook(model, n, hook(n)) for n in names]
    try:
        net(inp)
    except _Stop:
        pass
    except (RuntimeError, ValueError, AssertionError) as err:
        if isinstance(err, InvariscopeError):
            raise
        raise InvariscopeError(
            f"the network does not run on a {x.shape[-2]}x{x.shape[-1]} canvas ("
            f"{str(err).splitlines()[0][:120]}); a network that takes one input size only "
            "(e.g. a ViT's position embedding) needs --margin 0"
        ) from None
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in found]
    if missing:
        raise InvariscopeError(
            f"layer '{missing[0]}' did not run in the forward pass; pick a layer the network uses"
        )
    odd = [n for n in names if not (isinstance(found[n], torch.Tensor) and found[n].dim() == 4)]
    if odd:  # tokens [B, N, D] or another layout: read the grid where the trace found it
        geos = feature_geometries(model, odd, tuple(x.shape[-2:]))
        for n in odd:
            g = geos[n]
            if g is not None and isinstance(found[n], torch.Tensor):
                found[n] = to_map(found[n], g.layout, g.grid.size)
    for n in names:
        if not (isinstance(found[n], torch.Tensor) and found[n].dim() == 4):
            raise InvariscopeError(
                f"layer '{n}' has no 4-D feature map output; pick layers whose output is "
                "[B, C, H, W]"
            )
    return found


def _feature_transform(grid: FeatureGrid, m_image: torch.Tensor) -> torch.Tensor:
    """``M_feat = G^-1 M_T G`` [3, 3] (float64): the image transformation on the feature grid."""
    g = grid.matrix()
    return torch.linalg.inv(g) @ _homogeneous(m_image) @ g


def _region(grid: FeatureGrid, m_feat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The valid region ``V`` [h, w] (bool) of a map of ``shape`` (see the module docstring)."""
    h, w = shape
    (ylo, yhi), (xlo, xhi) = grid.interior
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    qx = m_feat[0, 0] * xs + m_feat[0, 1] * ys + m_feat[0, 2]
    qy = m_feat[1, 0] * xs + m_feat[1, 1] * ys + m_feat[1, 2]
    inside = (xs >= xlo) & (xs <= xhi) & (ys >= ylo) & (ys <= yhi)
    sample = (qx >= xlo - _EPS) & (qx <= xhi + _EPS) & (qy >= ylo - _EPS) & (qy <= yhi + _EPS)
    return inside & sample


def _sums(aligned: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, den=None):
    """Per image ``(sum_V (aligned - target)^2, sum_V target^2)`` (float64 results; ``den``
    is reused when given): squared l2 norms over the channels, summed over ``V``."""
    m = mask.to(device=target.device, dtype=target.dtype)
    num = (torch.linalg.vector_norm(aligned - target, dim=1).square() * m).sum(dim=(1, 2))
    if den is None:
        den = (torch.linalg.vector_norm(target, dim=1).square() * m).sum(dim=(1, 2)).double()
    return num.double(), den


def _best(
    moved: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    inverse: torch.Tensor,
    den: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Per image, the lowest ``sum_V (Q moved - target)^2`` over warps ``Q`` near ``inverse``
    (see the module docstring: Adam on ``L``, ``t``; the start ``L = t = 0`` included)."""
    B = moved.shape[0]
    h, w = moved.shape[-2:]
    dtype, device = moved.dtype, moved.device
    moved, target = moved.detach(), target.detach()
    m = mask.to(device, dtype)
    base = inverse[:2].to(device=device, dtype=dtype).expand(B, 2, 3)
    centre = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=dtype, device=device)
    lin = torch.zeros(B, 2, 2, dtype=dtype, device=device, requires_grad=True)
    shift = torch.zeros(B, 2, dtype=dtype, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([{"params": [lin], "lr": 0.01}, {"params": [shift], "lr": 0.05}])
    scale = den.to(device=device, dtype=dtype).clamp_min(1e-30)
    best = torch.full((B,), math.inf, dtype=torch.float64, device=device)
    with torch.enable_grad():
        for step in range(int(steps) + 1):
            t = shift - (lin @ centre)
            matrix = base + torch.cat([lin, t.unsqueeze(-1)], dim=-1)
            diff = (warp_affine(moved, matrix) - target) * m
            num = diff.pow(2).sum(dim=(1, 2, 3))
            best = torch.minimum(best, num.detach().double())
            if step == steps:
                break
            optimiser.zero_grad()
            (num / scale).sum().backward()
            optimiser.step()
    return best


def _resample(images: torch.Tensor, grid: FeatureGrid, shape: tuple[int, int]) -> torch.Tensor:
    """``R(f)_j = f(G j)``: ``images`` read bilinearly at the grid's positions, ``[B, C, h, w]``."""
    h, w = shape
    H, W = images.shape[-2:]
    if h > H or w > W:  # a map larger than the image: pad the canvas first (zeros)
        images = nn.functional.pad(images, (0, max(0, w - W), 0, max(0, h - H)))
    g_inv = torch.linalg.inv(grid.matrix())[:2].unsqueeze(0)
    return warp_affine(images, g_inv.to(images))[..., :h, :w]


@dataclass
class AlignmentErrors:
    """What :func:`alignment_error` returns for one layer (per image, float64, CPU).

    Attributes:
        exact: ``||T^-1 Gamma(T f) - Gamma f||_V / ||Gamma f||_V`` ``[B]``.
        floor: the interpolation floor ``[B]`` (the same check on ``R(f)``).
        best: the best-case error over warps near ``T^-1`` ``[B]`` (None unless asked).
        positions: the number of positions in the valid region ``V``.
        grid: the layer's :class:`FeatureGrid` on the canvas.
    """

    exact: torch.Tensor
    floor: torch.Tensor
    best: torch.Tensor | None
    positions: int
    grid: FeatureGrid


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, (num / den.clamp_min(1e-300)).sqrt(), torch.nan)


def alignment_errors(
    model: nn.Module,
    images: torch.Tensor,
    transform: str,
    magnitude: float,
    layers: Sequence[str],
    *,
    margin: int = 8,
    best_case: bool = False,
    best_steps: int = 50,
    grids: Mapping[str, FeatureGrid] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, int]]]:
    """Sums of the alignment check of several layers, from two forward passes.

    Returns ``{layer: {method: (num [B], den [B], positions)}}`` with ``num = sum_V
    (aligned - target)^2`` and ``den = sum_V target^2`` per image (float64, CPU) for
    ``method`` in ``exact``, ``floor`` and (``best_case``) ``best``; the error is
    ``sqrt(num / den)``. ``grids`` / ``base`` (the layers' grids on the canvas and
    ``Gamma`` of the untransformed canvas) may be passed in to share them between calls.
    The model should be in eval mode. See the module docstring for every convention.
    """
    if images.dim() != 4:
        raise InvariscopeError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    margin = int(margin)
    if margin < 0:
        raise InvariscopeError(f"margin must be >= 0 pixels, got {margin}")
    layers = list(dict.fromkeys(layers))
    canvas = _canvas(images, margin)
    Hc, Wc = canvas.shape[-2:]
    if grids is None:
        placed = feature_grids(model, layers, (Hc, Wc))
        for name, g in placed.items():
            if g is None:
                raise InvariscopeError(_unplaceable(name))
        grids = placed
    m_image = transform_matrix(transform, magnitude, Hc, Wc)
    moved_canvas = warp_affine(canvas, m_image.to(canvas))
    with torch.no_grad():
        if base is None:
            base = _features(model, canvas, layers)
        moved = _features(model, moved_canvas, layers)
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, int]]] = {}
    for name in layers:
        grid, target, fmap = grids[name], base[name].detach(), moved[name].detach()
        shape = tuple(target.shape[-2:])
        if shape != tuple(grid.size):
            raise InvariscopeError(
                f"layer '{name}': its map is {shape[0]}x{shape[1]} but its placed grid predicts "
                f"{grid.size[0]}x{grid.size[1]}; the network's modules do not run in "
                "registration order, so its grid cannot be placed"
            )
        m_feat = _feature_transform(grid, m_image)
        inverse = torch.linalg.inv(m_feat)
        mask = _region(grid, m_feat, shape).to(target.device)
        positions = int(mask.sum())
        inv = inverse[:2].unsqueeze(0).to(target)
        aligned = warp_affine(fmap, inv)
        num, den = _sums(aligned, target, mask)
        result = {"exact": (num.cpu(), den.cpu(), positions)}
        forward = m_feat[:2].unsqueeze(0).to(target)
        rnum, _ = _sums(warp_affine(warp_affine(target, forward), inv), target, mask, den)
        result["floor"] = (rnum.cpu(), den.cpu(), positions)
        ref, ref_moved = _resample(canvas, grid, shape), _resample(moved_canvas, grid, shape)
        fnum, fden = _sums(warp_affine(ref_moved, inv.to(ref)), ref, mask)
        result["input"] = (fnum.cpu(), fden.cpu(), positions)
        if best_case:
            bnum = _best(fmap, target, mask, inverse, den, best_steps)
            result["best"] = (torch.minimum(bnum.cpu(), num.cpu()), den.cpu(), positions)
        out[name] = result
    return out


def alignment_error(
    model: nn.Module,
    layer: str,
    transform: str,
    images: torch.Tensor,
    magnitude: float,
    *,
    margin: int = 8,
    best_case: bool = False,
    best_steps: int = 50,
) -> AlignmentErrors:
    """Jansson et al.'s alignment error of one layer on a batch (see the module docstring).

    Args:
        model: a :class:`Classifier` (or a plain module taking the images directly).
        layer: the layer ``Gamma`` ends with (``net.conv1`` or ``conv1``).
        transform: one of :data:`TRANSFORMS`; ``magnitude`` in its unit (pixels for
            translations, degrees, factors).
        images: ``[B, C, H, W]`` in ``[0, 1]``.
        margin: zero canvas around each image, pixels per side.
        best_case: also search the best spatial warp near ``T^-1`` (``best_steps``).

    Returns:
        :class:`AlignmentErrors` (per image).
    """
    was_training = model.training
    model.eval()
    try:
        sums = alignment_errors(
            model,
            images,
            transform,
            magnitude,
            [layer],
            margin=margin,
            best_case=best_case,
            best_steps=best_steps,
        )[layer]
    finally:
        model.train(was_training)
    Hc, Wc = images.shape[-2] + 2 * int(margin), images.shape[-1] + 2 * int(margin)
    grid = feature_grid(model, layer, (Hc, Wc))
    best = _ratio(*sums["best"][:2]) if "best" in sums else None
    return AlignmentErrors(
        _ratio(*sums["exact"][:2]), _ratio(*sums["floor"][:2]), best, sums["exact"][2], grid
    )


# ---------------------------------------------------------------------- aggregation


def alignment_mean(per_image: pd.DataFrame, units: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per (transform, magnitude, layer, method): ``unit, order, n`` (images with a finite
    error), ``mean, low, high`` (per-image error, mean +- 1.96 SE), ``median``,
    ``pooled`` (``sqrt(sum num / sum den)`` over the images) and ``positions`` (size of
    the valid region), in the order of the rows given."""
    units = dict(units or {})
    rows = []
    keys = ["transform", "magnitude", "layer", "order", "method"]
    for (t, mag, layer, order, method), g in per_image.groupby(keys, sort=False):
        err = g["error"].to_numpy(np.float64)
        mean, low, high = mean_interval(err)
        finite = err[np.isfinite(err)]
        den = float(g["den"].sum())
        rows.append(
            {
                "transform": t,
                "unit": units.get(t, ""),
                "magnitude": float(mag),
                "layer": layer,
                "order": int(order),
                "method": method,
                "n": int(len(finite)),
                "mean": mean,
                "low": low,
                "high": high,
                "median": float(np.median(finite)) if len(finite) else math.nan,
                "pooled": math.sqrt(float(g["num"].sum()) / den) if den > 0 else math.nan,
                "positions": int(g["positions"].iloc[0]),
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- the analysis


def _parse_magnitudes(
    names: Sequence[str], magnitudes: Mapping[str, Sequence[float]] | None
) -> dict[str, list[float]]:
    given = dict(magnitudes or {})
    for name in given:
        if name not in names:
            raise InvariscopeError(
                f"magnitudes given for '{name}', which is not among the transforms "
                f"({', '.join(names)})"
            )
    out: dict[str, list[float]] = {}
    for name in names:
        values = given.get(name, TRANSFORMS[name][1])
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise InvariscopeError(
                f"magnitudes of {name} must be numbers, got {list(values)}"
            ) from None
        if not values:
            raise InvariscopeError(f"give at least one magnitude for {name}")
        if len(set(values)) != len(values):
            raise InvariscopeError(f"magnitude listed twice for {name}: {values}")
        for v in values:
            transform_matrix(name, v, 28, 28)  # domain check
        out[name] = values
    return out


class AlignmentAnalysis(Analysis):
    """Jansson et al.'s feature-map alignment check, per layer, on the engine.

    Parts: one per (transform, batch) (``alignment-<k>-<batch>``): one forward pass of
    the canvas images and one per magnitude (each capturing every layer, stopping after
    the last), then per layer the exact-inverse error, the interpolation floor and
    (``best_case``) the best spatial warp. Table ``alignment``: one row per (image,
    magnitude, layer, method) with ``transform, magnitude, index, label, layer, order,
    method, num, den, positions, error`` (``num``/``den``: the per-image sums over the
    valid region whose ratio's square root is ``error``; see the module docstring).

    Args:
        transforms: names from :data:`TRANSFORMS` (default translate_x, rotation, zoom,
            shear_x).
        magnitudes: ``{transform: [values]}`` (default :data:`TRANSFORMS`' values).
        layers: layers to check (default: every probe-able layer with a 4-D output and a
            placeable grid).
        best_case: also search the best spatial warp near ``T^-1`` per image.
        best_steps: Adam steps of that search.
        margin: zero canvas around each image, pixels per side.
    """

    name = "alignment"
    version = 1
    grad = True  # the best-case search differentiates the feature-map warp
    part_tables = PART_TABLES
    aggregate_tables = AGGREGATE_TABLES

    def __init__(
        self,
        transforms: str | Sequence[str] = ("translate_x", "rotation", "zoom", "shear_x"),
        magnitudes: Mapping[str, Sequence[float]] | None = None,
        layers: Sequence[str] | None = None,
        best_case: bool = False,
        best_steps: int = 50,
        margin: int = 8,
    ) -> None:
        if isinstance(transforms, str):
            transforms = [t.strip() for t in transforms.split(",") if t.strip()]
        names = [str(t) for t in transforms]
        if not names:
            raise InvariscopeError("give at least one transform, e.g. --transforms rotation")
        if len(set(names)) != len(names):
            raise InvariscopeError(f"transform listed twice: {', '.join(names)}")
        for n in names:
            transform_matrix(n, TRANSFORMS[n][1][0] if n in TRANSFORMS else 0.0, 28, 28)
        self.transforms = names
        self.magnitudes = _parse_magnitudes(names, magnitudes)
        self.layers = None if layers is None else [str(n) for n in layers]
        if self.layers is not None and not self.layers:
            raise InvariscopeError("give at least one layer, e.g. --layers conv1")
        self.best_case = bool(best_case)
        self.best_steps = int(best_steps)
        if self.best_steps < 1:
            raise InvariscopeError(f"best_steps must be >= 1, got {best_steps}")
        self.margin = int(margin)
        if self.margin < 0:
            raise InvariscopeError(f"margin must be >= 0 pixels, got {margin}")
        self.resolved_layers: list[str] = []
        self.grids: dict[str, FeatureGrid] = {}
        self.skipped: list[str] = []

    def _layers(self) -> list[str]:
        return self.resolved_layers if self.layers is None else self.layers

    def check(self, ctx) -> None:
        model = ctx.models["model"]
        x, _ = ctx.datasets["data"][int(ctx.indices["data"][0])]
        x = torch.as_tensor(x)[None].to(ctx.device)
        if self.layers is None:  # every probe-able layer the trace can place (tokens too)
            names = getattr(model, "layer_names", None)
            candidates = list(names) if names is not None else feature_map_layers(model, x)
        else:
            for layer in self.layers:
                resolve_layer(model, layer)
            candidates = list(self.layers)
        H, W = x.shape[-2:]
        if self.margin > max(H, W):
            raise InvariscopeError(
                f"--margin {self.margin} is wider than the {H}x{W} image; a margin of at most "
                f"{max(H, W)} (a canvas 3 times the image) already holds every position "
                "near the image, wider ones only add zeros (and memory)"
            )
        canvas = _canvas(x, self.margin)
        Hc, Wc = canvas.shape[-2:]
        placed = feature_grids(model, candidates, (Hc, Wc))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                maps = _features(model, canvas, [n for n in candidates if placed[n] is not None])
        finally:
            model.train(was_training)
        self.grids, self.skipped = {}, []
        for name in candidates:
            g = placed[name]
            problem = None
            if g is None:
                problem = _unplaceable(name)
            elif tuple(maps[name].shape[-2:]) != tuple(g.size):
                problem = (
                    f"layer '{name}': its map is {tuple(maps[name].shape[-2:])} but its placed "
                    f"grid predicts {g.size}; its grid cannot be placed on the image"
                )
            elif g.empty:
                problem = (
                    f"layer '{name}' has no position computed without the network's padding on "
                    f"a {Hc}x{Wc} canvas; increase --margin"
                )
            if problem is None:
                self.grids[name] = g
            elif self.layers is None:
                self.skipped.append(name)
            else:
                raise InvariscopeError(problem)
        if not self.grids:
            raise InvariscopeError(
                "the model has no layer whose feature grid can be placed on the image; "
                "the alignment check needs convolutional layers"
            )
        if self.layers is None:
            self.resolved_layers = [n for n in candidates if n in self.grids]
        for t in self.transforms:
            for v in self.magnitudes[t]:
                m_image = transform_matrix(t, v, Hc, Wc)
                if not any(
                    bool(_region(g, _feature_transform(g, m_image), tuple(g.size)).any())
                    for g in self.grids.values()
                ):
                    raise InvariscopeError(
                        f"{t}={v:g} moves every position of every layer off the {Hc}x{Wc} "
                        "canvas, so no alignment error can be measured; use a magnitude "
                        f"nearer the defaults ({', '.join(f'{d:g}' for d in TRANSFORMS[t][1])})"
                    )

    def config(self) -> dict[str, Any]:
        return {
            "transforms": self.transforms,
            "magnitudes": self.magnitudes,
            "units": {t: TRANSFORMS[t][0] for t in self.transforms},
            "layers": self._layers(),
            "layers_default": self.layers is None,
            "best_case": self.best_case,
            "best_steps": self.best_steps if self.best_case else None,
            "margin": self.margin,
        }

    def work(self, ctx) -> int:
        n = len(ctx.indices["data"])
        return n * sum(1 + len(v) for v in self.magnitudes.values())

    def max_forward_batch(self, ctx) -> int:
        return max(len(b) for b in ctx.batches["data"])

    def plan(self, ctx) -> list[Part]:
        return [
            Part(part_id("alignment", k, b), batch=b, key=k)
            for b in range(len(ctx.batches["data"]))
            for k in range(len(self.transforms))
        ]

    def compute(self, part: Part, ctx, batch: Batch) -> dict[str, pd.DataFrame]:
        name = self.transforms[part.key]
        layers = self._layers()
        model = ctx.models["model"]
        n = batch.x.shape[0]
        step = max(1, int(ctx.forward_batch))
        frames: list[pd.DataFrame] = []
        index_all = batch.index.cpu().numpy().astype(np.int64)
        label_all = batch.y.cpu().numpy().astype(np.int64)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            x = batch.x[sl]
            with torch.no_grad():
                base = _features(model, _canvas(x, self.margin), layers)
            for magnitude in self.magnitudes[name]:
                sums = alignment_errors(
                    model,
                    x,
                    name,
                    magnitude,
                    layers,
                    margin=self.margin,
                    best_case=self.best_case,
                    best_steps=self.best_steps,
                    grids=self.grids,
                    base=base,
                )
                for order, layer in enumerate(layers):
                    for method in METHODS:
                        if method not in sums[layer]:
                            continue
                        num, den, positions = sums[layer][method]
                        frames.append(
                            pd.DataFrame(
                                {
                                    "transform": name,
                                    "magnitude": float(magnitude),
                                    "index": index_all[sl],
                                    "label": label_all[sl],
                                    "layer": layer,
                                    "order": np.int64(order),
                                    "method": method,
                                    "num": num.numpy(),
                                    "den": den.numpy(),
                                    "positions": np.int64(positions),
                                    "error": _ratio(num, den).numpy(),
                                }
                            )
                        )
        table = pd.concat(frames, ignore_index=True)
        # magnitude, layer, method order; images in batch order: independent of chunking
        rank = {m: i for i, m in enumerate(METHODS)}
        mags = {m: i for i, m in enumerate(self.magnitudes[name])}
        table = table.assign(
            _m=table["magnitude"].map(mags), _k=table["method"].map(rank)
        ).sort_values(["_m", "order", "_k"], kind="stable")
        return {"alignment": table.drop(columns=["_m", "_k"]).reset_index(drop=True)}

    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        per_image = ctx.results.read_table("alignment")
        rank = {t: i for i, t in enumerate(self.transforms)}
        methods = {m: i for i, m in enumerate(METHODS)}
        per_image = (
            per_image.assign(
                _t=per_image["transform"].map(rank), _k=per_image["method"].map(methods)
            )
            .sort_values(["_t", "magnitude", "order", "_k", "index"], kind="stable")
            .drop(columns=["_t", "_k"])
            .reset_index(drop=True)
        )
        units = {t: TRANSFORMS[t][0] for t in self.transforms}
        layers = self._layers()
        grids = [self.grids[n] for n in layers]
        return {
            "alignment_mean": alignment_mean(per_image, units),
            "alignment_layers": pd.DataFrame(
                {
                    "layer": layers,
                    "order": np.arange(len(layers), dtype=np.int64),
                    "stride": [g.stride[1] for g in grids],
                    "offset_x": [g.offset[1] for g in grids],
                    "offset_y": [g.offset[0] for g in grids],
                    "rf": [2 * g.rf[1] + 1 for g in grids],
                    "height": [g.size[0] for g in grids],
                    "width": [g.size[1] for g in grids],
                }
            ),
            "transforms": pd.DataFrame(
                {
                    "transform": self.transforms,
                    "unit": [units[t] for t in self.transforms],
                    "magnitudes": [
                        ", ".join(f"{v:g}" for v in self.magnitudes[t]) for t in self.transforms
                    ],
                }
            ),
        }

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        table = aggregates.get("alignment_mean")
        if table is None or not len(table):
            return super().headline(summary, aggregates, config)
        parts, notes = [], []
        for name, sub in table.groupby("transform", sort=False):
            magnitude, _ = informative_magnitude(sub)
            at = sub[sub["magnitude"] == magnitude]
            exact, floor = at[at["method"] == "exact"], at[at["method"] == "floor"]
            if exact.empty:
                continue
            worst = exact.loc[exact["mean"].idxmax()]
            text = (
                f"{name} {magnitude:g} {worst.unit}: up to "
                f"{ci(worst['mean'], worst.low, worst.high)} ({worst.layer})"
            )
            if len(floor):
                text += f" against an interpolation floor of at most {fmt(floor['mean'].max())}"
            parts.append(text)
            grid = sorted(
                float(m)
                for m, g in sub[sub["method"] == "floor"].groupby("magnitude")
                if g["mean"].max() < ON_GRID and float(m) != magnitude
            )
            if grid:
                notes.append(f"{name} {', '.join(f'{m:g}' for m in grid)} {worst.unit}")
        n = summary.get("num_images")
        text = (
            f"Relative error of the inverse warp on the feature maps ({n} images, mean with "
            "95% interval, worst layer), at the magnitude where it fails most: "
            + "; ".join(parts)
            + "."
        )
        if notes:
            text += (
                " Not headlined: "
                + "; ".join(notes)
                + ", exact on the pixel grid (nothing is interpolated: the floor is 0)."
            )
        return text

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        table = aggregates.get("alignment_mean")
        if table is None or not len(table):
            return {}
        chosen = {
            name: informative_magnitude(sub)[0]
            for name, sub in table.groupby("transform", sort=False)
        }

        def pivot(method: str, only_chosen: bool) -> pd.DataFrame:
            rows = table[table["method"] == method]
            if only_chosen:
                rows = rows[rows["magnitude"] == rows["transform"].map(chosen)]
            rows = rows.assign(
                column=[
                    f"{t} {m:g} {u}"
                    for t, m, u in zip(
                        rows["transform"], rows["magnitude"], rows["unit"], strict=True
                    )
                ]
            )
            out = tidy_pivot(
                rows.sort_values("order", kind="stable"), ["order", "layer"], "column", "mean"
            )
            out.index = pd.Index(out.index.get_level_values("layer"), name="layer")
            out.columns.name = None
            return out

        out = {
            "Relative alignment error, exact inverse warp (layer x transformation, headline magnitudes)": pivot(
                "exact", True
            ),
        }
        if (table["method"] == "floor").any():
            out["Interpolation floor (same check on the image itself; relative error)"] = pivot(
                "floor", True
            )
        out["Relative alignment error, exact inverse warp, every magnitude"] = pivot("exact", False)
        if (table["method"] == "best").any():
            out["Relative alignment error, best warp near the inverse, every magnitude"] = pivot(
                "best", False
            )
        return out

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        table = aggregates["alignment_mean"]
        result: dict[str, Any] = {"num_images": int(len(ctx.indices["data"]))}
        if self.skipped:
            result["skipped_layers"] = list(self.skipped)
        for name in self.transforms:
            sub = table[table["transform"] == name]
            if not len(sub):
                continue
            top, why = informative_magnitude(sub)
            sub = sub[sub["magnitude"] == top]
            entry: dict[str, Any] = {
                "magnitude": float(top),
                "unit": TRANSFORMS[name][0],
                "why": why,
            }
            for method in METHODS:
                rows = sub[sub["method"] == method]
                if len(rows):
                    entry[method] = {r.layer: _round(r.mean) for r in rows.itertuples(index=False)}
            result[name] = entry
        return result


def _round(value: float) -> float | None:
    v = float(value)
    return None if not math.isfinite(v) else float(f"{v:.4g}")


#: A floor below this (relative error) means the warp is exact on the pixel grid.
ON_GRID = 1e-4


def informative_magnitude(table: pd.DataFrame) -> tuple[float, str]:
    """The magnitude of one transformation that the summary and the report headline, and why.

    ``table``: the ``alignment_mean`` rows of one transformation. A magnitude whose
    interpolation floor is ~0 at every layer (a 90-degree rotation, a shift by a multiple
    of every stride) is exact on the pixel grid: nothing is interpolated, so its floor
    says nothing and a shift there is trivially aligned. Of the other magnitudes (all
    of them when every one is on the grid) the one with the largest mean exact error
    over layers is taken: where a warp fails to align the most.
    """
    exact = table[table["method"] == "exact"].groupby("magnitude", sort=True)["mean"].mean()
    if exact.empty:
        return float(table["magnitude"].max()), "the largest magnitude (no exact error)"
    floor = table[table["method"] == "floor"].groupby("magnitude", sort=True)["mean"].max()
    on_grid = {float(m) for m, v in floor.items() if v < ON_GRID}
    off = exact[[float(m) not in on_grid for m in exact.index]]
    pool = off if len(off) else exact
    best = float(pool.idxmax())
    reason = "the largest mean exact error over layers"
    if on_grid and len(off):
        grid = ", ".join(f"{m:g}" for m in sorted(on_grid))
        reason += f" among the magnitudes not exact on the pixel grid (on the grid: {grid})"
    return best, reason


# ------------------------------------------------------------------------- Python API


@dataclass
class AlignmentResult:
    """What :func:`alignment` returns: ``table`` (``alignment_mean``), ``layers``
    (``alignment_layers``), every aggregate table and the run directory."""

    table: pd.DataFrame
    layers: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    run_dir: Path | None = None


def alignment(
    model: nn.Module,
    dataset: Dataset,
    transforms: str | Sequence[str] = ("translate_x", "rotation", "zoom", "shear_x"),
    *,
    magnitudes: Mapping[str, Sequence[float]] | None = None,
    layers: Sequence[str] | None = None,
    best_case: bool = False,
    best_steps: int = 50,
    margin: int = 8,
    images: int | Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    **engine: Any,
) -> AlignmentResult:
    """The feature-map alignment check of ``model`` on ``dataset``, per layer, in one call.

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    Runs :class:`AlignmentAnalysis` on the engine (resumable with ``out``,
    distributable under ``torchrun``).

    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> r = alignment(create_model("simple-cnn"), create_dataset("digits"), "translate_x",
    ...               magnitudes={"translate_x": [4]}, layers=["conv1", "pool2"], images=4,
    ...               progress=False)
    >>> bool((r.table.query("method == 'exact'")["mean"] < 1e-4).all())   # 4 px = 1 at stride 4
    True
    """
    analysis = AlignmentAnalysis(
        transforms,
        magnitudes=magnitudes,
        layers=layers,
        best_case=best_case,
        best_steps=best_steps,
        margin=margin,
    )
    result = run_analysis(
        analysis,
        {"model": model},
        {"data": dataset},
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
    return AlignmentResult(
        aggregates["alignment_mean"], aggregates["alignment_layers"], aggregates, result.run_dir
    )


register_analysis(
    AnalysisEntry(
        name="alignment",
        analysis=AlignmentAnalysis,
        title="Feature-map alignment (can a spatial warp undo a transformation in a CNN?)",
        paper=(
            "Jansson, Maydanskiy, Finnveden & Lindeberg 2020, Spatial transformations in "
            "convolutional networks and invariant recognition; Finnveden, Jansson & "
            "Lindeberg 2020, Understanding when spatial transformer networks do not support "
            "invariance"
        ),
        about=(
            "Per layer, the relative error ||T^-1 Gamma(T f) - Gamma f|| / ||Gamma f|| over "
            "the valid central region, with T an image transformation and T^-1 the inverse "
            "warp carried to the layer's feature grid (its stride and receptive-field "
            "centres). The theorem: purely spatial warps of CNN feature maps cannot align "
            "them except for translations (or with invariant filters). 'exact' uses T^-1; "
            "'best' the best warp found near T^-1 per image; 'floor' the same check on the "
            "image itself read on the layer's grid (the interpolation error of an exactly "
            "equivariant representation). Mean over images with 95% intervals."
        ),
        command="alignment",
        report_tables=("alignment_mean", "alignment_layers"),
        figures="invariscope.plots.alignment:render_alignment_run",
        demo="invariscope.demo:alignment_stage",
        conformance=(
            "--data",
            "digits",
            "--transforms",
            "translate_x,rotation",
            "--images",
            "16",
            "--batch-size",
            "8",
        ),
        bad_inputs=(
            (("--data", "digits", "--transforms", "wobble"), "unknown transform 'wobble'"),
            (("--data", "digits", "--transforms", "brightness"), "not a transformation"),
            (("--data", "digits", "--layers", "conv9"), "unknown layer 'conv9'"),
            (("--data", "digits", "--layers", "fc"), "no feature grid"),
            (
                ("--data", "digits", "--transforms", "rotation", "--magnitudes", "zoom=2"),
                "not among the transforms",
            ),
            (("--data", "digits", "--magnitudes", "zoom=-1"), "zoom"),
            (("--data", "digits", "--magnitudes", "rotation=ten"), "must be numbers"),
            (("--data", "digits", "--margin", "-2"), "margin"),
        ),
    )
)
