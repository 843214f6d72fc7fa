"""Equivariance maps: feature geometry, sufficient statistics, regression fits, transformation layers.

Lenc & Vedaldi (2018, section 5.1): a representation ``phi`` is equivariant to an image
transformation ``g`` when a map ``M_g`` exists with ``phi(g z) ~ M_g phi(z)``. Here the
pairs are ``(phi(g^-1 x), phi(x))`` for natural images ``x`` (``z = g^-1 x``), so that
``M_g phi(g^-1 x)`` is compared with, and classified like, ``phi(x)``.

Layout: a feature field ``[C, h, w]`` is handled as ``[P, C]`` with ``P = h w`` cells
(row-major) and channels last; a flat feature vector has index ``p C + c``.

A map is affine: ``y = x A + b``. It is stored as GROUPS: group ``j`` predicts the
``C_out`` outputs of ``out_cells[j]`` from the inputs gathered by ``index[j]``:

- dense: one group, every input cell, every output cell (``A`` is ``[1, P C, P C]``);
- structured (sparsity pattern of the paper's eq. 5): one group per output cell ``p``,
  inputs = the ``m x m`` input cells nearest to the back-projection of ``p``, every
  channel (``A`` is ``[P, m m C, C]``). Cells of the neighbourhood outside the grid read
  a constant zero feature (so their coefficients come out 0).

Statistics (sums over training pairs, float64, so they add across parts and ranks):
``n``, ``sx [G, d]``, ``sy [G, k]``, ``xx [G, d, d]``, ``xy [G, d, k]``.
Fits solve the centred normal equations ``G_c A = B_c`` with
``G_c = xx - sx sx'/n``, ``B_c = xy - sx sy'/n``, and ``b = (sy - A' sx) / n``:

- ``lsq``: minimum-norm least squares (pseudo-inverse; eigenvalues below ``1e-10`` of the
  largest count as zero);
- ``ridge``: ``(G_c + lam I) A = B_c`` with ``lam = ridge * trace(G_c) / d`` (scale free;
  ``d`` counts the inputs that vary, so constant padding does not change ``lam``);
- ``omp``: ``k`` non-zero coefficients per output, forward selection by orthogonal
  matching pursuit on the Gram matrix (:func:`sklearn.linear_model.orthogonal_mp_gram`,
  columns normalised to unit variance, constant inputs never selected).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.measure.alignment import feature_grids
from invariscope.transforms import get_transform
from invariscope.transforms.warp import warp_affine

__all__ = [
    "METHODS",
    "EquivTransform",
    "FeatureGeometry",
    "FittedMap",
    "Statistics",
    "TransformationLayer",
    "accumulate",
    "apply_map",
    "cells",
    "fit_map",
    "hellinger_per_cell",
    "l2_per_cell",
    "layer_geometry",
    "neighbourhoods",
    "parse_transforms",
    "resample_features",
]

METHODS = ("lsq", "ridge", "omp")
#: Eigenvalues of the centred Gram matrix below this fraction of the largest count as 0 (lsq).
LSQ_RCOND = 1e-10


# ------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class FeatureGeometry:
    """Where the cells of a feature field ``[channels, height, width]`` sit in the image.

    Cell (column ``u``, row ``v``) has its receptive-field centre at image pixel
    ``(x, y) = (stride[1] u + offset[1], stride[0] v + offset[0])`` (pixel coordinates of
    the warp core: origin at the centre of the top-left pixel, x right, y down).
    """

    channels: int
    height: int
    width: int
    stride: tuple[float, float]
    offset: tuple[float, float]

    @property
    def cells(self) -> int:
        return self.height * self.width

    def cell_to_pixel(self) -> np.ndarray:
        """The 3x3 homogeneous matrix of the cell -> pixel map."""
        return np.array(
            [
                [self.stride[1], 0.0, self.offset[1]],
                [0.0, self.stride[0], self.offset[0]],
                [0, 0, 1],
            ]
        )

    def carry(self, pixel_map: np.ndarray) -> np.ndarray:
        """An image map (3x3 or 2x3, pixel coordinates) carried to cell coordinates: ``C^-1 M C``."""
        m = np.eye(3)
        m[:2] = np.asarray(pixel_map, dtype=np.float64)[:2]
        c = self.cell_to_pixel()
        return np.linalg.inv(c) @ m @ c


def layer_geometry(
    model: nn.Module | None, layer: str, image_hw: tuple[int, int], shape: Sequence[int]
) -> FeatureGeometry:
    """The geometry of a layer's output ``shape = (C, h, w)`` for ``H x W`` images.

    Where :func:`invariscope.measure.alignment.feature_grids` can place the layer (a
    chain of convolutions, poolings and element-wise layers; residual blocks by their
    main branch), the receptive-field centre is composed exactly: each ``k x k`` layer
    with stride ``s``, padding ``p`` and dilation ``d`` maps output cell ``u`` to input
    position ``s u - p + d (k - 1) / 2``. Otherwise the map is assumed to cover the
    image uniformly: ``x = (u + 1/2) W / w - 1/2``.
    """
    c, h, w = (int(s) for s in shape)
    grid = None
    if model is not None:
        grid = feature_grids(model, [layer], (int(image_hw[0]), int(image_hw[1])))[layer]
    if grid is None or grid.size != (h, w):
        sy, sx = image_hw[0] / h, image_hw[1] / w
        return FeatureGeometry(c, h, w, (sy, sx), ((sy - 1) / 2, (sx - 1) / 2))
    return FeatureGeometry(c, h, w, grid.stride, grid.offset)


# -------------------------------------------------------------------- transformations


@dataclass(frozen=True)
class EquivTransform:
    """An image transformation ``g`` of the registry with a fixed magnitude, and its inverse.

    ``label`` as typed (``"hflip"``, ``"zoom=0.5"``); ``apply(x)`` is ``g x`` and
    ``apply_inverse(x)`` is ``g^-1 x`` (zeros fill, bilinear, as the registry's
    functions); ``matrix(H, W)`` is g's forward pixel map (3x3).
    """

    label: str
    name: str
    magnitude: float
    inverse: float

    def matrix(self, H: int, W: int, inverse: bool = False) -> np.ndarray:
        spec = get_transform(self.name)
        m = spec.matrix(torch.tensor([self.inverse if inverse else self.magnitude]), H, W)
        out = np.eye(3)
        out[:2] = m[0].double().numpy()
        return out

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return get_transform(self.name)(images, self.magnitude)

    def apply_inverse(self, images: torch.Tensor) -> torch.Tensor:
        return get_transform(self.name)(images, self.inverse)


def parse_transforms(spec: str | Sequence[str]) -> list[EquivTransform]:
    """``"hflip,vflip,rot90,zoom=0.5,rotation=45"`` -> transformations (default magnitude
    when none is given: 1 for flips and rot90). Only geometric (affine) ones are accepted;
    the inverse magnitude is found among ``v, -v, 1/v, 4 - v`` by checking the matrices."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s]
    if not items:
        raise InvariscopeError("no transformation given; name at least one, e.g. hflip,zoom=0.5")
    out: list[EquivTransform] = []
    for item in items:
        name, _, value = item.partition("=")
        name = name.strip()
        t = get_transform(name)
        if t.kind == "photometric":
            raise InvariscopeError(
                f"'{name}' is photometric; equivariance maps need a geometric transformation "
                "(hflip, vflip, rot90, rotation=DEG, zoom=S, ...)"
            )
        if value.strip():
            try:
                v = float(value)
            except ValueError:
                raise InvariscopeError(f"'{item}': '{value}' is not a number") from None
        else:
            default = t.default_magnitude
            if default is None:
                raise InvariscopeError(f"'{name}' needs a magnitude ({t.unit}): write {name}=VALUE")
            v = float(default)
        t.check(torch.tensor([v]))
        if v == float(t.identity):
            raise InvariscopeError(f"'{item}' is the identity; pick a magnitude that transforms")
        m = EquivTransform(item, name, v, v).matrix(8, 8)
        inverse = None
        for cand in (v, -v, 1 / v if v else math.nan, 4 - v):
            if not math.isfinite(cand):
                continue
            try:
                t.check(torch.tensor([cand]))
            except InvariscopeError:
                continue
            mi = EquivTransform(item, name, cand, cand).matrix(8, 8)
            if np.allclose(mi @ m, np.eye(3), atol=1e-5):
                inverse = cand
                break
        if inverse is None:
            raise InvariscopeError(f"'{item}' has no inverse in its domain; pick another magnitude")
        out.append(EquivTransform(item, name, v, inverse))
    labels = [t.label for t in out]
    if len(set(labels)) != len(labels):
        raise InvariscopeError(f"a transformation is listed twice: {', '.join(labels)}")
    return out


