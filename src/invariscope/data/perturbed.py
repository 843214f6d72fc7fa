"""Rotated, translated and scaled digit sets with known perturbations (Finnveden et al. 2020).

Finnveden, Jansson & Lindeberg, "Understanding when spatial transformer networks do
not support invariance" (2020), following Jaderberg et al. (2015), test STNs on three
perturbed versions of MNIST; these are built here for any base digit set of
``[1, 28, 28]`` images (``digits``, ``glyphs``, ``mnist:<dir>``):

- ``rotated-<base>``: the digit rotated about the image centre by an angle uniform in
  ``[-90, 90]`` degrees; ``[1, 28, 28]``.
- ``translated-<base>``: the 28x28 digit pasted at a uniformly random whole-pixel
  position of a 60x60 canvas (its centre ``tx, ty`` in ``[-16, 16]`` px from the canvas
  centre), with clutter: six 6x6 crops of other digits of the same split pasted at
  random positions; ``[1, 60, 60]``.
- ``scaled-<base>``: the digit magnified by ``2**u``, ``u`` uniform in ``[-1, 2]``
  (0.5x to 4x), about the centre of a 112x112 canvas, with six 6x6 clutter crops
  magnified by the same factor at random positions; ``[1, 112, 112]``.

Clutter crops are taken from the central 20x20 box of their source digit (where
MNIST-like digits have their ink), never from the digit itself, and combined with the
digit by a pixel-wise maximum. Every parameter is drawn once at construction from the
seed; the images are rendered then, vectorised, and kept in memory.

Convention:
    ``params`` columns: ``angle_deg`` (counter-clockwise as displayed), ``tx_px`` /
    ``ty_px`` (offset of the digit's centre from the canvas centre in pixels, x right,
    y down), ``log2_scale`` (``log2`` of the magnification); zero where a perturbation
    is not applied. Warps are :mod:`invariscope.transforms` (pixel coordinates, origin
    at the centre of the top-left pixel, bilinear, zeros outside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from invariscope.data.base import (
    TensorImageDataset,
    check_seed,
    check_size,
    make_rng,
)
from invariscope.errors import InvariscopeError
from invariscope.transforms import rotation, zoom

KINDS = ("rotated", "translated", "scaled")
DIGIT_SIZE = 28
CANVAS = {"rotated": 28, "translated": 60, "scaled": 112}
MAX_ANGLE_DEG = 90.0
MAX_SHIFT_PX = (CANVAS["translated"] - DIGIT_SIZE) // 2  # 16
LOG2_SCALE_RANGE = (-1.0, 2.0)
CLUTTER_PIECES = 6
PIECE_SIZE = 6
CROP_BOX = (4, DIGIT_SIZE - 4)  # clutter crops come from this central box of a source digit
PARAM_COLUMNS = ["angle_deg", "tx_px", "ty_px", "log2_scale"]


@dataclass(frozen=True)
class Clutter:
    """Where the clutter of each sample comes from and goes (all int64 numpy arrays).

    ``sources`` ``[N, K]``: base-dataset indices of the digits cropped; ``crop_yx``
    ``[N, K, 2]``: top-left (row, column) of each ``PIECE_SIZE`` crop in its source;
    ``centre_yx`` ``[N, K, 2]``: canvas position (row, column) of the piece's centre
    pixel (rounded down), before any magnification is applied to the piece itself.
    """

    sources: np.ndarray
    crop_yx: np.ndarray
    centre_yx: np.ndarray


def paste_max(
    canvas: torch.Tensor, patches: torch.Tensor, top: torch.Tensor, left: torch.Tensor
) -> torch.Tensor:
    """Paste patches into canvases by pixel-wise maximum; the parts outside are dropped.

    Args:
        canvas: ``[B, C, H, W]``, non-negative (modified in place and returned).
        patches: ``[B, K, C, h, w]``, non-negative.
        top, left: ``[B, K]`` integer positions of the patches' top-left pixels (may
            be negative or beyond the canvas).
    """
    b, k, c, h, w = patches.shape
    H, W = canvas.shape[-2:]
    rows = top[:, :, None, None] + torch.arange(h)[:, None]  # [B, K, h, 1]
    cols = left[:, :, None, None] + torch.arange(w)  # [B, K, 1, w]
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)  # [B, K, h, w]
    flat = (rows.clamp(0, H - 1) * W + cols.clamp(0, W - 1)).expand(b, k, h, w)
    values = patches.permute(0, 2, 1, 3, 4) * inside[:, None]  # [B, C, K, h, w]
    index = flat[:, None].expand(b, c, k, h, w).reshape(b, c, -1)
    out = canvas.reshape(b, c, H * W)
    out.scatter_reduce_(2, index, values.reshape(b, c, -1), reduce="amax", include_self=True)
    return canvas


def crop_pieces(images: torch.Tensor, sources: np.ndarray, crop_yx: np.ndarray) -> torch.Tensor:
    """``PIECE_SIZE`` crops ``[N, K, C, p, p]`` of ``images[sources]`` at ``crop_yx``."""
    p = PIECE_SIZE
    src = torch.as_tensor(sources)
    y = torch.as_tensor(crop_yx[..., 0])[..., None, None] + torch.arange(p)[:, None]
    x = torch.as_tensor(crop_yx[..., 1])[..., None, None] + torch.arange(p)
    pieces = images[src[..., None, None], :, y, x]  # [N, K, p, p, C]
    return pieces.permute(0, 1, 4, 2, 3).contiguous()


def rotate_digits(digits: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """``rotated``: ``digits`` ``[B, C, 28, 28]`` rotated by ``angle_deg`` ``[B]`` about the centre."""
    return rotation(digits, angle_deg)


def translate_digits(
    digits: torch.Tensor,
    tx_px: torch.Tensor,
    ty_px: torch.Tensor,
    pieces: torch.Tensor | None = None,
    centre_yx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``translated``: each 28x28 digit pasted on a 60x60 canvas, plus optional clutter.

    Args:
        digits: ``[B, C, 28, 28]``.
        tx_px, ty_px: ``[B]`` integers in ``[-16, 16]``: the digit's centre lands at the
            canvas centre plus ``(tx, ty)``.
        pieces: ``[B, K, C, p, p]`` clutter pieces, or ``None``.
        centre_yx: ``[B, K, 2]`` canvas positions of the pieces' centres.

    Returns:
        ``[B, C, 60, 60]``; digit and clutter combined by pixel-wise maximum.
    """
    b, c = digits.shape[:2]
    size = CANVAS["translated"]
    canvas = torch.zeros(b, c, size, size)
    if pieces is not None:
        half = pieces.shape[-1] // 2
        paste_max(canvas, pieces, centre_yx[..., 0] - half, centre_yx[..., 1] - half)
    offset = MAX_SHIFT_PX
    paste_max(
        canvas, digits[:, None], (ty_px.long() + offset)[:, None], (tx_px.long() + offset)[:, None]
    )
    return canvas


