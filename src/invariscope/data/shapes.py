"""``shapes``: ten classes of synthetic RGB shapes on textured backgrounds.

Each image holds one filled shape (circle, square, triangle, star, cross, ring,
ellipse, hexagon, diamond, arrow) of a random colour, size, position and (except
for the circle and the ring) rotation, on a background that is either smooth random
noise or stripes blending two colours that are both far from the shape's colour
(every point of the line between them is at least :data:`MIN_COLOUR_DISTANCE` from
it in RGB). ``[3, S, S]`` with ``S = 32`` (default) or ``64``, values in ``[0, 1]``.

Rendering is vectorised and exact up to antialiasing: every shape is a signed
distance function in its own frame, evaluated at the pixel centres, and a pixel's
coverage is ``clamp(0.5 - d, 0, 1)`` with ``d`` the signed distance in pixels (the
analytic limit of supersampling a box filter across a straight edge).

Convention:
    Pixel coordinates, origin at the centre of the top-left pixel, x right, y down.
    A shape's rotation is counter-clockwise as displayed; its frame is
    ``p = centre + radius * Rot(angle) q`` with ``q`` in the unit disc.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from invariscope.data.base import (
    TensorImageDataset,
    check_seed,
    check_size,
    check_split,
    make_rng,
)
from invariscope.errors import InvariscopeError

CLASSES = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "ellipse",
    "hexagon",
    "diamond",
    "arrow",
]
IMAGE_SIZES = (32, 64)
DEFAULT_SIZES = {"train": 10_000, "test": 2_000}
ROTATION_INVARIANT = ("circle", "ring")
RADIUS_FRACTION = (0.22, 0.4)  # shape radius as a fraction of the image side
MIN_COLOUR_DISTANCE = 0.45
ELLIPSE_AXES = (1.0, 0.55)
RING_RADII = (0.55, 0.95)  # inner and outer radius of the ring


def _regular(n: int, radius: float = 1.0, phase_deg: float = -90.0) -> np.ndarray:
    a = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(a), np.sin(a)], -1)


@lru_cache(maxsize=1)
def polygons() -> dict[str, torch.Tensor]:
    """Vertex lists ``[V, 2]`` (x, y down) of the polygonal shapes, inside the unit disc."""
    star = _regular(10)
    star[1::2] *= 0.42
    w, r = 0.3, 0.95  # cross: arm half-width and reach
    cross = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w)]
    cross += [(w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    arrow = [(-0.95, -0.22), (0.15, -0.22), (0.15, -0.62), (0.95, 0.0)]
    arrow += [(0.15, 0.62), (0.15, 0.22), (-0.95, 0.22)]
    shapes = {
        "square": _regular(4, 1.0, 45.0),
        "triangle": _regular(3),
        "star": star,
        "cross": np.array(cross),
        "hexagon": _regular(6),
        "diamond": np.array([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]),
        "arrow": np.array(arrow),
    }
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in shapes.items()}


def polygon_sdf(q: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Signed distance from points ``q`` ``[..., 2]`` to a closed polygon ``[V, 2]``.

    Negative inside (even-odd rule), positive outside, in the units of ``q``.
    """
    v0 = vertices
    v1 = torch.roll(vertices, -1, 0)
    e = v1 - v0  # [V, 2]
    w = q[..., None, :] - v0  # [..., V, 2]
    t = ((w * e).sum(-1) / (e * e).sum(-1)).clamp(0, 1)
    dist = (w - t[..., None] * e).square().sum(-1).min(-1).values.sqrt()
    y = q[..., None, 1]
    crosses = (v0[:, 1] <= y) != (v1[:, 1] <= y)
    x_cut = v0[:, 0] + (y - v0[:, 1]) * e[:, 0] / torch.where(e[:, 1] == 0, 1.0, e[:, 1])
    inside = (crosses & (q[..., None, 0] < x_cut)).sum(-1) % 2 == 1
    return torch.where(inside, -dist, dist)