def back_projection(
    geom_in: FeatureGeometry, geom_out: FeatureGeometry, transform: EquivTransform, H: int, W: int
) -> np.ndarray:
    """3x3 map from an output cell of ``phi(x)`` to its location in ``phi(g^-1 x)``'s cells:
    ``C_in^-1 M_{g^-1} C_out`` (the content at pixel P of x is at ``M_{g^-1} P`` in g^-1 x)."""
    return (
        np.linalg.inv(geom_in.cell_to_pixel())
        @ transform.matrix(H, W, inverse=True)
        @ (geom_out.cell_to_pixel())
    )


def neighbourhoods(back: np.ndarray, geom_in: FeatureGeometry, geom_out: FeatureGeometry, m: int):
    """``[P_out, m m]`` flat input-cell indices of the ``m x m`` input cells nearest to each
    output cell's back-projection (``back`` from :func:`back_projection`); ``-1`` outside
    the grid. Window start per axis: ``floor(q - (m - 1) / 2 + 1/2)``."""
    v, u = np.meshgrid(np.arange(geom_out.height), np.arange(geom_out.width), indexing="ij")
    pts = np.stack([u.ravel(), v.ravel(), np.ones(u.size)]).astype(np.float64)
    q = back @ pts  # [3, P_out]: x (column), y (row) in input cells
    start_u = np.floor(q[0] - (m - 1) / 2 + 0.5 + 1e-9).astype(np.int64)
    start_v = np.floor(q[1] - (m - 1) / 2 + 0.5 + 1e-9).astype(np.int64)
    dv, du = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    uu = start_u[:, None] + du.ravel()[None]
    vv = start_v[:, None] + dv.ravel()[None]
    inside = (uu >= 0) & (uu < geom_in.width) & (vv >= 0) & (vv < geom_in.height)
    return np.where(inside, vv * geom_in.width + uu, -1)