def _window(side: int, factor: float, limit: int | None = None) -> int:
    """Side of a square that holds ``side`` px magnified by ``factor``, same parity as ``side``."""
    w = max(side, int(np.ceil(side * factor)) + 2)
    w += (w - side) % 2
    return w if limit is None else min(w, limit)


def scale_digits(
    digits: torch.Tensor,
    log2_scale: torch.Tensor,
    pieces: torch.Tensor | None = None,
    centre_yx: torch.Tensor | None = None,
    *,
    group: int = 128,
) -> torch.Tensor:
    """``scaled``: each digit magnified by ``2**log2_scale`` in the middle of 112x112, plus clutter.

    The result is that of putting the digit in the middle of the canvas (its centre on
    the canvas centre) and magnifying it about that centre with
    :func:`invariscope.transforms.zoom`. Each clutter piece is magnified by the same
    factor about its own centre and pasted with its centre at ``centre_yx``. For speed,
    images are processed in groups of similar factor, each warped only inside the
    central window that can hold its magnified digit (outside it the warp reads zeros).

    Args:
        digits: ``[B, C, 28, 28]``.
        log2_scale: ``[B]``.
        pieces: ``[B, K, C, p, p]`` clutter pieces, or ``None``.
        centre_yx: ``[B, K, 2]`` canvas positions of the pieces' centres.
        group: images warped together.

    Returns:
        ``[B, C, 112, 112]``; digit and clutter combined by pixel-wise maximum.
    """
    b, c = digits.shape[:2]
    size = CANVAS["scaled"]
    factor = torch.exp2(log2_scale.float())
    out = torch.zeros(b, c, size, size)
    order = torch.argsort(factor, stable=True)
    for lo in range(0, b, group):
        idx = order[lo : lo + group]
        f = factor[idx]
        fmax = float(f.max())
        w = _window(DIGIT_SIZE, fmax, size)
        pad, off = (w - DIGIT_SIZE) // 2, (size - w) // 2
        part = torch.zeros(len(idx), c, size, size)
        part[:, :, off : off + w, off : off + w] = zoom(F.pad(digits[idx], (pad,) * 4), f)
        if pieces is not None:
            k, p = pieces.shape[1], pieces.shape[-1]
            big = _window(p, fmax)
            m = (big - p) // 2
            patches = F.pad(pieces[idx].reshape(-1, c, p, p), (m,) * 4)
            patches = zoom(patches, f.repeat_interleave(k)).reshape(len(idx), k, c, big, big)
            half = big // 2
            paste_max(part, patches, centre_yx[idx, :, 0] - half, centre_yx[idx, :, 1] - half)
        out[idx] = part
    return out