def shape_sdf(name: str, q: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of shape ``name`` at local points ``q`` ``[..., 2]``.

    Local units: the shape fits in the unit disc. The ellipse uses the usual
    first-order approximation ``(k0 - 1) k0 / k1``, exact on the boundary, which is
    all antialiasing needs.
    """
    if name == "circle":
        return q.norm(dim=-1) - 0.95
    if name == "ring":
        inner, outer = RING_RADII
        return (q.norm(dim=-1) - (inner + outer) / 2).abs() - (outer - inner) / 2
    if name == "ellipse":
        axes = torch.tensor(ELLIPSE_AXES)
        k0 = (q / axes).norm(dim=-1)
        k1 = (q / axes**2).norm(dim=-1).clamp_min(1e-6)
        return k0 * (k0 - 1) / k1
    if name in polygons():
        return polygon_sdf(q, polygons()[name])
    raise InvariscopeError(f"unknown shape '{name}'; known: {', '.join(CLASSES)}")


def render_shapes(
    labels: torch.Tensor,
    centres: torch.Tensor,
    radii: torch.Tensor,
    angles_deg: torch.Tensor,
    image_size: int,
) -> torch.Tensor:
    """Antialiased coverage masks of shapes: ``[N, 1, S, S]`` in ``[0, 1]``.

    Args:
        labels: ``[N]`` indices into :data:`CLASSES`.
        centres: ``[N, 2]`` (x, y) in pixels.
        radii: ``[N]`` radius in pixels of the unit disc the shape is drawn in.
        angles_deg: ``[N]`` rotation, counter-clockwise as displayed.
        image_size: ``S``.
    """
    s = image_size
    coords = torch.arange(s, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(1, -1, 2)  # [1, S*S, 2]
    theta = torch.deg2rad(angles_deg.float())
    c, si = torch.cos(theta), torch.sin(theta)
    # Rot(angle) = [[c, s], [-s, c]] in (x, y-down); local q = Rot^T (p - centre) / radius
    rot_t = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)  # [N, 2, 2]
    q = ((pix - centres[:, None].float()) @ rot_t.transpose(1, 2)) / radii[:, None, None].float()
    sd = torch.empty(q.shape[:2])
    for k, name in enumerate(CLASSES):
        sel = labels == k
        if sel.any():
            sd[sel] = shape_sdf(name, q[sel])
    coverage = (0.5 - sd * radii[:, None].float()).clamp(0, 1)
    return coverage.reshape(-1, 1, s, s)


def _textures(rng: np.random.Generator, n: int, s: int) -> torch.Tensor:
    """Background blend weights ``[N, 1, S, S]`` in ``[0, 1]``: smooth noise or stripes."""
    kind = rng.random(n) < 0.5  # True: stripes
    noise = torch.from_numpy(rng.normal(size=(n, 1, 5, 5))).float()
    freq = torch.from_numpy(rng.uniform(1.5, 4.0, n)).float()  # cycles per image side
    phi = torch.from_numpy(rng.uniform(0, math.pi, n)).float()
    phase = torch.from_numpy(rng.uniform(0, 2 * math.pi, n)).float()

    smooth = F.interpolate(noise, size=(s, s), mode="bicubic", align_corners=True)
    lo = smooth.amin((1, 2, 3), keepdim=True)
    hi = smooth.amax((1, 2, 3), keepdim=True)
    smooth = (smooth - lo) / (hi - lo).clamp_min(1e-6)

    coords = torch.arange(s, dtype=torch.float32) / s
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    u = xs * torch.cos(phi)[:, None, None] + ys * torch.sin(phi)[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * freq[:, None, None] * u + phase[:, None, None])
    return torch.where(torch.from_numpy(kind)[:, None, None, None], stripes[:, None], smooth)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``p`` to segments ``[a, b]`` (broadcast over leading axes)."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def _colours(rng: np.random.Generator, n: int, candidates: int = 12):
    """Foreground ``[N, 3]`` and two background colours ``[N, 3]`` each, far from it.

    Among ``candidates`` random colours, a random pair whose whole segment keeps at
    least :data:`MIN_COLOUR_DISTANCE` from the foreground is chosen (the pair farthest
    from it when no pair qualifies, which is rare).
    """
    fg = rng.random((n, 3))
    cand = rng.random((n, candidates, 3))
    a, b = cand[:, :, None], cand[:, None, :]
    dist = _segment_distance(fg[:, None, None], a, b)  # [N, K, K]
    score = np.where(dist >= MIN_COLOUR_DISTANCE, 2.0 + rng.random(dist.shape), dist)
    best = score.reshape(n, -1).argmax(1)
    i, j = np.divmod(best, candidates)
    rows = np.arange(n)
    return fg, cand[rows, i], cand[rows, j]


def load_shapes(
    split: str = "train",
    *,
    size: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    chunk: int | None = None,
) -> TensorImageDataset:
    """The ``shapes`` dataset: ``[3, S, S]`` RGB shapes, ten balanced classes.

    Args:
        split: ``"train"`` or ``"test"`` (independent streams of the same seed).
        size: number of images (default 10,000 for train, 2,000 for test).
        seed: every random choice follows from it.
        image_size: ``S``, 32 or 64; sizes and positions scale with it.
        chunk: images rendered at once (default: ``2**20 / S**2``); memory only, the
            result does not depend on it.

    Shape radius is uniform in :data:`RADIUS_FRACTION` of ``S``, the centre uniform
    over the positions that keep the shape's disc inside the image, the rotation
    uniform in ``[0, 360)`` degrees (0 for the circle and the ring).

    >>> ds = load_shapes("test", size=10, seed=3)
    >>> tuple(ds.images.shape), ds.classes[3]
    ((10, 3, 32, 32), 'star')
    """
    check_split(split)
    seed = check_seed(seed)
    n = check_size(size) or DEFAULT_SIZES[split]
    if image_size not in IMAGE_SIZES:
        raise InvariscopeError(f"shapes image_size must be 32 or 64, got {image_size!r}")
    s = image_size
    chunk = chunk or max(1, 2**20 // (s * s))
    rng = make_rng(seed, "shapes", split, s)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    radii = rng.uniform(*RADIUS_FRACTION, n) * s
    margin = radii + 0.5
    centres = margin[:, None] + rng.random((n, 2)) * (s - 1 - 2 * margin)[:, None]
    angles = rng.uniform(0, 360, n)
    angles[np.isin(labels, [CLASSES.index(c) for c in ROTATION_INVARIANT])] = 0.0
    fg, bg_a, bg_b = _colours(rng, n)
    textures = _textures(rng, n, s)

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    labels_t = torch.from_numpy(labels)
    images = torch.empty(n, 3, s, s)
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        alpha = render_shapes(labels_t[sl], t(centres[sl]), t(radii[sl]), t(angles[sl]), s)
        tex = textures[sl]
        bg = t(bg_a[sl])[:, :, None, None] * (1 - tex) + t(bg_b[sl])[:, :, None, None] * tex
        images[sl] = bg * (1 - alpha) + t(fg[sl])[:, :, None, None] * alpha
    return TensorImageDataset(
        images.clamp_(0, 1),
        labels_t,
        classes=CLASSES,
        name="shapes",
        split=split,
        seed=seed,
    )