def cells(features: torch.Tensor) -> torch.Tensor:
    """``[n, C, h, w]`` -> ``[n, h w, C]`` (cells row-major, channels last), float64."""
    n, c = features.shape[:2]
    return features.reshape(n, c, -1).transpose(1, 2).double().contiguous()


def gather(x: torch.Tensor, index: np.ndarray | None) -> torch.Tensor:
    """Inputs per group: ``x [n, P, C]`` -> ``[n, G, d]`` (dense: ``[n, 1, P C]``)."""
    n, _, c = x.shape
    if index is None:
        return x.reshape(n, 1, -1)
    padded = torch.cat([x, x.new_zeros(n, 1, c)], dim=1)
    idx = torch.as_tensor(np.where(index < 0, x.shape[1], index), device=x.device)
    return padded[:, idx].reshape(n, index.shape[0], -1)


def targets(y: torch.Tensor, structured: bool) -> torch.Tensor:
    """Outputs per group: ``y [n, P, C]`` -> ``[n, P, C]`` (structured) or ``[n, 1, P C]``."""
    return y if structured else y.reshape(y.shape[0], 1, -1)


# -------------------------------------------------------------------------- statistics


@dataclass
class Statistics:
    """Sums over training pairs (see the module docstring), float64 numpy arrays."""

    n: int
    sx: np.ndarray
    sy: np.ndarray
    xx: np.ndarray
    xy: np.ndarray

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(
            self.n + other.n,
            self.sx + other.sx,
            self.sy + other.sy,
            self.xx + other.xx,
            self.xy + other.xy,
        )

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, n=np.array(self.n), sx=self.sx, sy=self.sy, xx=self.xx, xy=self.xy)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Statistics:
        z = np.load(io.BytesIO(data))
        return cls(int(z["n"]), z["sx"], z["sy"], z["xx"], z["xy"])


def stat_entries(groups: int, d: int, k: int) -> int:
    """Number of float64 entries a statistics set holds."""
    return groups * (d * d + d * k + d + k)


def accumulate(x: torch.Tensor, y: torch.Tensor) -> Statistics:
    """Sums of inputs ``x [n, G, d]`` and targets ``y [n, G, k]`` (float64)."""
    x, y = x.double().contiguous(), y.double().contiguous()
    return Statistics(
        int(x.shape[0]),
        x.sum(0).cpu().numpy(),
        y.sum(0).cpu().numpy(),
        torch.einsum("ngi,ngj->gij", x, x).cpu().numpy(),
        torch.einsum("ngi,ngj->gij", x, y).cpu().numpy(),
    )


# ------------------------------------------------------------------------------ fits


