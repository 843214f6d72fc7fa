"""Photometric transformations: brightness, contrast, grayscale, Gaussian blur, Gaussian noise.

Each function is ``f(images[B, C, H, W], magnitude[B], *, clamp=True, ...) -> [B, C, H, W]``,
deterministic (noise is seeded per image), differentiable in the images and the
magnitude, with a thin ``nn.Module`` of the same defaults. The formulas are Bunne et
al. (2018)'s, rescaled from ``[0, 255]`` to ``[0, 1]``.

Convention:
    Images in ``[0, 1]``; outputs are clamped to ``[0, 1]`` by default (``clamp=False``
    returns the raw formula, e.g. for linearity checks or gradients beyond the range).
    The identity magnitude returns the input exactly.
"""

from __future__ import annotations

import math
import operator
import threading
from collections import OrderedDict
from typing import Any

import torch
from kornia.color import rgb_to_grayscale
from kornia.filters import gaussian_blur2d as _kornia_gaussian_blur2d

from invariscope.errors import InvariscopeError
from invariscope.transforms.registry import (
    Domain,
    TransformModule,
    TransformSpec,
    prepare_magnitude,
    register,
)

__all__ = [
    "brightness",
    "contrast",
    "grayscale",
    "gaussian_blur",
    "gaussian_noise",
    "standard_normal",
    "Brightness",
    "Contrast",
    "Grayscale",
    "GaussianBlur",
    "GaussianNoise",
    "BORDER_TYPES",
]

BORDER_TYPES = ("reflect", "replicate", "circular", "constant")


def _finish(out: torch.Tensor, clamp: bool) -> torch.Tensor:
    return out.clamp(0.0, 1.0) if clamp else out


def brightness(images: torch.Tensor, magnitude: Any, *, clamp: bool = True) -> torch.Tensor:
    """Add ``magnitude`` ``[B]`` to every pixel of ``images`` ``[B, C, H, W]``: ``I + v``.

    Convention:
        Additive, v in [-1, 1], positive = brighter; identity 0. Output clamped to
        ``[0, 1]`` by default (``clamp=False`` to keep ``I + v``).

    >>> import torch
    >>> brightness(torch.full((1, 1, 1, 2), 0.5), 0.25).flatten().tolist()
    [0.75, 0.75]
    """
    v = prepare_magnitude("brightness", images, magnitude)
    return _finish(images + v.view(-1, 1, 1, 1), clamp)


def contrast(images: torch.Tensor, magnitude: Any, *, clamp: bool = True) -> torch.Tensor:
    """Multiply every pixel of ``images`` ``[B, C, H, W]`` by ``magnitude`` ``[B]``: ``v I``.

    Convention:
        Multiplicative factor v >= 0 (v < 1 darker and flatter, v > 1 brighter and
        stronger); identity 1. Output clamped to ``[0, 1]`` by default.
    """
    v = prepare_magnitude("contrast", images, magnitude)
    return _finish(images * v.view(-1, 1, 1, 1), clamp)


def grayscale(images: torch.Tensor, magnitude: Any, *, clamp: bool = True) -> torch.Tensor:
    """Blend ``images`` ``[B, C, H, W]`` towards their grey version: ``(1 - v) I + v gray(I)``.

    ``gray`` is kornia's ``rgb_to_grayscale`` (ITU-R BT.601 weights 0.299, 0.587, 0.114),
    copied to the three channels. One-channel images are returned unchanged (they are
    grey already); other channel counts are refused.

    Convention:
        Blend weight v in [0, 1]: 0 = original (identity), 1 = fully grey. Output clamped
        to ``[0, 1]`` by default. (Bunne et al. print ``(1 - v) I + I_gray``: a typo.)
    """
    v = prepare_magnitude("grayscale", images, magnitude)
    channels = images.shape[1]
    if channels == 1:
        return _finish(images, clamp)
    if channels != 3:
        raise InvariscopeError(
            f"grayscale: needs 1 or 3 channels (RGB), got images of shape {list(images.shape)}"
        )
    gray = rgb_to_grayscale(images)
    return _finish(torch.lerp(images, gray.expand_as(images), v.view(-1, 1, 1, 1)), clamp)


def _radius(sigma: float, size: int, border_type: str) -> int:
    """Half-width of the kernel: ``int(4 sigma + 0.5)`` (scipy's truncate=4), capped for padding."""
    r = int(4.0 * sigma + 0.5)
    if border_type == "reflect":
        r = min(r, size - 1)
    elif border_type == "circular":
        r = min(r, size)
    return r


