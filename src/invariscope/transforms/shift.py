"""Small-shift protocols: sequences of frames one pixel (or one small step) apart.

Azulay & Weiss (2019) measure how a classifier's output changes when an image moves by
ONE pixel. How the image is moved matters, so each way is a named protocol:

- ``embed``: the image downscaled by ``factor`` (bilinear, antialiased) and embedded in
  a canvas of the input size at consecutive 1-pixel offsets along ``direction``; the
  rest of the canvas is inpainted (:func:`inpaint`, their "simple inpainting
  procedure"), black, or the small image's mean colour.
- ``crop``: consecutive 1-pixel shifted windows of the image enlarged by ``steps - 1``
  pixels (no inpainting: every pixel is image content).
- ``scale``: the embedded image resized in 1-pixel size steps (their rescaling protocol).
- ``circular``: ``torch.roll`` by ``t`` pixels (exact; nothing enters from a border).
- ``subpixel``: translations by ``t * step`` pixels (default 0.25) through the package's
  one warp core (:func:`~invariscope.transforms.warp_affine`), zeros fill by default.
- ``sequence:NAME``: any registered continuous transformation at magnitudes
  ``identity + t * step``: the perturbation sequences of ImageNet-P (Hendrycks &
  Dietterich 2019). ``sequence:gaussian_noise`` draws a fresh noise field per frame at
  one magnitude, and is compared with its first frame (``reference == "first"``).

Every frame has the size of the input images ``[B, C, H, W]``. :meth:`ShiftProtocol.at`
gives 2-D offsets per image for Zhang (2019)'s consistency (random pairs of shifts,
drawn by the caller). All functions are pure and deterministic, work on any device,
any number of channels and float32 / float64 images.

Convention:
    Images float ``[B, C, H, W]`` in ``[0, 1]``. Offsets in pixels, positive = down
    (vertical) / right (horizontal); ``diagonal`` moves one pixel on both axes per
    frame. Geometric warps (``subpixel``, geometric sequences) fill with zeros by
    default (``padding="border"`` / ``"reflection"``); photometric sequences are
    clamped to ``[0, 1]`` as their transformations are.

>>> import torch
>>> p = parse_protocol("circular", steps=4, direction="horizontal")
>>> x = torch.arange(4.0).view(1, 1, 1, 4)
>>> p.frame(x, 1).flatten().tolist()
[3.0, 0.0, 1.0, 2.0]
>>> p.positions(1, 4).tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from invariscope.errors import InvariscopeError, hint, unknown_name
from invariscope.transforms.registry import check_images, get_transform, list_transforms
from invariscope.transforms.warp import PADDING_MODES, warp_affine

__all__ = [
    "PROTOCOLS",
    "DIRECTIONS",
    "FILLS",
    "SEQUENCE_STEPS",
    "inpaint",
    "embed",
    "ShiftProtocol",
    "parse_protocol",
]

PROTOCOLS = ("embed", "crop", "scale", "circular", "subpixel")
DIRECTIONS = ("vertical", "horizontal", "diagonal")
FILLS = ("black", "mean", "inpaint")

SEQUENCE_PREFIX = "sequence:"

# Default magnitude step per frame of ``sequence:NAME``, in the transformation's own unit.
# ``None`` for translations: one pixel, i.e. 1 / W (translate_x) or 1 / H (translate_y),
# computed from the images. contrast steps DOWN: v > 1 clips bright pixels to 1, so an
# increasing sequence would soon stop changing them; v < 1 keeps every frame distinct.
SEQUENCE_STEPS: dict[str, float | None] = {
    "rotation": 1.0,
    "zoom": 0.01,
    "scale_x": 0.01,
    "scale_y": 0.01,
    "translate_x": None,
    "translate_y": None,
    "shear_x": 0.01,
    "shear_y": 0.01,
    "brightness": 0.01,
    "contrast": -0.01,
    "gaussian_blur": 0.1,
    "grayscale": 0.05,
    "gaussian_noise": 0.05,
}

# Frame t of sequence:gaussian_noise for image i uses the seed
# NOISE_SEED + t + NOISE_STRIDE * base_i (base_i = seed + i, or seed[i] for a tensor).
NOISE_SEED = 1000
NOISE_STRIDE = 2**20

_SHIFT_OFFSETS = {"vertical": (1, 0), "horizontal": (0, 1), "diagonal": (1, 1)}


# ---------------------------------------------------------------------- inpainting
def _binomial_weights(size: int) -> list[float]:
    """Pascal's row of length ``size``, normalised to sum 1 (the 1-D binomial kernel)."""
    row = [math.comb(size - 1, i) for i in range(size)]
    return [v / sum(row) for v in row]