@dataclass
class FittedMap:
    """An affine map ``y_j = x[index_j] A_j + b_j`` per group (module docstring).

    ``A [G, d, k]``, ``b [G, k]`` (float32), ``index [G, m m]`` or None (dense).
    """

    A: np.ndarray
    b: np.ndarray
    index: np.ndarray | None

    @property
    def structured(self) -> bool:
        return self.index is not None

    def nonzeros(self) -> int:
        return int(np.count_nonzero(self.A))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays = {"A": self.A, "b": self.b}
        if self.index is not None:
            arrays["index"] = self.index
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FittedMap:
        z = np.load(io.BytesIO(data))
        return cls(z["A"], z["b"], z["index"] if "index" in z.files else None)

    def dense(self, cells_in: int, channels_in: int) -> np.ndarray:
        """The full matrix ``[P_in C_in, P_out C_out]`` (zeros off the support)."""
        g, d, k = self.A.shape
        if self.index is None:
            return self.A[0].astype(np.float64)
        out = np.zeros((cells_in * channels_in, g * k))
        for j in range(g):
            for a, cell in enumerate(self.index[j]):
                if cell >= 0:
                    rows = slice(cell * channels_in, (cell + 1) * channels_in)
                    out[rows, j * k : (j + 1) * k] = self.A[
                        j, a * channels_in : (a + 1) * channels_in
                    ]
        return out


