"""Geometric and discrete transformations: warps about the image centre, flips, quarter turns.

Each function is ``f(images[B, C, H, W], magnitude[B], *, mode="bilinear",
padding_mode="zeros") -> [B, C, H, W]``, deterministic, differentiable in the images
and (for the continuous ones) in the magnitude, and has a thin ``nn.Module`` with the
same defaults. Its forward pixel matrix is ``get_transform(name).matrix(magnitude, H, W)``
(also exported as ``<name>_matrix``), and the function is exactly
``warp_affine(images, matrix)``.

Convention:
    Pixel coordinates: origin at the centre of the top-left pixel, x right, y DOWN; the
    centre ``c = ((W - 1) / 2, (H - 1) / 2)`` is the fixed point of rotations, scalings
    and shears. Warps fill positions outside the input with zeros by default
    (``padding_mode="border"`` or ``"reflection"`` selectable) and resample bilinearly
    (``mode="nearest"`` / ``"bicubic"`` selectable). Signs: rotation positive =
    counter-clockwise as displayed; translations positive = right / down; scale factors
    > 1 magnify the content about the centre; ``shear_x`` positive moves rows below the
    centre to the right, ``shear_y`` positive moves columns right of the centre down.
    ``hflip``, ``vflip`` and ``rot90`` are exact index operations (no interpolation, no
    padding); ``rot90(k)`` turns counter-clockwise as displayed, as
    ``torch.rot90(images, k, dims=(-2, -1))``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from invariscope.errors import InvariscopeError
from invariscope.transforms.registry import (
    Domain,
    TransformModule,
    TransformSpec,
    get_transform,
    prepare_magnitude,
    register,
)
from invariscope.transforms.warp import about_centre, check_warp_options, warp_affine

__all__ = [
    "rotation",
    "translate_x",
    "translate_y",
    "scale_x",
    "scale_y",
    "zoom",
    "shear_x",
    "shear_y",
    "affine",
    "hflip",
    "vflip",
    "rot90",
    "rotation_matrix",
    "translate_x_matrix",
    "translate_y_matrix",
    "scale_x_matrix",
    "scale_y_matrix",
    "zoom_matrix",
    "shear_x_matrix",
    "shear_y_matrix",
    "hflip_matrix",
    "vflip_matrix",
    "rot90_matrix",
    "Rotation",
    "TranslateX",
    "TranslateY",
    "ScaleX",
    "ScaleY",
    "Zoom",
    "ShearX",
    "ShearY",
    "Affine",
    "HFlip",
    "VFlip",
    "Rot90",
]

_WARP_OPTIONS = ("mode", "padding_mode")


# ---------------------------------------------------------------------- matrices
def _linear(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 2]`` from the four entries ``[[a, b], [c, d]]``, each ``[B]``."""
    return torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)