def _blur(x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Separable blur of ``x`` ``[..., H, W]`` by ``weights`` on both axes, zero padding, same size.

    The same as ``F.conv2d`` with the outer-product kernel and zero padding, written as a
    weighted sum of shifted slices: several times faster than a one-channel convolution
    on CPU, and differentiable.
    """
    k = len(weights)
    r = k // 2
    H, W = x.shape[-2:]
    xp = F.pad(x, (0, 0, r, r))
    y = xp[..., 0:H, :] * weights[0]
    for i in range(1, k):
        y = y.add(xp[..., i : i + H, :], alpha=weights[i])
    yp = F.pad(y, (r, r, 0, 0))
    z = yp[..., 0:W] * weights[0]
    for i in range(1, k):
        z = z.add(yp[..., i : i + W], alpha=weights[i])
    return z


def inpaint(
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    kernel_size: int = 5,
    max_iter: int | None = None,
) -> torch.Tensor:
    """Fill the unknown pixels of ``images`` by iterative normalised convolution.

    Each iteration blurs the known pixels and the mask with the binomial kernel (the
    outer product of Pascal's row of length ``kernel_size``, normalised), and every
    unknown pixel within reach of a known one takes ``blur(I m) / blur(m)`` and becomes
    known; repeated until every pixel is known (at most ``max_iter`` iterations, default
    ``H + W``, always enough). The blur pads with zeros, so the border invents no data:
    near it the average is over the known pixels inside the image only.

    Args:
        images: float ``[B, C, H, W]``; the values at unknown pixels are ignored.
        mask: bool ``[B, 1, H, W]`` or ``[1, 1, H, W]``, True where the pixel is known.
        kernel_size: odd, >= 3; each iteration reaches ``kernel_size // 2`` pixels further.
        max_iter: the most iterations; pixels still unknown after them are left 0.

    Returns:
        ``[B, C, H, W]``, same dtype and device; known pixels are returned bit-exactly.
        Differentiable in ``images``.

    >>> import torch
    >>> x = torch.tensor([[[[0.0, 0.0, 0.0, 0.8]]]])
    >>> m = torch.tensor([[[[False, False, False, True]]]])
    >>> inpaint(x, m).flatten().tolist()
    [0.800000011920929, 0.800000011920929, 0.800000011920929, 0.800000011920929]
    """
    check_images("inpaint", images)
    B, C, H, W = images.shape
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InvariscopeError(f"inpaint: mask must be a bool tensor (True = known), got {got}")
    if (
        mask.dim() != 4
        or mask.shape[1] != 1
        or mask.shape[0] not in (1, B)
        or tuple(mask.shape[-2:]) != (H, W)
    ):
        raise InvariscopeError(
            f"inpaint: mask must have shape [{B}, 1, {H}, {W}] or [1, 1, {H}, {W}], "
            f"got {list(mask.shape)}"
        )
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3:
        raise InvariscopeError(f"inpaint: kernel_size must be an odd int >= 3, got {kernel_size!r}")
    if kernel_size % 2 == 0:
        raise InvariscopeError(f"inpaint: kernel_size must be odd, got {kernel_size}")
    if max_iter is None:
        max_iter = H + W
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise InvariscopeError(f"inpaint: max_iter must be an int >= 0, got {max_iter!r}")
    known = mask.to(images.device).expand(B, 1, H, W)
    empty = ~known.flatten(1).any(1)
    if bool(empty.any()):
        first = int(empty.nonzero()[0, 0])
        raise InvariscopeError(
            f"inpaint: image {first} has no known pixel (its mask is all False); "
            "mark at least one pixel as known"
        )
    weights = _binomial_weights(kernel_size)
    out = torch.where(known, images, torch.zeros((), dtype=images.dtype, device=images.device))
    for _ in range(max_iter):
        if bool(known.all()):
            break
        num = _blur(out, weights)
        den = _blur(known.to(images.dtype), weights)
        new = (den > 0) & ~known
        safe = torch.where(den > 0, den, torch.ones_like(den))
        out = torch.where(new, num / safe, out)
        known = known | new
    return out


# ---------------------------------------------------------------------- embedding
def _int_offsets(who: str, what: str, value: Any, batch: int) -> torch.Tensor:
    """``value`` (int, 0-d or ``[B]`` tensor of integral numbers) as a CPU int64 ``[B]``."""
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.is_complex() or t.dtype == torch.bool:
        raise InvariscopeError(f"{who}: {what} must be integers, got {t.dtype}")
    t = t.cpu()
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == torch.round(t)).all()):
            raise InvariscopeError(f"{who}: {what} must be whole pixels, got {t.tolist()}")
    t = t.to(torch.int64)
    if t.dim() == 0:
        return t.expand(batch).clone()
    if t.dim() == 1 and t.shape[0] in (1, batch):
        return t.expand(batch).clone()
    raise InvariscopeError(
        f"{who}: {what} must be an int or a tensor [{batch}] (one per image), got shape "
        f"{list(t.shape)}"
    )


def _small_size(who: str, H: int, W: int, factor: float, size: Any) -> tuple[int, int]:
    if size is None:
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise InvariscopeError(f"{who}: factor must be a number in (0, 1], got {factor!r}")
        if not (0.0 < factor <= 1.0):
            raise InvariscopeError(f"{who}: factor must be in (0, 1], got {factor:g}")
        h, w = round(factor * H), round(factor * W)
    else:
        if isinstance(size, int) and not isinstance(size, bool):
            h = w = size
        else:
            try:
                h, w = (operator.index(s) for s in size)
            except (TypeError, ValueError):
                raise InvariscopeError(
                    f"{who}: size must be an int or (height, width) ints, got {size!r}"
                ) from None
    if not (1 <= h <= H and 1 <= w <= W):
        raise InvariscopeError(
            f"{who}: the embedded image would be {h}x{w} in a {H}x{W} canvas; it must be at "
            "least 1x1 and fit the canvas (use a factor in (0, 1])"
        )
    return h, w


def _resize(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def _place(
    small: torch.Tensor, top: torch.Tensor, left: torch.Tensor, H: int, W: int, fill: str
) -> torch.Tensor:
    """Put ``small`` ``[B, C, h, w]`` at integer ``(top, left)`` ``[B]`` in an ``H x W`` canvas."""
    B, C, h, w = small.shape
    dev = small.device
    b = torch.arange(B, device=dev).view(B, 1, 1)
    rows = (top.to(dev).view(B, 1) + torch.arange(h, device=dev)).view(B, h, 1)
    cols = (left.to(dev).view(B, 1) + torch.arange(w, device=dev)).view(B, 1, w)
    canvas = small.new_zeros(B, H, W, C).index_put((b, rows, cols), small.permute(0, 2, 3, 1))
    canvas = canvas.permute(0, 3, 1, 2).contiguous()
    if fill == "black":
        return canvas
    mask = torch.zeros(B, H, W, dtype=torch.bool, device=dev)
    mask = mask.index_put((b, rows, cols), torch.ones((), dtype=torch.bool, device=dev))
    mask = mask.unsqueeze(1)
    if fill == "mean":
        mean = small.mean(dim=(-2, -1), keepdim=True)
        return torch.where(mask, canvas, mean.expand_as(canvas))
    return inpaint(canvas, mask)


def _check_fill(who: str, fill: str) -> None:
    if fill not in FILLS:
        raise InvariscopeError(f"{who}: fill '{fill}' is not one of {', '.join(FILLS)}")


def embed(
    images: torch.Tensor,
    top: Any,
    left: Any,
    *,
    factor: float = 0.5,
    size: Any = None,
    fill: str = "inpaint",
) -> torch.Tensor:
    """Embed each image, downscaled, at an integer position in a canvas of the input size.

    Each image is resized (bilinear, antialiased) to ``size`` (an int or ``(h, w)``;
    default ``(round(factor * H), round(factor * W))``) and placed with its top-left
    pixel at ``(top[b], left[b])`` in an ``H x W`` canvas. The rest of the canvas is
    ``fill``: ``"black"`` (0), ``"mean"`` (the small image's mean per channel) or
    ``"inpaint"`` (:func:`inpaint` from the small image; Azulay & Weiss's protocol).

    Args:
        images: float ``[B, C, H, W]``.
        top, left: ints or integer-valued tensors ``[B]``; ``0 <= top <= H - h`` and
            ``0 <= left <= W - w`` (the small image stays inside the canvas).

    Returns:
        ``[B, C, H, W]``, same dtype and device; the placed block is exactly the resized
        image. Differentiable in ``images``.

    >>> import torch
    >>> out = embed(torch.ones(1, 1, 4, 4), 1, 2, factor=0.5, fill="black")
    >>> out[0, 0].tolist()[1]
    [0.0, 0.0, 1.0, 1.0]
    """
    check_images("embed", images)
    _check_fill("embed", fill)
    B, _, H, W = images.shape
    h, w = _small_size("embed", H, W, factor, size)
    top = _int_offsets("embed", "top", top, B)
    left = _int_offsets("embed", "left", left, B)
    for what, value, free in (("top", top, H - h), ("left", left, W - w)):
        bad = (value < 0) | (value > free)
        if bool(bad.any()):
            raise InvariscopeError(
                f"embed: {what} {int(value[bad][0])} would put the {h}x{w} image outside the "
                f"{H}x{W} canvas; use {what} in 0..{free}"
            )
    return _place(_resize(images, h, w), top, left, H, W, fill)


# ---------------------------------------------------------------------- shift helpers
def _roll(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Circular shift of each image by its own ``(dy, dx)`` ``[B]`` pixels (down / right)."""
    B, C, H, W = images.shape
    dev = images.device
    rows = (torch.arange(H, device=dev).view(1, H) - dy.to(dev).view(B, 1)) % H
    cols = (torch.arange(W, device=dev).view(1, W) - dx.to(dev).view(B, 1)) % W
    out = images.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, W))
    return out.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))