def _omp_group(g: np.ndarray, bmat: np.ndarray, k: int) -> np.ndarray:
    """OMP with ``k`` non-zeros per output column on one group's centred Gram matrix."""
    from sklearn.linear_model import orthogonal_mp_gram

    diag = np.diag(g)
    active = np.flatnonzero(diag > 1e-12 * max(float(diag.max(initial=0.0)), 1e-300))
    out = np.zeros_like(bmat)
    if active.size == 0:
        return out
    s = np.sqrt(diag[active])
    gn = g[np.ix_(active, active)] / np.outer(s, s)
    bn = bmat[active] / s[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ended prematurely": fewer than k useful inputs
        coef = orthogonal_mp_gram(
            gn, bn, n_nonzero_coefs=min(k, active.size), copy_Gram=True, copy_Xy=True
        )
    out[active] = np.asarray(coef).reshape(active.size, -1) / s[:, None]
    return out


def fit_map(
    stats: Statistics,
    method: str = "ridge",
    *,
    ridge: float = 1e-3,
    k: int = 5,
    index: np.ndarray | None = None,
) -> FittedMap:
    """Fit ``M = (A, b)`` from statistics (module docstring); ``index`` as in the statistics."""
    if method not in METHODS:
        raise InvariscopeError(
            f"unknown fitting method '{method}'; use one of {', '.join(METHODS)}"
        )
    if stats.n < 2:
        raise InvariscopeError("an equivariance map needs at least 2 training images")
    from threadpoolctl import threadpool_limits

    # many small systems: BLAS threads only add contention (measured: 0.2 s vs 10+ s for
    # 225 systems of 81 unknowns on a busy 2-core machine); one large system keeps them
    limit = threadpool_limits(limits=1, user_api="blas") if stats.xx.shape[1] <= 256 else None
    try:
        return _fit(stats, method, ridge, k, index)
    finally:
        if limit is not None:
            limit.restore_original_limits()


def _fit(stats: Statistics, method: str, ridge: float, k: int, index) -> FittedMap:
    n = float(stats.n)
    gc = stats.xx - np.einsum("gi,gj->gij", stats.sx, stats.sx) / n
    gc = (gc + gc.transpose(0, 2, 1)) / 2
    bc = stats.xy - np.einsum("gi,gj->gij", stats.sx, stats.sy) / n
    if method == "lsq":  # minimum norm: pseudo-inverse from one batched eigendecomposition
        w, v = np.linalg.eigh(gc)
        cutoff = LSQ_RCOND * np.abs(w).max(axis=1, keepdims=True)
        inv = np.where(w > cutoff, 1.0 / np.where(w > cutoff, w, 1.0), 0.0)
        # small products by einsum (no threaded BLAS: many tiny matrices)
        A = np.einsum("gij,gj,gjk->gik", v, inv, np.einsum("gji,gjk->gik", v, bc))
    elif method == "ridge":
        diag = np.diagonal(gc, axis1=1, axis2=2)
        tiny = 1e-12 * np.maximum(diag.max(axis=1, initial=0.0), 1e-300)
        varying = np.maximum((diag > tiny[:, None]).sum(axis=1), 1)
        lam = ridge * np.trace(gc, axis1=1, axis2=2) / varying
        eye = np.eye(gc.shape[1])
        safe = np.where(lam > 0, lam, 1.0)
        A = np.linalg.solve(gc + safe[:, None, None] * eye, bc)
        A[~(lam > 0)] = 0.0
    else:
        A = np.stack([_omp_group(gc[j], bc[j], k) for j in range(gc.shape[0])])
    b = (stats.sy - np.einsum("gdk,gd->gk", A, stats.sx)) / n
    return FittedMap(A.astype(np.float32), b.astype(np.float32), index)


def apply_map(fitted: FittedMap, x: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """``M phi``: features ``x [n, C, h, w]`` -> ``[n, C_out, h_out, w_out]`` (float32)."""
    c, h, w = (int(s) for s in out_shape)
    z = gather(cells(x).float().contiguous(), fitted.index)
    A = torch.as_tensor(fitted.A, device=x.device)
    b = torch.as_tensor(fitted.b, device=x.device)
    y = torch.einsum("ngd,gdk->ngk", z, A) + b
    return y.reshape(x.shape[0], h * w, c).transpose(1, 2).reshape(x.shape[0], c, h, w)


# ------------------------------------------------------------------------ errors


def hellinger_per_cell(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[n, h w]`` Hellinger distances ``sqrt(sum_t (sqrt(a_t) - sqrt(b_t))^2)`` per cell of
    ``[n, C, h, w]`` histograms; negative predictions are clamped to 0 first."""
    a = pred.clamp(min=0).sqrt()
    b = target.clamp(min=0).sqrt()
    return ((a - b) ** 2).sum(1).sqrt().flatten(1)


def l2_per_cell(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[n, h w]`` Euclidean distances over channels per cell of ``[n, C, h, w]`` maps."""
    return ((pred - target) ** 2).sum(1).sqrt().flatten(1)


# ---------------------------------------------------------------- transformation layer


def resample_features(features: torch.Tensor, forward_map: np.ndarray) -> torch.Tensor:
    """``P_g phi``: the feature map resampled (bilinear, zeros outside) through the warp
    core with the cell-coordinate FORWARD map ``forward_map`` (3x3)."""
    n = features.shape[0]
    m = torch.as_tensor(forward_map[:2], dtype=features.dtype, device=features.device)
    return warp_affine(features, m.expand(n, 2, 3).contiguous())


class TransformationLayer(nn.Module):
    """Lenc & Vedaldi's transformation layer (eq. 7): ``F * (P_g phi) + b``.

    ``P_g`` resamples the feature map at the transformed positions (bilinear, through
    :func:`invariscope.transforms.warp.warp_affine`; ``forward_map`` is g carried to cell
    coordinates, 3x3); ``F`` is a bank of ``m x m`` convolutions ``C -> C`` with biases
    (padding ``m // 2``), initialised to the identity, so training starts from ``P_g``.
    """

    def __init__(self, channels: int, forward_map: np.ndarray, kernel_size: int = 3) -> None:
        super().__init__()
        self.register_buffer(
            "matrix", torch.as_tensor(np.asarray(forward_map)[:2], dtype=torch.float32)
        )
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            centre = kernel_size // 2
            self.conv.weight[torch.arange(channels), torch.arange(channels), centre, centre] = 1.0
            self.conv.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = features.shape[0]
        moved = warp_affine(features, self.matrix.expand(n, 2, 3).contiguous())
        return self.conv(moved)


def state_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buffer)
    return buffer.getvalue()


def load_state(module: nn.Module, data: bytes) -> nn.Module:
    module.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
    return module


def l2_loss(pred: torch.Tensor, target: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """Mean squared error (optionally of both after a ReLU)."""
    if relu:
        pred, target = F.relu(pred), F.relu(target)
    return ((pred - target) ** 2).mean()


def dense_support(index: np.ndarray, cells_in: int, channels_in: int, channels_out: int):
    """``{output feature: input features}`` of a structured map's support (for tests)."""
    support: Mapping[int, np.ndarray] = {}
    for j, row in enumerate(index):
        cols = np.concatenate(
            [np.arange(c * channels_in, (c + 1) * channels_in) for c in row if c >= 0]
            or [np.zeros(0, dtype=np.int64)]
        )
        for t in range(channels_out):
            support[j * channels_out + t] = cols
    return support