class PerturbedDataset(TensorImageDataset):
    """A perturbed digit set: ``images``/``labels`` plus the perturbation of every sample.

    Attributes:
        kind: ``"rotated"``, ``"translated"`` or ``"scaled"``.
        base: the base dataset (its ``images`` ``[M, 1, 28, 28]``).
        base_indices: ``[N]`` int64 tensor, the base image of each sample.
        params: DataFrame, one row per sample, columns :data:`PARAM_COLUMNS`.
        clutter: :class:`Clutter` or ``None`` (rotated sets, or ``clutter=False``).

    The fingerprint hashes name, split, seed, size and the rendered images and labels.
    """

    def __init__(
        self,
        kind: str,
        base: TensorImageDataset,
        *,
        name: str,
        size: int | None = None,
        seed: int = 0,
        clutter: bool = True,
        chunk: int = 512,
    ) -> None:
        if kind not in KINDS:
            raise InvariscopeError(f"unknown perturbation '{kind}'; use one of {', '.join(KINDS)}")
        images = getattr(base, "images", None)
        if images is None or tuple(images.shape[1:]) != (1, DIGIT_SIZE, DIGIT_SIZE):
            shape = None if images is None else tuple(images.shape[1:])
            raise InvariscopeError(
                f"{name}: the base dataset '{base.name}' must hold [1, 28, 28] digit images "
                f"in memory, got {shape}; use digits, glyphs or mnist:<dir>"
            )
        seed = check_seed(seed)
        m = len(base)
        n = check_size(size) or m
        rng = make_rng(seed, kind, base.split)
        base_idx = _base_indices(rng, m, n)
        params = _sample_params(kind, rng, n)
        pieces_spec = _sample_clutter(kind, rng, base_idx, m, params) if clutter else None
        if kind == "rotated":
            pieces_spec = None

        out = torch.empty(n, 1, CANVAS[kind], CANVAS[kind])
        for lo in range(0, n, chunk):
            sl = slice(lo, min(n, lo + chunk))
            digits = images[torch.as_tensor(base_idx[sl])]
            pieces = centres = None
            if pieces_spec is not None:
                pieces = crop_pieces(images, pieces_spec.sources[sl], pieces_spec.crop_yx[sl])
                centres = torch.as_tensor(pieces_spec.centre_yx[sl])
            p = {k: torch.as_tensor(v[sl]) for k, v in params.items()}
            if kind == "rotated":
                out[sl] = rotate_digits(digits, p["angle_deg"].float())
            elif kind == "translated":
                out[sl] = translate_digits(digits, p["tx_px"], p["ty_px"], pieces, centres)
            else:
                out[sl] = scale_digits(digits, p["log2_scale"], pieces, centres)
        super().__init__(
            out.clamp_(0, 1),
            base.labels[torch.as_tensor(base_idx)],
            classes=base.classes,
            name=name,
            split=base.split,
            seed=seed,
        )
        self.kind = kind
        self.base = base
        self.base_indices = torch.as_tensor(base_idx)
        self.params = pd.DataFrame({c: params[c].astype(np.float64) for c in PARAM_COLUMNS})
        self.clutter = pieces_spec

    def sample(self, index: int) -> tuple[torch.Tensor, int, dict[str, float]]:
        """``(image [1, H, W], label, {angle_deg, tx_px, ty_px, log2_scale})`` of sample ``index``."""
        image, label = self[index]
        row = self.params.iloc[index]
        return image, label, {c: float(row[c]) for c in PARAM_COLUMNS}


def _base_indices(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """``arange(m)`` when ``n == m``; else the first ``n`` of concatenated random permutations."""
    if n == m:
        return np.arange(m)
    reps = -(-n // m)
    return np.concatenate([rng.permutation(m) for _ in range(reps)])[:n]


def _sample_params(kind: str, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    params = {c: np.zeros(n) for c in PARAM_COLUMNS}
    if kind == "rotated":
        params["angle_deg"] = rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG, n)
    elif kind == "translated":
        params["tx_px"] = rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, n).astype(np.int64)
        params["ty_px"] = rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, n).astype(np.int64)
    else:
        params["log2_scale"] = rng.uniform(*LOG2_SCALE_RANGE, n)
    return params


def _sample_clutter(
    kind: str, rng: np.random.Generator, base_idx: np.ndarray, m: int, params: dict[str, np.ndarray]
) -> Clutter:
    """Sources (never the sample's own digit when ``m > 1``), crops and positions of clutter."""
    n, k, p = len(base_idx), CLUTTER_PIECES, PIECE_SIZE
    if m > 1:
        sources = (base_idx[:, None] + 1 + rng.integers(0, m - 1, (n, k))) % m
    else:
        sources = np.zeros((n, k), dtype=np.int64)
    crop_yx = rng.integers(CROP_BOX[0], CROP_BOX[1] - p + 1, (n, k, 2))
    size = CANVAS[kind]
    # half the (magnified) piece stays inside the canvas
    half = p / 2 * (np.exp2(params["log2_scale"]) if kind == "scaled" else np.ones(n))
    lo = np.ceil(half - 0.5)[:, None, None]
    hi = np.floor(size - half - 0.5)[:, None, None]
    centre_yx = (lo + np.floor(rng.random((n, k, 2)) * (hi - lo + 1))).astype(np.int64)
    return Clutter(sources.astype(np.int64), crop_yx.astype(np.int64), centre_yx)


__all__ = [
    "CANVAS",
    "KINDS",
    "PARAM_COLUMNS",
    "Clutter",
    "PerturbedDataset",
    "crop_pieces",
    "paste_max",
    "rotate_digits",
    "scale_digits",
    "translate_digits",
]