def _window(big: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``H x W`` windows of ``big`` ``[B, C, RH, RW]`` with top-left at ``(oy, ox)`` ``[B]``."""
    B, C, _, RW = big.shape
    dev = big.device
    rows = oy.to(dev).view(B, 1) + torch.arange(H, device=dev).view(1, H)
    cols = ox.to(dev).view(B, 1) + torch.arange(W, device=dev).view(1, W)
    out = big.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, RW))
    return out.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))


def _translate(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, padding: str
) -> torch.Tensor:
    """Translate each image by ``(dy, dx)`` ``[B]`` pixels through the warp core.

    Images with offset ``(0, 0)`` are returned exactly (the warp core's float32 rounding
    at the identity, about 2e-6, would otherwise make the origin frame differ).
    """
    B = images.shape[0]
    dy = dy.to(device=images.device, dtype=images.dtype).expand(B)
    dx = dx.to(device=images.device, dtype=images.dtype).expand(B)
    still = (dy == 0) & (dx == 0)
    if bool(still.all()):
        return images
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    matrix = torch.stack([torch.stack([one, zero, dx], -1), torch.stack([zero, one, dy], -1)], -2)
    out = warp_affine(images, matrix, padding_mode=padding)
    return torch.where(still.view(B, 1, 1, 1), images, out)


# ---------------------------------------------------------------------- protocols
def _sequence_transforms() -> list[str]:
    """Registered transformations that make a sequence (continuous, scalar magnitude)."""
    return [n for n in list_transforms() if _sequence_refusal(n) is None]


def _sequence_refusal(name: str) -> str | None:
    spec = get_transform(name)
    if spec.magnitude_shape:
        return "its magnitude is a [2, 3] matrix, not a number that can grow step by step"
    if spec.kind == "discrete" or spec.integer:
        return f"it is discrete ({spec.valid_range}), so it has no small steps"
    return None


@dataclass(frozen=True)
class ShiftProtocol:
    """One small-shift protocol: how frame ``t`` (``0 <= t < steps``) of an image is made.

    Fields:
        name: ``"embed"``, ``"crop"``, ``"scale"``, ``"circular"``, ``"subpixel"`` or
            ``"sequence:NAME"`` for a registered transformation NAME.
        steps: the number of frames T (>= 2).
        direction: ``"vertical"`` (down), ``"horizontal"`` (right) or ``"diagonal"``
            (both, one pixel each per frame); shift protocols only.
        factor: size of the embedded image relative to the canvas (embed, scale).
        fill: ``"inpaint"``, ``"black"`` or ``"mean"`` around the embedded image.
        step: subpixel: pixels per frame (default 0.25, > 0); ``sequence:NAME``: the
            magnitude step per frame in the transformation's unit (default
            :data:`SEQUENCE_STEPS`; translations: one pixel); other protocols take none.
        padding: what a warp reads outside the image (``subpixel`` and geometric
            sequences): ``"zeros"`` (default), ``"border"`` or ``"reflection"``.

    All frames have the input's size. See the module docstring for each protocol.
    """

    name: str
    steps: int = 16
    direction: str = "vertical"
    factor: float = 0.5
    fill: str = "inpaint"
    step: float | None = None
    padding: str = "zeros"

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str):
            raise InvariscopeError(f"shift protocol must be a name, got {name!r}")
        if name.startswith(SEQUENCE_PREFIX):
            transform = name[len(SEQUENCE_PREFIX) :]
            if transform not in list_transforms():
                raise unknown_name("sequence transform", transform, _sequence_transforms())
            refusal = _sequence_refusal(transform)
            if refusal is not None:
                raise InvariscopeError(
                    f"{name}: {transform} makes no sequence ({refusal}); use one of "
                    f"{', '.join('sequence:' + n for n in _sequence_transforms())}"
                )
        elif name not in PROTOCOLS:
            raise unknown_name("shift protocol", name, [*PROTOCOLS, "sequence:<transform>"])
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 2:
            raise InvariscopeError(f"{name}: frames must be an int >= 2, got {steps!r}")
        if self.direction not in DIRECTIONS:
            raise InvariscopeError(
                f"{name}: direction '{self.direction}' is not one of {', '.join(DIRECTIONS)}"
            )
        _check_fill(name, self.fill)
        if (
            isinstance(self.factor, bool)
            or not isinstance(self.factor, int | float)
            or not (0.0 < self.factor <= 1.0)
        ):
            raise InvariscopeError(
                f"{name}: factor must be a number in (0, 1], got {self.factor!r}"
            )
        if self.padding not in PADDING_MODES:
            raise InvariscopeError(
                f"{name}: padding '{self.padding}' is not one of {', '.join(PADDING_MODES)}"
            )
        step = self.step
        if step is not None:
            if self.transform is None and name != "subpixel":
                raise InvariscopeError(
                    f"{name}: takes no step (only subpixel and sequence:NAME do); "
                    "its frames are 1 pixel apart"
                )
            if (
                isinstance(step, bool)
                or not isinstance(step, int | float)
                or not math.isfinite(step)
            ):
                raise InvariscopeError(f"{name}: step must be a finite number, got {step!r}")
            if name == "subpixel" and not step > 0:
                raise InvariscopeError(f"subpixel: step must be > 0 pixels, got {step:g}")
            if step == 0:
                raise InvariscopeError(f"{name}: step must not be 0 (every frame would be equal)")
        if self.transform is not None:
            if self.transform not in SEQUENCE_STEPS and step is None:
                raise InvariscopeError(
                    f"{name}: has no default step; pass step= (in {get_transform(self.transform).unit})"
                )
            self._check_sequence(1, 1)

    # ------------------------------------------------------------------ properties
    @property
    def transform(self) -> str | None:
        """The transformation of a ``sequence:NAME`` protocol, else None."""
        if self.name.startswith(SEQUENCE_PREFIX):
            return self.name[len(SEQUENCE_PREFIX) :]
        return None

    @property
    def reference(self) -> str:
        """``"first"`` for ``sequence:gaussian_noise`` (each frame against the first), else ``"adjacent"``."""
        return "first" if self.transform == "gaussian_noise" else "adjacent"

    @property
    def unit(self) -> str:
        """Unit of :meth:`positions`, for axis labels."""
        if self.transform == "gaussian_noise":
            return "frame"
        if self.transform is not None:
            return get_transform(self.transform).unit
        return "px"

    @property
    def supports_2d(self) -> bool:
        """True where :meth:`at` gives 2-D offsets (embed, crop, circular, subpixel)."""
        return self.name in ("embed", "crop", "circular", "subpixel")

    @property
    def pixel_step(self) -> float:
        """The subpixel step in pixels (0.25 by default); 1 for the other shift protocols."""
        if self.name == "subpixel":
            return 0.25 if self.step is None else float(self.step)
        return 1.0

    # ------------------------------------------------------------------ geometry
    def _small(self, H: int, W: int) -> tuple[int, int]:
        return _small_size(self.name, H, W, self.factor, None)

    def _crop_layout(self, H: int, W: int) -> tuple[int, int]:
        """``(RH, RW)``: the enlarged image size; each axis gains at least ``steps - 1`` px.

        Both axes are scaled by the same factor ``s = max((H + m) / H, (W + m) / W)``
        (``m = steps - 1``), so the aspect is kept; square images become ``(H + m, W + m)``.
        """
        m = self.steps - 1
        s = max((H + m) / H, (W + m) / W)
        return max(H + m, round(H * s)), max(W + m, round(W * s))

    def _scale_sizes(self, H: int, W: int, steps: int) -> list[tuple[int, int]]:
        h0, w0 = self._small(H, W)
        return [(h0 + t - steps // 2, w0 + t - steps // 2) for t in range(steps)]

    def _embed_origin(self, H: int, W: int) -> tuple[int, int]:
        """Top-left of frame 0: the sweep is centred in the canvas (floor)."""
        h, w = self._small(H, W)
        ay, ax = _SHIFT_OFFSETS[self.direction]
        m = self.steps - 1
        return (H - h - m * ay) // 2, (W - w - m * ax) // 2

    def _pixel_offsets(self, t: int) -> tuple[float, float]:
        ay, ax = _SHIFT_OFFSETS[self.direction]
        return t * ay * self.pixel_step, t * ax * self.pixel_step

    # ------------------------------------------------------------------ checks
    def check(self, height: int, width: int) -> None:
        """Raise :class:`InvariscopeError` if this protocol cannot make frames of ``height x width``.

        embed: ``steps - 1`` must fit the free space around the small image; scale: every
        frame size must be >= 2 and fit the canvas; subpixel: the whole sweep must stay
        under the image size; sequences: every magnitude inside the transformation's domain.
        """
        H, W = _size(self.name, height, width)
        name, T = self.name, self.steps
        if name == "embed":
            h, w = self._small(H, W)
            ay, ax = _SHIFT_OFFSETS[self.direction]
            free = min(f for f, a in ((H - h, ay), (W - w, ax)) if a)
            if T - 1 > free:
                raise InvariscopeError(
                    f"embed: {T} {self.direction} frames need {T - 1} free pixels but a {h}x{w} "
                    f"image in a {H}x{W} canvas leaves {free}; use frames <= {free + 1} or a "
                    "smaller factor"
                )
        elif name == "scale":
            if not self._scale_fits(H, W, T):
                fit = [n for n in range(2, T) if self._scale_fits(H, W, n)]
                sizes = self._scale_sizes(H, W, T)
                fix = f"use frames <= {fit[-1]}" if fit else "use a factor nearer 0.5"
                raise InvariscopeError(
                    f"scale: {T} frames resize the image from {sizes[0][0]}x{sizes[0][1]} to "
                    f"{sizes[-1][0]}x{sizes[-1][1]} pixels, but frames must be at least 2x2 and "
                    f"fit the {H}x{W} canvas; {fix}"
                )
        elif name == "subpixel":
            ay, ax = _SHIFT_OFFSETS[self.direction]
            extent = (T - 1) * self.pixel_step
            limit = min(n for n, a in ((H, ay), (W, ax)) if a)
            if extent >= limit:
                raise InvariscopeError(
                    f"subpixel: {T} frames, {self.pixel_step:g} px apart, move the image "
                    f"{extent:g} px, out of the {H}x{W} image; use fewer frames or a smaller step"
                )
        elif self.transform is not None:
            self._check_sequence(H, W)

    def _scale_fits(self, H: int, W: int, steps: int) -> bool:
        sizes = self._scale_sizes(H, W, steps)
        (h_lo, w_lo), (h_hi, w_hi) = sizes[0], sizes[-1]
        return min(h_lo, w_lo) >= 2 and h_hi <= H and w_hi <= W

    def _sequence_step(self, H: int, W: int) -> float:
        if self.step is not None:
            return float(self.step)
        default = SEQUENCE_STEPS[self.transform]
        if default is None:  # translations: one pixel
            return 1.0 / (W if self.transform == "translate_x" else H)
        return default

    def _magnitudes(self, H: int, W: int, steps: int) -> np.ndarray:
        spec = get_transform(self.transform)
        step = self._sequence_step(H, W)
        if self.transform == "gaussian_noise":
            return np.full(steps, step, dtype=np.float64)
        ident = float(spec.identity)
        return np.array([round(ident + t * step, 12) for t in range(steps)], dtype=np.float64)

    def _check_sequence(self, H: int, W: int) -> None:
        spec = get_transform(self.transform)
        mags = self._magnitudes(H, W, self.steps)
        ok = spec.domain.contains(torch.from_numpy(mags)).numpy()
        if ok.all():
            return
        bad = int(np.argmin(ok))
        step = hint("step", "--step")
        fix = (
            f"use frames <= {bad} or a smaller {step}"
            if bad >= 2
            else f"use a smaller {step} (or one of the other sign)"
        )
        raise InvariscopeError(
            f"{self.name}: frame {bad} has magnitude {mags[bad]:g}, outside the valid domain "
            f"{spec.valid_range} of {spec.name} ({spec.unit}); {fix}"
        )

    # ------------------------------------------------------------------ frames
    def positions(self, height: int, width: int) -> np.ndarray:
        """What each frame is, ``[T]`` float64, in :attr:`unit`.

        Shift protocols: pixels from the first frame (per axis for diagonal; ``t * step``
        for subpixel); scale: the size change in pixels from the ``factor`` size
        (``t - T // 2``); sequences: the magnitude; ``sequence:gaussian_noise``: the frame
        number (every frame has the same magnitude ``step``).
        """
        H, W = _size(self.name, height, width)
        T = self.steps
        if self.transform == "gaussian_noise":
            return np.arange(T, dtype=np.float64)
        if self.transform is not None:
            return self._magnitudes(H, W, T)
        if self.name == "scale":
            return np.arange(T, dtype=np.float64) - T // 2
        return np.arange(T, dtype=np.float64) * self.pixel_step

    def frame(self, images: torch.Tensor, t: int, *, seed: Any = 0) -> torch.Tensor:
        """Frame ``t`` (``0 <= t < steps``) of every image: ``[B, C, H, W]``, same dtype and device.

        ``seed`` matters for ``sequence:gaussian_noise`` only: an int or a ``[B]`` integer
        tensor of per-image base seeds (e.g. dataset indices; an int ``s`` means
        ``s + i`` for image ``i``). Frame ``t`` of image ``i`` adds the noise of seed
        ``1000 + t + 2**20 * base_i``: reproducible, and a fresh draw per frame.
        """
        check_images(self.name, images)
        try:
            t = operator.index(t)
        except TypeError:
            raise InvariscopeError(f"{self.name}: frame index must be an int, got {t!r}") from None
        if not 0 <= t < self.steps:
            raise InvariscopeError(
                f"{self.name}: frame {t} out of range; this protocol has frames 0..{self.steps - 1}"
            )
        B, _, H, W = images.shape
        self.check(H, W)
        name = self.name
        if name == "embed":
            top0, left0 = self._embed_origin(H, W)
            ay, ax = _SHIFT_OFFSETS[self.direction]
            return embed(images, top0 + t * ay, left0 + t * ax, factor=self.factor, fill=self.fill)
        if name == "crop":
            RH, RW = self._crop_layout(H, W)
            ay, ax = _SHIFT_OFFSETS[self.direction]
            oy = t if ay else (RH - H) // 2
            ox = t if ax else (RW - W) // 2
            return _resize(images, RH, RW)[..., oy : oy + H, ox : ox + W].contiguous()
        if name == "scale":
            h, w = self._scale_sizes(H, W, self.steps)[t]
            small = _resize(images, h, w)
            top = torch.full((B,), (H - h) // 2, dtype=torch.int64)
            left = torch.full((B,), (W - w) // 2, dtype=torch.int64)
            return _place(small, top, left, H, W, self.fill)
        if name == "circular":
            ay, ax = _SHIFT_OFFSETS[self.direction]
            dims = tuple(d for d, a in ((-2, ay), (-1, ax)) if a)
            return torch.roll(images, shifts=(t,) * len(dims), dims=dims)
        if name == "subpixel":
            dy, dx = self._pixel_offsets(t)
            return _translate(images, torch.tensor(dy), torch.tensor(dx), self.padding)
        # sequence:NAME
        spec = get_transform(self.transform)
        magnitude = float(self._magnitudes(H, W, t + 1)[t])
        if spec.name == "gaussian_noise":
            base = _noise_bases(seed, B)
            return spec(images, magnitude, seed=NOISE_SEED + t + NOISE_STRIDE * base)
        if spec.kind == "geometric":
            return spec(images, magnitude, padding_mode=self.padding)
        return spec(images, magnitude)

    # ------------------------------------------------------------------ 2-D offsets
    def max_offset(self, height: int, width: int) -> int:
        """The largest 2-D offset :meth:`at` accepts on both axes (offsets run 0..max_offset).

        embed: the free space ``min(H - h, W - w)``; crop: the margin ``steps - 1``;
        circular: ``min(H, W) - 1``; subpixel: ``ceil((steps - 1) * step)`` pixels (the
        sweep's extent; draw multiples of ``step`` up to it).
        """
        H, W = _size(self.name, height, width)
        self._need_2d()
        if self.name == "embed":
            h, w = self._small(H, W)
            return min(H - h, W - w)
        if self.name == "crop":
            return self.steps - 1
        if self.name == "circular":
            return min(H, W) - 1
        return max(1, math.ceil((self.steps - 1) * self.pixel_step - 1e-9))

    def at(self, images: torch.Tensor, dy: Any, dx: Any) -> torch.Tensor:
        """Each image at its own 2-D offset ``(dy[b], dx[b])`` from the protocol's origin.

        ``dy``/``dx``: numbers or tensors ``[B]`` (pixels, down / right). embed: whole
        pixels from the canvas's top-left free position, ``0..H - h`` / ``0..W - w``;
        crop: the window's top-left in the enlarged image, ``0..RH - H`` / ``0..RW - W``
        (at least ``steps - 1``); circular: any whole pixels (``torch.roll`` per image);
        subpixel: any finite pixels, warped (zeros fill by default). Returns ``[B, C, H, W]``.
        Protocols without 2-D support (scale, sequences) raise InvariscopeError.
        """
        check_images(self.name, images)
        self._need_2d()
        B, _, H, W = images.shape
        name = self.name
        if name == "subpixel":
            dyt = _float_offsets(name, "dy", dy, B)
            dxt = _float_offsets(name, "dx", dx, B)
            return _translate(images, dyt, dxt, self.padding)
        dyt = _int_offsets(name, "dy", dy, B)
        dxt = _int_offsets(name, "dx", dx, B)
        if name == "embed":
            return embed(images, dyt, dxt, factor=self.factor, fill=self.fill)
        if name == "circular":
            return _roll(images, dyt, dxt)
        RH, RW = self._crop_layout(H, W)
        for what, value, margin in (("dy", dyt, RH - H), ("dx", dxt, RW - W)):
            bad = (value < 0) | (value > margin)
            if bool(bad.any()):
                raise InvariscopeError(
                    f"crop: {what} {int(value[bad][0])} outside the crop margin; use {what} in "
                    f"0..{margin} (more steps enlarge the margin)"
                )
        return _window(_resize(images, RH, RW), dyt, dxt, H, W)

    def _need_2d(self) -> None:
        if not self.supports_2d:
            raise InvariscopeError(
                f"{self.name}: has no 2-D offsets; use embed, crop, circular or subpixel"
            )


def _size(who: str, height: Any, width: Any) -> tuple[int, int]:
    try:
        H, W = operator.index(height), operator.index(width)
    except TypeError:
        raise InvariscopeError(
            f"{who}: height and width must be ints, got {height!r}, {width!r}"
        ) from None
    if H < 1 or W < 1:
        raise InvariscopeError(f"{who}: image size must be positive, got {H}x{W}")
    return H, W


def _float_offsets(who: str, what: str, value: Any, batch: int) -> torch.Tensor:
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.is_complex() or t.dtype == torch.bool:
        raise InvariscopeError(f"{who}: {what} must be real numbers, got {t.dtype}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InvariscopeError(f"{who}: {what} must be finite pixels, got {t.tolist()}")
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] in (1, batch)):
        return t.expand(batch)
    raise InvariscopeError(
        f"{who}: {what} must be a number or a tensor [{batch}] (one per image), got shape "
        f"{list(t.shape)}"
    )


def _noise_bases(seed: Any, batch: int) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise InvariscopeError(
                f"sequence:gaussian_noise: seed must be integers, got {seed.dtype}"
            )
        if seed.dim() == 0:
            return int(seed) + torch.arange(batch, dtype=torch.int64)
        if tuple(seed.shape) != (batch,):
            raise InvariscopeError(
                f"sequence:gaussian_noise: seed has shape {list(seed.shape)}; pass an int or "
                f"one seed per image, shape [{batch}]"
            )
        return seed.detach().cpu().to(torch.int64)
    try:
        first = operator.index(seed)
    except TypeError:
        raise InvariscopeError(
            f"sequence:gaussian_noise: seed must be an int or a [B] integer tensor, got {seed!r}"
        ) from None
    return first + torch.arange(batch, dtype=torch.int64)


def parse_protocol(text: str, **options: Any) -> ShiftProtocol:
    """The :class:`ShiftProtocol` named ``text`` with ``options`` (its fields).

    ``text`` is one of :data:`PROTOCOLS` or ``"sequence:NAME"`` for a registered
    continuous transformation NAME. Options whose value is None are left at their
    defaults (so a command line can pass unset options through).

    >>> parse_protocol("sequence:rotation", steps=4).positions(8, 8).tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    if not isinstance(text, str):
        raise InvariscopeError(f"shift protocol must be a name, got {text!r}")
    valid = [f.name for f in fields(ShiftProtocol) if f.name != "name"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InvariscopeError(
            f"shift protocol: unknown option '{unknown[0]}'; valid options: {', '.join(valid)}"
        )
    given = {k: v for k, v in options.items() if v is not None}
    return ShiftProtocol(text.strip(), **given)