def gaussian_blur(
    images: torch.Tensor, magnitude: Any, *, border_type: str = "reflect", clamp: bool = True
) -> torch.Tensor:
    """Convolve ``images`` ``[B, C, H, W]`` with a Gaussian of standard deviation ``magnitude`` ``[B]``.

    kornia's ``gaussian_blur2d`` with one sigma per image (one call for the whole batch).
    The sampled kernel is normalised to sum 1 and spans ``+-int(4 sigma_max + 0.5)``
    pixels, ``sigma_max`` the batch's largest sigma (for ``"reflect"`` at most ``size - 1``),
    so smaller sigmas in the same batch see extra Gaussian tail beyond their own 4 sigma
    (a change below 1e-4). Images with sigma 0 are returned exactly.

    Convention:
        sigma in pixels, sigma >= 0, larger = blurrier; identity 0. Borders are extended
        by ``border_type`` (``"reflect"`` default, mirroring about the edge pixel as
        ``numpy.pad(mode="reflect")``; ``"replicate"``, ``"circular"``, ``"constant"``
        zeros). Output clamped to ``[0, 1]`` by default (a blur of ``[0, 1]`` images
        stays inside it, up to rounding).
    """
    sigma = prepare_magnitude("gaussian_blur", images, magnitude)
    if border_type not in BORDER_TYPES:
        raise InvariscopeError(
            f"gaussian_blur: border_type '{border_type}' is not one of {', '.join(BORDER_TYPES)}"
        )
    blurred = sigma.detach() > 0
    if not bool(blurred.any()):
        return images
    H, W = images.shape[-2:]
    s_max = float(sigma.detach().max())
    ry, rx = _radius(s_max, H, border_type), _radius(s_max, W, border_type)
    safe = torch.where(blurred, sigma, torch.ones_like(sigma))  # no 1/0 in the unused branch
    out = _kornia_gaussian_blur2d(
        images, (2 * ry + 1, 2 * rx + 1), torch.stack([safe, safe], -1), border_type=border_type
    )
    out = torch.where(blurred.view(-1, 1, 1, 1), _finish(out, clamp), images)
    return out


# ---------------------------------------------------------------------- seeded noise
class _NoiseCache:
    """Least-recently-used cache of standard normal fields, bounded in bytes (thread-safe)."""

    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, tuple[int, ...]], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        key = (seed, shape)
        with self._lock:
            z = self._items.get(key)
            if z is not None:
                self._items.move_to_end(key)
                return z
        generator = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(shape, generator=generator, dtype=torch.float32)
        size = z.numel() * z.element_size()
        with self._lock:
            if size <= self.max_bytes and key not in self._items:
                self._items[key] = z
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return z


_NOISE = _NoiseCache()


def _seeds(seed: Any, batch: int) -> list[int]:
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise InvariscopeError(
                f"gaussian_noise: seed must be an integer tensor, got {seed.dtype}"
            )
        if seed.dim() == 0:
            return [int(seed) + i for i in range(batch)]
        if tuple(seed.shape) != (batch,):
            raise InvariscopeError(
                f"gaussian_noise: seed has shape {list(seed.shape)}; pass an int or one seed per "
                f"image, shape [{batch}]"
            )
        return seed.tolist()
    try:
        first = operator.index(seed)
    except TypeError:
        raise InvariscopeError(
            f"gaussian_noise: seed must be an int or a [B] integer tensor, got {seed!r}"
        ) from None
    return [first + i for i in range(batch)]


def standard_normal(seed: Any, shape: tuple[int, int, int], batch: int) -> torch.Tensor:
    """The noise fields ``z`` ``[batch, C, H, W]`` (float32, CPU) that :func:`gaussian_noise` adds.

    Image ``i`` gets ``torch.randn((C, H, W), generator=torch.Generator().manual_seed(s_i))``
    with ``s_i = seed[i]`` for a ``[batch]`` tensor, or ``s_i = seed + i`` for an int; the
    field depends only on ``s_i`` and the shape (not on the batch, dtype or device).
    Fields are cached (64 MiB, least recently used), so a sweep that revisits the same
    images at another magnitude does not regenerate them.
    """
    seeds = _seeds(seed, batch)
    shape = tuple(int(s) for s in shape)
    unique = list(dict.fromkeys(seeds))
    fields = torch.stack([_NOISE.get(s, shape) for s in unique])
    if len(unique) == len(seeds):
        return fields
    where = {s: i for i, s in enumerate(unique)}
    return fields[torch.tensor([where[s] for s in seeds])]