def rotation_matrix(degrees: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix ``[B, 2, 3]`` of a rotation by ``degrees`` ``[B]`` about the centre.

    Counter-clockwise as displayed (y down): ``x' = c_x + cos(a)(x - c_x) + sin(a)(y - c_y)``,
    ``y' = c_y - sin(a)(x - c_x) + cos(a)(y - c_y)``.
    """
    rad = torch.deg2rad(degrees)
    c, s = torch.cos(rad), torch.sin(rad)
    return about_centre(_linear(c, s, -s, c), H, W)


def translate_x_matrix(fraction: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix of a shift by ``fraction * W`` pixels to the right."""
    one, zero = torch.ones_like(fraction), torch.zeros_like(fraction)
    return torch.stack(
        [torch.stack([one, zero, fraction * W], -1), torch.stack([zero, one, zero], -1)], -2
    )


def translate_y_matrix(fraction: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix of a shift by ``fraction * H`` pixels down."""
    one, zero = torch.ones_like(fraction), torch.zeros_like(fraction)
    return torch.stack(
        [torch.stack([one, zero, zero], -1), torch.stack([zero, one, fraction * H], -1)], -2
    )


def scale_x_matrix(factor: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix magnifying the content horizontally by ``factor`` about the centre."""
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return about_centre(_linear(factor, zero, zero, one), H, W)


def scale_y_matrix(factor: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix magnifying the content vertically by ``factor`` about the centre."""
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return about_centre(_linear(one, zero, zero, factor), H, W)


def zoom_matrix(factor: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix magnifying the content by ``factor`` on both axes about the centre."""
    zero = torch.zeros_like(factor)
    return about_centre(_linear(factor, zero, zero, factor), H, W)


def shear_x_matrix(k: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix ``x' = x + k (y - c_y)``: rows below the centre move right for k > 0."""
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    return about_centre(_linear(one, k, zero, one), H, W)


def shear_y_matrix(k: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix ``y' = y + k (x - c_x)``: columns right of the centre move down for k > 0."""
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    return about_centre(_linear(one, zero, k, one), H, W)


def _affine_matrix(matrix: torch.Tensor, H: int, W: int) -> torch.Tensor:
    return matrix


def hflip_matrix(flag: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix of a left-right mirror (``x' = W - 1 - x``) where ``flag`` is 1, identity where 0."""
    one, zero = torch.ones_like(flag), torch.zeros_like(flag)
    return about_centre(_linear(1 - 2 * flag, zero, zero, one), H, W)


def vflip_matrix(flag: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix of a top-bottom mirror (``y' = H - 1 - y``) where ``flag`` is 1, identity where 0."""
    one, zero = torch.ones_like(flag), torch.zeros_like(flag)
    return about_centre(_linear(one, zero, zero, 1 - 2 * flag), H, W)


def rot90_matrix(k: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrix of ``k`` exact quarter turns counter-clockwise (as displayed) about the centre."""
    idx = torch.round(k.detach()).long() % 4
    c = k.new_tensor([1.0, 0.0, -1.0, 0.0])[idx]
    s = k.new_tensor([0.0, 1.0, 0.0, -1.0])[idx]
    return about_centre(_linear(c, s, -s, c), H, W)


# ---------------------------------------------------------------------- functions
def _warp(
    name: str, images: torch.Tensor, magnitude: Any, mode: str, padding_mode: str
) -> torch.Tensor:
    m = prepare_magnitude(name, images, magnitude)
    check_warp_options(name, mode, padding_mode)
    H, W = images.shape[-2:]
    matrix = get_transform(name).matrix_fn(m, H, W)
    return warp_affine(images, matrix, mode=mode, padding_mode=padding_mode)


def rotation(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Rotate ``images`` ``[B, C, H, W]`` by ``magnitude`` ``[B]`` degrees about the centre.

    Output ``I(rot((x, y), -v))``. Identity 0; any finite angle.

    Convention:
        Degrees, positive = counter-clockwise as displayed (a point right of the centre
        moves to the top for +90). Zeros fill by default (``padding_mode`` border /
        reflection selectable); bilinear resampling; differentiable in images and angle.

    >>> import torch
    >>> x = torch.zeros(1, 1, 5, 5); x[0, 0, 2, 4] = 1.0   # right of the centre
    >>> divmod(rotation(x, 90.0)[0, 0].argmax().item(), 5)   # now at the top: (row 0, column 2)
    (0, 2)
    """
    return _warp("rotation", images, magnitude, mode, padding_mode)


def translate_x(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Shift ``images`` ``[B, C, H, W]`` horizontally by ``magnitude * W`` pixels: ``I(x - vW, y)``.

    Convention:
        Fraction of the width, positive = right; identity 0. Zeros fill the uncovered
        columns by default (``padding_mode`` border / reflection selectable).
    """
    return _warp("translate_x", images, magnitude, mode, padding_mode)


def translate_y(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Shift ``images`` ``[B, C, H, W]`` vertically by ``magnitude * H`` pixels: ``I(x, y - vH)``.

    Convention:
        Fraction of the height, positive = down; identity 0. Zeros fill the uncovered
        rows by default (``padding_mode`` border / reflection selectable).
    """
    return _warp("translate_y", images, magnitude, mode, padding_mode)


def scale_x(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Magnify the content of ``images`` ``[B, C, H, W]`` horizontally by ``magnitude`` ``[B]``.

    Convention:
        Factor s > 0 about the centre: ``x' = c_x + s (x - c_x)`` (Bunne et al.'s v is 1/s);
        identity 1. Zeros fill by default (border / reflection selectable).
    """
    return _warp("scale_x", images, magnitude, mode, padding_mode)


def scale_y(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Magnify the content of ``images`` ``[B, C, H, W]`` vertically by ``magnitude`` ``[B]``.

    Convention:
        Factor s > 0 about the centre: ``y' = c_y + s (y - c_y)``; identity 1. Zeros fill by
        default (border / reflection selectable).
    """
    return _warp("scale_y", images, magnitude, mode, padding_mode)


def zoom(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Magnify the content of ``images`` ``[B, C, H, W]`` by ``magnitude`` ``[B]`` on both axes.

    Convention:
        Factor s > 0, content magnified by s about the centre (a point at distance d from
        the centre moves to distance s d); identity 1. ``zoom = scale_y(scale_x(., s), s)``.
        Zeros fill by default when s < 1 (border / reflection selectable).
    """
    return _warp("zoom", images, magnitude, mode, padding_mode)


def shear_x(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Shear ``images`` ``[B, C, H, W]`` horizontally: ``x' = x + k (y - c_y)`` with ``k = magnitude``.

    Convention:
        Shear factor k (pixels of shift per pixel of height), positive moves rows below the
        centre to the right; identity 0. Zeros fill by default (border / reflection selectable).
    """
    return _warp("shear_x", images, magnitude, mode, padding_mode)


def shear_y(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Shear ``images`` ``[B, C, H, W]`` vertically: ``y' = y + k (x - c_x)`` with ``k = magnitude``.

    Convention:
        Shear factor k, positive moves columns right of the centre down; identity 0. Zeros
        fill by default (border / reflection selectable).
    """
    return _warp("shear_y", images, magnitude, mode, padding_mode)


def affine(
    images: torch.Tensor, magnitude: Any, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Warp ``images`` ``[B, C, H, W]`` by the forward pixel matrices ``magnitude`` ``[B, 2, 3]``.

    The checked, registered face of :func:`warp_affine`: the matrix must be finite and
    invertible; one ``[2, 3]`` matrix is shared by the batch.

    Convention:
        Forward map in pixel coordinates (origin at the centre of the top-left pixel, x
        right, y down): the input pixel at p lands at ``A p + b``. Identity
        ``[[1, 0, 0], [0, 1, 0]]``. Zeros fill by default (border / reflection selectable).
    """
    return _warp("affine", images, magnitude, mode, padding_mode)


def _flag(
    name: str, images: torch.Tensor, magnitude: Any, mode: str, padding_mode: str
) -> torch.Tensor:
    m = prepare_magnitude(name, images, magnitude)
    check_warp_options(name, mode, padding_mode)
    return (m.detach() != 0).view(-1, 1, 1, 1)


def hflip(
    images: torch.Tensor,
    magnitude: Any = 1.0,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Mirror ``images`` ``[B, C, H, W]`` left-right where ``magnitude`` ``[B]`` is 1 (0 keeps them).

    Convention:
        Discrete: magnitude 0 or 1 (default 1), ``x' = W - 1 - x``; equals
        ``torch.flip(images, dims=(-1,))`` exactly. No interpolation and no padding;
        ``mode`` / ``padding_mode`` are accepted for a uniform interface and only matter
        when :func:`~invariscope.transforms.compose` fuses the flip into a warp.
    """
    flip = _flag("hflip", images, magnitude, mode, padding_mode)
    return torch.where(flip, images.flip(-1), images)


def vflip(
    images: torch.Tensor,
    magnitude: Any = 1.0,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Mirror ``images`` ``[B, C, H, W]`` top-bottom where ``magnitude`` ``[B]`` is 1 (0 keeps them).

    Convention:
        Discrete: magnitude 0 or 1 (default 1), ``y' = H - 1 - y``; equals
        ``torch.flip(images, dims=(-2,))`` exactly. No interpolation and no padding
        (``mode`` / ``padding_mode`` only matter when fused into a warp by ``compose``).
    """
    flip = _flag("vflip", images, magnitude, mode, padding_mode)
    return torch.where(flip, images.flip(-2), images)


def check_rot90_shape(k: torch.Tensor, H: int, W: int, who: str = "rot90") -> None:
    """Refuse odd quarter turns ``k`` ``[B]`` of non-square ``H x W`` images.

    ``rot90`` keeps the input's shape, so an odd turn of a non-square image has no exact
    same-size result (as a warp, part of it would be cut off and the rest zero-filled).
    ``k`` is rounded as :func:`rot90` rounds it; ``who`` starts the error message.
    """
    turns = torch.round(k.detach()).long() % 4
    if H != W and bool((turns % 2 == 1).any()):
        raise InvariscopeError(
            f"{who}: odd k needs square images, got {H}x{W}; use k in {{0, 2}} or "
            "rotation by 90 degrees (a same-size warp)"
        )


def rot90(
    images: torch.Tensor, magnitude: Any = 1, *, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Turn ``images`` ``[B, C, H, W]`` by ``k = magnitude`` ``[B]`` quarter turns (k in 0..3).

    Convention:
        Discrete: k in {0, 1, 2, 3} (default 1), positive = counter-clockwise as displayed,
        exactly ``torch.rot90(images, k, dims=(-2, -1))`` and the same as ``rotation`` by
        ``90 k`` degrees on square images. No interpolation and no padding (``mode`` /
        ``padding_mode`` only matter when fused into a warp by ``compose``). Odd k needs
        square images, since the output keeps the input's shape.

    >>> import torch
    >>> x = torch.arange(4.0).view(1, 1, 2, 2)
    >>> rot90(x, 1)[0, 0].tolist()
    [[1.0, 3.0], [0.0, 2.0]]
    """
    m = prepare_magnitude("rot90", images, magnitude)
    check_warp_options("rot90", mode, padding_mode)
    H, W = images.shape[-2:]
    check_rot90_shape(m, H, W)
    k = torch.round(m.detach()).long() % 4
    present = sorted(set(k.tolist()))
    if len(present) == 1:
        return torch.rot90(images, present[0], dims=(-2, -1))
    out = images
    for q in present:
        if q == 0:
            continue
        idx = (k == q).nonzero().squeeze(1)
        out = out.index_copy(0, idx, torch.rot90(images.index_select(0, idx), q, dims=(-2, -1)))
    return out


# ---------------------------------------------------------------------- modules
class Rotation(TransformModule):
    """Module form of :func:`rotation` (degrees, counter-clockwise as displayed, zeros fill)."""

    transform_name = "rotation"


class TranslateX(TransformModule):
    """Module form of :func:`translate_x` (fraction of width, positive = right, zeros fill)."""

    transform_name = "translate_x"


class TranslateY(TransformModule):
    """Module form of :func:`translate_y` (fraction of height, positive = down, zeros fill)."""

    transform_name = "translate_y"


class ScaleX(TransformModule):
    """Module form of :func:`scale_x` (factor s > 0 about the centre, zeros fill)."""

    transform_name = "scale_x"


class ScaleY(TransformModule):
    """Module form of :func:`scale_y` (factor s > 0 about the centre, zeros fill)."""

    transform_name = "scale_y"


class Zoom(TransformModule):
    """Module form of :func:`zoom` (content magnified by s > 0 about the centre, zeros fill)."""

    transform_name = "zoom"


class ShearX(TransformModule):
    """Module form of :func:`shear_x` (``x' = x + k (y - c_y)``, zeros fill)."""

    transform_name = "shear_x"


class ShearY(TransformModule):
    """Module form of :func:`shear_y` (``y' = y + k (x - c_x)``, zeros fill)."""

    transform_name = "shear_y"


class Affine(TransformModule):
    """Module form of :func:`affine` (forward pixel matrices ``[B, 2, 3]``, zeros fill)."""

    transform_name = "affine"


class HFlip(TransformModule):
    """Module form of :func:`hflip` (magnitude 0/1, default 1: mirror left-right, exact)."""

    transform_name = "hflip"


class VFlip(TransformModule):
    """Module form of :func:`vflip` (magnitude 0/1, default 1: mirror top-bottom, exact)."""

    transform_name = "vflip"


class Rot90(TransformModule):
    """Module form of :func:`rot90` (k quarter turns counter-clockwise, default 1, exact)."""

    transform_name = "rot90"


# ---------------------------------------------------------------------- registry
def _invertible(matrix: torch.Tensor) -> str | None:
    m = matrix.reshape(-1, 2, 3)
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    scale = m[:, :, :2].abs().amax(dim=(1, 2)).clamp_min(1e-300) ** 2
    bad = (det.abs() <= 1e-12 * scale).nonzero()
    if len(bad):
        return f"matrix {m[bad[0, 0]].tolist()} is not invertible (determinant 0); pass an invertible [2, 3] matrix"
    return None


_ANY = Domain()
_POSITIVE = Domain(0.0, math.inf, lo_open=True)


def _spec(name: str, fn, module, matrix_fn, **kw: Any) -> None:
    kind = kw.pop("kind", "geometric")
    register(
        TransformSpec(
            name=name,
            fn=fn,
            module=module,
            kind=kind,
            matrix_fn=matrix_fn,
            options=_WARP_OPTIONS,
            differentiable=kind == "geometric",
            **kw,
        )
    )


_spec(
    "rotation",
    rotation,
    Rotation,
    rotation_matrix,
    identity=0.0,
    domain=_ANY,
    default_range=(-180.0, 180.0, 15.0),
    symbol="angle",
    unit="degrees",
    sign="positive = counter-clockwise as displayed",
    description="rotation about the image centre",
)
_spec(
    "translate_x",
    translate_x,
    TranslateX,
    translate_x_matrix,
    identity=0.0,
    domain=_ANY,
    default_range=(-0.5, 0.5, 0.05),
    unit="fraction of width",
    sign="positive = right",
    description="horizontal shift by v * W pixels",
)
_spec(
    "translate_y",
    translate_y,
    TranslateY,
    translate_y_matrix,
    identity=0.0,
    domain=_ANY,
    default_range=(-0.5, 0.5, 0.05),
    unit="fraction of height",
    sign="positive = down",
    description="vertical shift by v * H pixels",
)
_spec(
    "scale_x",
    scale_x,
    ScaleX,
    scale_x_matrix,
    identity=1.0,
    domain=_POSITIVE,
    default_range=(0.25, 4.0, 0.25),
    symbol="s",
    unit="factor",
    sign="content magnified horizontally by s about the centre",
    description="horizontal scaling about the image centre",
)
_spec(
    "scale_y",
    scale_y,
    ScaleY,
    scale_y_matrix,
    identity=1.0,
    domain=_POSITIVE,
    default_range=(0.25, 4.0, 0.25),
    symbol="s",
    unit="factor",
    sign="content magnified vertically by s about the centre",
    description="vertical scaling about the image centre",
)
_spec(
    "zoom",
    zoom,
    Zoom,
    zoom_matrix,
    identity=1.0,
    domain=_POSITIVE,
    default_range=(0.25, 4.0, 0.25),
    symbol="s",
    unit="factor",
    sign="content magnified by s about the centre",
    description="isotropic scaling about the image centre (scale_x and scale_y together)",
)
_spec(
    "shear_x",
    shear_x,
    ShearX,
    shear_x_matrix,
    identity=0.0,
    domain=_ANY,
    default_range=(-1.0, 1.0, 0.1),
    symbol="k",
    unit="shear factor",
    sign="positive moves rows below the centre right (x' = x + k (y - cy))",
    description="horizontal shear about the image centre",
)
_spec(
    "shear_y",
    shear_y,
    ShearY,
    shear_y_matrix,
    identity=0.0,
    domain=_ANY,
    default_range=(-1.0, 1.0, 0.1),
    symbol="k",
    unit="shear factor",
    sign="positive moves columns right of the centre down (y' = y + k (x - cx))",
    description="vertical shear about the image centre",
)
_spec(
    "affine",
    affine,
    Affine,
    _affine_matrix,
    identity=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    domain=_ANY,
    default_range=None,
    symbol="M",
    unit="pixel matrix [B, 2, 3]",
    sign="forward map: the input pixel p lands at A p + b",
    description="general affine warp by a forward pixel matrix",
    magnitude_shape=(2, 3),
    domain_text="finite invertible [2, 3] matrix",
    extra_check=_invertible,
)
_spec(
    "hflip",
    hflip,
    HFlip,
    hflip_matrix,
    kind="discrete",
    identity=0.0,
    domain=Domain(0.0, 1.0),
    default_range=(0.0, 1.0, 1.0),
    integer=True,
    unit="flag",
    sign="1 = mirror left-right (x' = W - 1 - x)",
    description="horizontal flip (exact)",
)
_spec(
    "vflip",
    vflip,
    VFlip,
    vflip_matrix,
    kind="discrete",
    identity=0.0,
    domain=Domain(0.0, 1.0),
    default_range=(0.0, 1.0, 1.0),
    integer=True,
    unit="flag",
    sign="1 = mirror top-bottom (y' = H - 1 - y)",
    description="vertical flip (exact)",
)
_spec(
    "rot90",
    rot90,
    Rot90,
    rot90_matrix,
    kind="discrete",
    identity=0.0,
    domain=Domain(0.0, 3.0),
    default_range=(0.0, 3.0, 1.0),
    integer=True,
    symbol="k",
    unit="quarter turns",
    sign="positive = counter-clockwise as displayed, as torch.rot90(x, k, dims=(-2, -1))",
    description="rotation by k * 90 degrees (exact)",
)
