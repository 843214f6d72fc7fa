"""``glyphs``: the digits 0-9 rendered from the fonts that ship with matplotlib.

Base glyphs are rasterised once per process with FreeType (matplotlib's
:class:`~matplotlib.ft2font.FT2Font`, the renderer behind its Agg backend) from every
``.ttf`` file in ``matplotlib/mpl-data/fonts/ttf``, cropped to their ink, resized so
that the longer side of the box is 20 px (at 28 px resolution), put in a canvas with
their centre of mass at the centre, as MNIST was made. Fonts that do not have the
digits are dropped by :func:`digit_fonts` (see there).

Each sample then gets, from a seeded generator and vectorised over the batch, at
twice the output resolution: a random stroke width (grey-scale dilation / erosion by
max-pooling, precomputed once per base glyph), then a small random affine map
(rotation, scale, aspect, shear, shift) and a smooth elastic displacement applied in
ONE bilinear resampling, then a 2x2 box filter down to ``[1, 28, 28]``. White digit on
black, values in ``[0, 1]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from invariscope.data.base import (
    TensorImageDataset,
    centre_by_mass,
    check_seed,
    check_size,
    check_split,
    make_rng,
)
from invariscope.errors import InvariscopeError

CLASSES = [str(d) for d in range(10)]
IMAGE_SIZE = 28
SUPERSAMPLE = 2  # jitter is applied at SUPERSAMPLE * 28 px, then box-filtered down
DIGIT_BOX = 20  # longer side of a base glyph's ink box at 28 px, as in MNIST
RENDER_PX = 160  # FreeType size in pixels per em when rasterising base glyphs
DEFAULT_SIZES = {"train": 10_000, "test": 2_000}
MIN_INK = 5.0  # a glyph with less total ink (in pixels at 28 px) is empty
MIN_DISTANCE = 2.0  # smallest L2 distance between two digits of one font (28 px, [0, 1])


@dataclass(frozen=True)
class GlyphJitter:
    """Ranges of the per-sample jitter: uniform in ``[-v, v]`` for a single number ``v``,
    in ``[lo, hi]`` for a pair; lengths in pixels at 28 px.

    Convention: ``rotation_deg`` positive = counter-clockwise as displayed; the affine
    map acts about the image centre; ``stroke_px`` is the range of the target stroke
    width (each glyph is dilated or eroded by whole steps towards a width drawn from
    it, see :func:`stroke_width`); ``elastic_px`` is the standard deviation of the
    displacement at the coarse control points (``elastic_grid`` x ``elastic_grid``)
    before bicubic upsampling to a smooth field.
    """

    rotation_deg: float = 12.0
    log2_scale: tuple[float, float] = (-0.25, 0.1)
    log2_aspect: float = 0.15
    shear: float = 0.2
    shift_px: float = 1.5
    elastic_px: float = 0.8
    elastic_grid: int = 4
    stroke_px: tuple[float, float] = (1.5, 4.0)


def font_dir() -> Path:
    """The folder of TrueType fonts bundled with matplotlib (``mpl-data/fonts/ttf``)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def render_glyph(font_path: str | Path, char: str, *, px: int = RENDER_PX) -> np.ndarray:
    """Rasterise one character with FreeType, antialiased.

    Returns:
        float32 ``[H, W]`` ink coverage in ``[0, 1]``, cropped to the glyph's bitmap
        (all zeros, possibly tiny, when the font has no glyph for ``char``).
    """
    from matplotlib.ft2font import FT2Font

    font = FT2Font(str(font_path))
    font.set_size(px, 72)  # at 72 dpi one point is one pixel
    with warnings.catch_warnings():  # matplotlib warns about glyphs missing from the font
        warnings.simplefilter("ignore")
        font.set_text(char)
    font.draw_glyphs_to_bitmap(antialiased=True)
    return np.asarray(font.get_image(), dtype=np.float32) / 255.0