def gaussian_noise(
    images: torch.Tensor, magnitude: Any, *, seed: Any = 0, clamp: bool = True
) -> torch.Tensor:
    """Add seeded Gaussian noise of standard deviation ``magnitude`` ``[B]``: ``I + v z``.

    ``z ~ N(0, 1)`` per pixel and channel, from :func:`standard_normal`: image ``i`` uses
    seed ``seed[i]`` (a ``[B]`` integer tensor, e.g. dataset indices in a sweep) or
    ``seed + i`` (an int, default 0). The same ``z`` serves every magnitude, so
    ``gaussian_noise(x, v, clamp=False) - x`` is exactly linear in ``v``.

    Convention:
        Standard deviation v >= 0 in ``[0, 1]`` intensity units (Bunne et al.'s
        ``255 z v`` on ``[0, 255]``); identity 0. Output clamped to ``[0, 1]`` by default.
        Seeded per image: reproducible, never the global random state.

    >>> import torch
    >>> x = torch.full((2, 1, 4, 4), 0.5)
    >>> a = gaussian_noise(x, 0.1, seed=torch.tensor([7, 8]))
    >>> b = gaussian_noise(x[1:], 0.1, seed=torch.tensor([8]))
    >>> torch.equal(a[1:], b)
    True
    """
    v = prepare_magnitude("gaussian_noise", images, magnitude)
    z = standard_normal(seed, tuple(images.shape[1:]), images.shape[0])
    z = z.to(device=images.device, dtype=images.dtype)
    return _finish(images + v.view(-1, 1, 1, 1) * z, clamp)


# ---------------------------------------------------------------------- modules
class Brightness(TransformModule):
    """Module form of :func:`brightness` (``I + v``, clamped to ``[0, 1]`` by default)."""

    transform_name = "brightness"


class Contrast(TransformModule):
    """Module form of :func:`contrast` (``v I``, clamped to ``[0, 1]`` by default)."""

    transform_name = "contrast"


class Grayscale(TransformModule):
    """Module form of :func:`grayscale` (``(1 - v) I + v gray(I)``, clamped by default)."""

    transform_name = "grayscale"


class GaussianBlur(TransformModule):
    """Module form of :func:`gaussian_blur` (sigma in pixels, reflect borders, clamped by default)."""

    transform_name = "gaussian_blur"


class GaussianNoise(TransformModule):
    """Module form of :func:`gaussian_noise` (``I + v z``, seeded per image, default seed 0)."""

    transform_name = "gaussian_noise"


# ---------------------------------------------------------------------- registry
def _spec(name: str, fn, module, **kw: Any) -> None:
    options = kw.pop("options", ("clamp",))
    register(
        TransformSpec(name=name, fn=fn, module=module, kind="photometric", options=options, **kw)
    )


_spec(
    "brightness",
    brightness,
    Brightness,
    identity=0.0,
    domain=Domain(-1.0, 1.0),
    default_range=(-1.0, 1.0, 0.1),
    unit="additive intensity",
    sign="positive = brighter (I + v)",
    description="add v to every pixel",
)
_spec(
    "contrast",
    contrast,
    Contrast,
    identity=1.0,
    domain=Domain(0.0, math.inf),
    default_range=(0.0, 2.0, 0.1),
    unit="factor",
    sign="output v * I (v < 1 darker, v > 1 brighter)",
    description="multiply every pixel by v",
)
_spec(
    "grayscale",
    grayscale,
    Grayscale,
    identity=0.0,
    domain=Domain(0.0, 1.0),
    default_range=(0.0, 1.0, 0.1),
    unit="blend weight",
    sign="0 = original, 1 = fully grey ((1 - v) I + v gray(I))",
    description="blend towards the grey image (BT.601 weights)",
)
_spec(
    "gaussian_blur",
    gaussian_blur,
    GaussianBlur,
    options=("border_type", "clamp"),
    identity=0.0,
    domain=Domain(0.0, math.inf),
    default_range=(0.0, 5.0, 0.5),
    symbol="sigma",
    unit="pixels (standard deviation)",
    sign="larger = blurrier",
    description="Gaussian blur with standard deviation sigma",
)
_spec(
    "gaussian_noise",
    gaussian_noise,
    GaussianNoise,
    options=("seed", "clamp"),
    identity=0.0,
    domain=Domain(0.0, math.inf),
    default_range=(0.0, 1.0, 0.05),
    unit="standard deviation (intensity)",
    sign="larger = noisier (I + v z, z seeded per image)",
    description="additive Gaussian noise, reproducible per image seed",
)