def normalise_glyph(ink: np.ndarray, *, box: int, size: int) -> np.ndarray:
    """Crop ``ink`` to its bounding box, fit into ``box`` x ``box``, centre by mass in ``size``.

    The aspect ratio is kept (the longer side becomes ``box``); the resize is
    antialiased bilinear. Returns float32 ``[size, size]`` in ``[0, 1]``; all zeros for
    an empty glyph.
    """
    rows, cols = np.nonzero(ink > 0.02)
    if len(rows) == 0:
        return np.zeros((size, size), np.float32)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = crop.shape
    k = box / max(h, w)
    nh, nw = max(1, round(h * k)), max(1, round(w * k))
    t = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
    small = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    out = np.zeros((size, size), np.float32)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = small[0, 0].clamp(0, 1).numpy()
    return centre_by_mass(out[None], max_shift=(size - box) // 2)[0]


def _render_font(path: Path, size: int) -> np.ndarray:
    """The ten digits of one font, normalised: ``[10, size, size]``."""
    scale = size / IMAGE_SIZE
    box = round(DIGIT_BOX * scale)
    return np.stack(
        [normalise_glyph(render_glyph(path, str(d)), box=box, size=size) for d in range(10)]
    )


def font_has_digits(glyphs: np.ndarray) -> bool:
    """Whether a font's ten digits ``[10, 28, 28]`` are all non-empty and pairwise distinct.

    Non-empty: at least :data:`MIN_INK` total ink. Distinct: every pair of digits is
    more than :data:`MIN_DISTANCE` apart in L2 (on ``[0, 1]`` pixels), so a font that
    draws every digit as the same "missing" box, or blank, fails.
    """
    ink = glyphs.reshape(10, -1).sum(axis=1)
    if (ink < MIN_INK).any():
        return False
    flat = glyphs.reshape(10, -1).astype(np.float64)
    dist = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))
    return bool(dist[~np.eye(10, dtype=bool)].min() > MIN_DISTANCE)


def _recognisable(bank: np.ndarray) -> np.ndarray:
    """Which fonts of ``bank`` ``[F, 10, H, W]`` draw digits that look like the others' digits.

    A symbol font can map the digit code points to ten distinct non-digit symbols
    (``cmsy10``: prime, infinity, ...), which :func:`font_has_digits` cannot tell from
    digits. Here each font's digit ``d`` must be nearer (L2) to the median of digit
    ``d`` over the OTHER fonts than to the median of any other digit, for at least
    eight of the ten digits.
    """
    n = bank.shape[0]
    keep = np.zeros(n, dtype=bool)
    for f in range(n):
        others = np.delete(bank, f, axis=0)
        if len(others) == 0:
            keep[f] = True
            continue
        templates = np.median(others, axis=0).reshape(10, -1)
        mine = bank[f].reshape(10, -1)
        dist = ((mine[:, None] - templates[None]) ** 2).sum(-1)
        keep[f] = (dist.argmin(axis=1) == np.arange(10)).sum() >= 8
    return keep


@lru_cache(maxsize=4)
def _font_bank(size: int) -> tuple[tuple[str, ...], torch.Tensor]:
    """Kept font names and their digits ``[F, 10, 1, size, size]`` (the filter runs at 28 px)."""
    rendered = {path: _render_font(path, IMAGE_SIZE) for path in sorted(font_dir().glob("*.ttf"))}
    candidates = [path for path, g in rendered.items() if font_has_digits(g)]
    keep = _recognisable(np.stack([rendered[path] for path in candidates]))
    paths = [path for path, k in zip(candidates, keep, strict=True) if k]
    if not paths:
        raise InvariscopeError(f"no font with digits found in {font_dir()}; reinstall matplotlib")
    glyphs = [rendered[p] if size == IMAGE_SIZE else _render_font(p, size) for p in paths]
    bank = torch.from_numpy(np.stack(glyphs)).unsqueeze(2).contiguous()
    return tuple(p.stem for p in paths), bank


def digit_fonts() -> list[str]:
    """Names (file stems) of matplotlib's bundled fonts kept for ``glyphs``.

    A font is kept when its ten digit glyphs are non-empty and pairwise distinct
    (:func:`font_has_digits`) and recognisably the same digits as the other fonts'
    (the "Display", STIX size/non-Unicode, ``cmex10``, ``cmsy10`` and the LastResort
    fonts fail).
    """
    return list(_font_bank(IMAGE_SIZE)[0])


def base_glyphs(size: int = IMAGE_SIZE) -> torch.Tensor:
    """The base (un-jittered) glyphs of the kept fonts: float32 ``[F, 10, 1, size, size]``.

    Index ``[f, d]`` is digit ``d`` of font ``digit_fonts()[f]``; cached per process.
    """
    return _font_bank(size)[1]


def _affine_inverse(rng: np.random.Generator, n: int, jitter: GlyphJitter) -> np.ndarray:
    """Random affine maps (linear part only) about the centre, inverted: ``[n, 2, 2]``.

    The forward map is ``R(theta) @ Shear(k) @ diag(s * a, s / a)`` in pixel coordinates
    (x right, y down; ``R`` turns counter-clockwise as displayed).
    """
    theta = np.deg2rad(rng.uniform(-jitter.rotation_deg, jitter.rotation_deg, n))
    s = 2.0 ** rng.uniform(*jitter.log2_scale, n)
    a = 2.0 ** rng.uniform(-jitter.log2_aspect, jitter.log2_aspect, n)
    k = rng.uniform(-jitter.shear, jitter.shear, n)
    c, si = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([c, si], -1), np.stack([-si, c], -1)], -2)
    shear = np.zeros((n, 2, 2))
    shear[:, 0, 0] = shear[:, 1, 1] = 1.0
    shear[:, 0, 1] = k
    scale = np.zeros((n, 2, 2))
    scale[:, 0, 0] = s * a
    scale[:, 1, 1] = s / a
    return np.linalg.inv(rot @ shear @ scale)


def stroke_width(images: torch.Tensor) -> torch.Tensor:
    """Mean stroke width of each image ``[B, 1, H, W]`` in pixels: ``2 * ink / perimeter``.

    For a stroke of width w and length L the ink is ``w L`` and the outline ``2 L``;
    the outline length is measured as the total variation of the (antialiased) image.
    """
    dy = images[:, :, 1:, :-1] - images[:, :, :-1, :-1]
    dx = images[:, :, :-1, 1:] - images[:, :, :-1, :-1]
    perimeter = torch.sqrt(dx**2 + dy**2).sum((1, 2, 3))
    return 2 * images.sum((1, 2, 3)) / perimeter.clamp_min(1e-6)


def _dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 1, 1)


def _erode(x: torch.Tensor) -> torch.Tensor:
    return -F.max_pool2d(-x, 3, 1, 1)


STROKE_STEPS = tuple(range(-2, 4))  # erosion (<0) / dilation (>0) steps kept per base glyph


def stroke_variants(
    images: torch.Tensor, steps: tuple[int, ...] = STROKE_STEPS, *, max_opening_loss: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image dilated or eroded by each of ``steps``, and which erosions are safe.

    Grey-scale dilation is a 3x3 max-pool, erosion a 3x3 min-pool; one step moves every
    edge by one pixel, so the stroke width changes by 2 px per step. An erosion by
    ``j`` steps is safe when the opening (the erosion dilated back ``j`` times) keeps at
    least ``1 - max_opening_loss`` of the ink: thick strokes just get thinner, while thin
    parts (serif hairlines) would vanish and make it unsafe.

    Args:
        images: ``[B, C, H, W]`` non-negative.
        steps: increasing integers, including 0.

    Returns:
        ``variants`` ``[B, len(steps), C, H, W]`` and ``safe`` ``[B, len(steps)]`` bool
        (always True for dilations and 0).
    """
    variants = torch.empty(images.shape[0], len(steps), *images.shape[1:])
    safe = torch.ones(images.shape[0], len(steps), dtype=torch.bool)
    ink = images.sum((1, 2, 3))
    for i, k in enumerate(steps):
        x = images
        for _ in range(abs(k)):
            x = _dilate(x) if k > 0 else _erode(x)
        variants[:, i] = x
        if k < 0:
            opened = x
            for _ in range(-k):
                opened = _dilate(opened)
            safe[:, i] = opened.sum((1, 2, 3)) >= (1 - max_opening_loss) * ink
    return variants, safe


@lru_cache(maxsize=2)
def _stroke_bank(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stroke variants ``[F, 10, K, 1, S, S]``, widths ``[F, 10]`` (px), smallest safe step ``[F, 10]``."""
    bank = base_glyphs(size)
    f = bank.shape[0]
    flat = bank.reshape(f * 10, *bank.shape[2:])
    variants, safe = stroke_variants(flat)
    steps = torch.tensor(STROKE_STEPS)
    # erosions are nested: the deepest safe one is the first safe step
    lowest = torch.where(safe, steps, steps.max()).min(1).values
    return (
        variants.reshape(f, 10, *variants.shape[1:]),
        stroke_width(flat).reshape(f, 10),
        lowest.reshape(f, 10),
    )


def _elastic_basis(grid: int, size: int) -> torch.Tensor:
    """``[grid * grid, size * size]``: bicubic upsampling as a matrix (it is linear)."""
    eye = torch.eye(grid * grid).reshape(grid * grid, 1, grid, grid)
    up = F.interpolate(eye, size=(size, size), mode="bicubic", align_corners=True)
    return up.reshape(grid * grid, size * size)


def jitter_geometry(
    glyphs: torch.Tensor,
    rng: np.random.Generator,
    jitter: GlyphJitter | None = None,
    *,
    chunk: int = 2048,
) -> torch.Tensor:
    """Random affine and elastic jitter, then a box filter to 28 px.

    Each image ``i`` is resampled once (bilinear) at output pixel ``p`` from
    ``c + A_i^-1 (p - c - t_i) + d_i(p)``: ``A_i`` a random rotation, shear, scale and
    aspect change about the centre ``c``, ``t_i`` a random shift, ``d_i`` a smooth
    displacement field (Gaussian values at ``elastic_grid`` x ``elastic_grid`` control
    points, bicubic in between); then 2x2 averaging brings ``2 * 28`` px to 28 px.

    Args:
        glyphs: float32 ``[N, 1, S, S]`` at ``S = 2 * 28`` px.
        rng: source of every random number (all drawn before any image work, so the
            result does not depend on ``chunk``).
        jitter: ranges (default :class:`GlyphJitter`).

    Returns:
        float32 ``[N, 1, 28, 28]`` in ``[0, 1]``.

    Convention:
        Pixel coordinates, origin at the centre of the top-left pixel, x right, y down;
        rotation counter-clockwise as displayed; zeros outside the input.
    """
    jitter = jitter or GlyphJitter()
    n, _, size, _ = glyphs.shape
    k = size / IMAGE_SIZE
    g = jitter.elastic_grid
    inv = torch.from_numpy(_affine_inverse(rng, n, jitter)).float()
    shift = torch.from_numpy(rng.uniform(-jitter.shift_px, jitter.shift_px, (n, 2))).float() * k
    coarse = torch.from_numpy(rng.normal(0.0, jitter.elastic_px, (n, 2, g * g))).float() * k
    basis = _elastic_basis(g, size)

    c = (size - 1) / 2
    axis = torch.arange(size, dtype=torch.float32)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(1, -1, 2) - c  # [1, S*S, 2] centred output coords
    out = torch.empty(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        src = (pix - shift[lo:hi, None]) @ inv[lo:hi].transpose(1, 2)  # A^-1 (p - c - t)
        src = src + (coarse[lo:hi] @ basis).transpose(1, 2)  # + d(p)
        grid = (src / c).reshape(hi - lo, size, size, 2)  # to [-1, 1], align_corners=True
        warped = F.grid_sample(
            glyphs[lo:hi], grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        out[lo:hi] = F.avg_pool2d(warped, SUPERSAMPLE).clamp(0, 1)
    return out


def load_glyphs(
    split: str = "train",
    *,
    size: int | None = None,
    seed: int = 0,
    jitter: GlyphJitter | None = None,
) -> TensorImageDataset:
    """The ``glyphs`` dataset: jittered font digits, ``[1, 28, 28]``, balanced classes.

    Args:
        split: ``"train"`` or ``"test"``; the two splits draw from independent streams
            of the same seed (same fonts, different jitter).
        size: number of images (default 10,000 for train, 2,000 for test).
        seed: every random choice (font, digit order, jitter) follows from it.
        jitter: ranges of the random jitter (default :class:`GlyphJitter`).

    Labels are balanced (``size // 10`` or one more per class) in a seeded random
    order; fonts are drawn uniformly from :func:`digit_fonts`; each glyph's stroke is
    dilated or eroded by whole steps towards a width drawn from ``jitter.stroke_px``
    (erosion only as far as :func:`stroke_variants` finds safe), then
    :func:`jitter_geometry` warps it.

    >>> ds = load_glyphs("test", size=20, seed=1)
    >>> len(ds), tuple(ds.images.shape), sorted(set(ds.labels.tolist())) == list(range(10))
    (20, (20, 1, 28, 28), True)
    """
    check_split(split)
    seed = check_seed(seed)
    jitter = jitter or GlyphJitter()
    n = check_size(size) or DEFAULT_SIZES[split]
    rng = make_rng(seed, "glyphs", split)
    variants, widths, lowest = _stroke_bank(IMAGE_SIZE * SUPERSAMPLE)
    labels = torch.from_numpy(rng.permutation(np.arange(n) % 10))
    fonts = torch.from_numpy(rng.integers(0, variants.shape[0], n))
    target = torch.from_numpy(rng.uniform(*jitter.stroke_px, n)).float() * SUPERSAMPLE
    # one step changes the width by 2 px
    steps = torch.round((target - widths[fonts, labels]) / 2).long()
    steps = torch.maximum(steps, lowest[fonts, labels]).clamp(max=max(STROKE_STEPS))
    base = variants[fonts, labels, steps - min(STROKE_STEPS)]
    images = jitter_geometry(base, rng, jitter)
    return TensorImageDataset(
        images,
        labels,
        classes=CLASSES,
        name="glyphs",
        split=split,
        seed=seed,
    )


__all__ = [
    "GlyphJitter",
    "base_glyphs",
    "jitter_geometry",
    "stroke_variants",
    "digit_fonts",
    "font_has_digits",
    "load_glyphs",
    "render_glyph",
    "stroke_width",
]
