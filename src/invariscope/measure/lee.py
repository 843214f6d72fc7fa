"""The Lie derivative and the local equivariance error (LEE) of Gruver et al. (2023).

For a one-parameter family of image transformations ``T_t`` (``t`` in the family's
natural unit, ``T_0`` the identity), the *Lie derivative* of a classifier's logits
``f`` at an image ``x`` is::

    L f(x) = d/dt f(T_t x) |_{t = 0}          (a vector [K], one entry per logit)

(the logits are meant to be invariant, so the group acts trivially on them). An exactly
invariant model has ``L f(x) = 0``. The measures stored per image:

- ``lee``: ``||L f(x)||^2 = sum_k (L f(x))_k^2``, the squared l2 norm over the logits:
  the quantity of Gruver et al.'s equation; its mean over images is the LEE;
- ``lee_abs``: ``sum_k |(L f(x))_k|``, the l1 norm over the logits (Gruver et al.'s
  released script takes absolute values instead of squares);
- ``lee_prob_abs``: ``mean_k |(L p(x))_k|`` with ``p = softmax(f)``: the number Gruver
  et al.'s released script (``lee/e2e_lee.py``) averages, which differentiates the
  softmax probabilities and averages the absolute values over the classes
  (``L p = p * (L f - <p, L f>)``, from the same derivative) -- in THEIR units only with
  ``units="gruver"`` (below): with the default units it is per pixel / per degree, theirs
  per normalised coordinate (``(W - 1) / 2`` pixels) / per radian.

Units (the derivative is per unit of ``t``; the registry magnitude is a function of t):

============================  ==================  =========================================
transform                     unit of t           registry magnitude
============================  ==================  =========================================
translate_x / translate_y     pixel               fraction ``t / W`` / ``t / H``
rotation                      degree              ``t`` degrees (counter-clockwise)
zoom, scale_x, scale_y        log-scale           factor ``exp(t)``
shear_x / shear_y             shear factor        ``k = t``
brightness                    intensity           ``I + t`` (not clamped)
contrast                      log-factor          ``exp(t) I`` (not clamped)
grayscale                     blend weight        ``(1 - t) I + t gray(I)`` (not clamped)
============================  ==================  =========================================

``units="gruver"`` (:func:`unit_scale`) expresses the derivative in the units of Gruver et
al.'s released code (``F.affine_grid(theta, align_corners=True)`` with ``theta`` the
output -> input map in normalised coordinates), multiplying it by ``d t / d s`` (``s``
their parameter): translate_x ``-(W - 1) / 2`` (their unit is the normalised coordinate,
``(W - 1) / 2`` pixels, and ``+s`` moves the content left), translate_y ``-(H - 1) / 2``,
rotation ``-180 / pi`` (radians, clockwise as displayed; square images), shear_x
``-(W - 1) / (H - 1)``, shear_y ``-(H - 1) / (W - 1)``, scale_x / scale_y ``-1`` (their
``stretch``), zoom ``1`` (their ``scale``), contrast ``1`` (their ``saturate``,
``(1 + s) I``); brightness and grayscale have no counterpart and are left as they are.
Their published per-model values then compare directly, up to the boundary: their
``grid_sample`` reflects at the border where the warp core fills with zeros.

Other registered continuous transformations with a scalar, differentiable magnitude are
taken as ``identity + t`` in their registry unit. Refused, with a one-line error:
discrete ones (``hflip``, ``vflip``, ``rot90``: no derivative), ``affine`` (a matrix,
not a one-parameter family), ``gaussian_blur`` (blurs form a semigroup in ``sigma^2``
with no inverse, and ``sigma -> blur`` is not differentiable at the identity
``sigma = 0``: the kernel collapses to a delta, ``d/dsigma`` is 0 one way and undefined
the other) and ``gaussian_noise`` (``I + v z`` moves the image along a random
direction ``z``: its "derivative" is a directional derivative along noise, not an
equivariance of the content).

Differentiation: ``L f(x) = J_f(x) v`` with ``v = d/dt T_t x |_{t=0}`` the image
tangent, a fixed linear function of the image built directly (:func:`image_tangent`):

- geometric families: with ``A'`` the derivative at ``t = 0`` of the registry's forward
  pixel matrix (:meth:`LieFamily.generator`, exact, in float64) and ``u(p) = A' (p, 1)``
  its vector field on pixel coordinates (origin at the top-left pixel centre, x right,
  y down; per unit of t), ``v = -(u_x D_x x + u_y D_y x)``;
- brightness ``v = 1``, contrast (log-factor) ``v = x``, grayscale ``v = gray(x) - x``;
  other photometric families the exact derivative of their formula in ``t`` (autograd
  through the transformation alone).

Then ONE forward-mode product through the model (``torch.autograd.forward_ad``, the
mechanism of ``torch.func.jvp``, under ``no_grad``; convolutions, linear layers and
eval-mode batch norm with their own cheaper forward rules, every other op PyTorch's)
gives every image's derivative. Where an op has no forward-mode rule (the fused
attention kernels), attention runs through its composite kernels, and failing that the
double-backward trick (:func:`torch.autograd.functional.jvp`) pushes the SAME tangent.
Nothing accumulates into the model's parameters, and the model runs in eval mode.

The image difference ``D`` is the FORWARD difference along each axis (``I(x + 1) -
I(x)``, zero outside, as the warp core fills with zeros): the derivative of bilinear
resampling at ``t = 0``, where every sample lies exactly on a pixel centre (a kink) and
the floor cell is taken. For a translation by ``t`` pixels to the right this is the
left derivative in ``t`` (``(f(T_{-h} x) - f(x)) / (-h)``, ``h -> 0+``); Gruver et al.'s
own ``grid_sample`` has the same convention (but reflects at the border). Building
``v`` directly makes the convention exact in every dtype and image size: differentiating
``grid_sample`` at ``t = 0`` (the previous implementation, kept for ``base != 0``) lands
some identity samples a rounding error below the pixel centre (float32 at most sizes,
even float64 at 224 px), where it takes the backward difference instead.

Per layer (``lee_layers``): each probe-able layer ``Gamma_i`` with a 4-D output gets its
own representation's equivariance error::

    L_i(x) = d/dt [ T^{(i)}_{-t} Gamma_i(T_t x) ] |_{t = 0}

with ``T^{(i)}`` the same transformation acting on the feature map at its own resolution:
the same registry magnitude applied to the map's pixel grid (a translation by ``t / W``
of the map's width, i.e. ``t * W_i / W`` map pixels; rotation, zoom and shear about the
map's centre), zeros outside, bilinear; photometric transformations act trivially on
feature maps (an invariance: ``L_i = d/dt Gamma_i(T_t x)``), and so does every
transformation on a ``1 x 1`` map (a global pool). Computed from the same forward-mode
pass: ``L_i = J_{Gamma_i}(x) v - rho'_i Gamma_i(x)``, with ``rho'_i`` the map's own
tangent built like ``v`` (the map's generator, forward differences, zeros outside).
Stored: ``lee`` = the mean over the
map's elements of ``L_i(x)^2`` (so layers of different sizes compare) and ``lee_rel`` =
that over the mean of ``Gamma_i(x)^2`` (NaN for an all-zero map). This is each layer's
own equivariance error (the additive decomposition below is the other attribution).
The map's scale ``W_i / W`` is right for 'same'-padded networks
(stride s gives ``W / s``); for layers that crop (valid convolutions) the ratio
under-states how far the map moves, and the error then includes that mismatch.

Layer-wise decomposition (``lee_contrib``, Gruver et al.'s additive attribution), for a
network that is a chain ``f = f_L o ... o f_1`` (:func:`model_chain`: a ``Classifier``
whose ``net`` is an ``nn.Sequential``, its preprocessing the layer ``preprocess`` and
each top-level child of ``net`` one layer, so a residual stage is one unit; or a bare
``nn.Sequential``), with ``z_0 = x``, ``z_i = f_i(z_{i-1})`` and ``rho_i`` acting on
``z_i`` (``rho_0 = T`` the input transformation; for ``i >= 1`` the map's own
representation above on 4-D maps, trivial on other tensors and on the logits)::

    e_i = d/dt [ rho_i(-t) f_i(rho_{i-1}(t) z_{i-1}) ] |_{t = 0}
        = J_{f_i}(z_{i-1}) rho'_{i-1} z_{i-1} - rho'_i z_i       (layer i's local error)
    c_i = J_{f_{>i}}(z_i) e_i                              (its effect on the logits [K])

and ``sum_i c_i = L f(x)`` exactly (the terms telescope). Both are forward-mode products
(``e_i``: of ``f_i`` alone with the direct tangent ``rho'_{i-1} z_{i-1}``, none where it
is trivial; ``c_i``: of the rest of the chain at ``z_i`` with tangent ``e_i``). Stored per image and layer: ``contribution = ||c_i||^2`` (squared
l2 over the logits) and ``share = <c_i, S> / ||S||^2`` with ``S = sum_i c_i`` (= ``L
f(x)``; signed, the shares sum to 1; NaN when ``S = 0``). Photometric transformations
act trivially on every map, so their whole derivative is the first layer's. Other
models are not decomposed (a warning and a note in the summary; an error only when
``decompose=True`` was asked for).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> d = lie_derivatives(model, torch.rand(2, 1, 8, 8), "brightness")
    >>> d.tangent.shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset

from invariscope.engine import Analysis, AnalysisEntry, Batch, Part, part_id, register_analysis
from invariscope.engine import run as run_analysis
from invariscope.errors import InvariscopeError
from invariscope.measure._present import ci
from invariscope.measure._present import pivot as tidy_pivot
from invariscope.measure.aggregate import mean_interval
from invariscope.models.capture import register_layer_hook, resolve_layer
from invariscope.models.classifier import Classifier, default_layer_names
from invariscope.transforms import get_transform, list_transforms, warp_affine
from invariscope.transforms.registry import TransformSpec

__all__ = [
    "LEEAnalysis",
    "LEEResult",
    "LieContributions",
    "LieDerivatives",
    "LieFamily",
    "lee_summary",
    "lie_derivative",
    "lie_derivatives",
    "lie_contributions",
    "lie_family",
    "image_tangent",
    "model_chain",
    "unit_name",
    "unit_scale",
    "UNIT_SYSTEMS",
]

log = logging.getLogger(__name__)

PART_TABLES = ("lee", "lee_layers", "lee_contrib")
AGGREGATE_TABLES = ("lee_summary", "lee_layers_mean", "lee_contrib_mean", "transforms", "classes")


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class LieFamily:
    """A one-parameter family ``t -> T_t`` built on a registered transformation.

    Attributes:
        name: the registered transformation.
        unit: the unit of ``t`` (the derivative is per this unit).
        magnitude_text: the registry magnitude as a function of ``t``.
        param: ``param(t [B], H, W) -> registry magnitude [B]`` (H, W of the IMAGE).
        spec: the :class:`~invariscope.transforms.registry.TransformSpec`.
    """

    name: str
    unit: str
    magnitude_text: str
    param: Callable[[torch.Tensor, int, int], torch.Tensor]
    spec: TransformSpec

    @property
    def geometric(self) -> bool:
        return self.spec.kind == "geometric"

    def apply(self, images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``T_t images``: geometric ones through the warp core (zeros outside, bilinear);
        photometric ones without clamping (the derivative of the formula at the identity)."""
        H, W = images.shape[-2:]
        m = self.param(t, H, W)
        if self.geometric:
            return warp_affine(images, self.spec.matrix_fn(m, H, W))
        options = {"clamp": False} if "clamp" in self.spec.options else {}
        return self.spec(images, m, **options)

    def act_on_map(self, fmap: torch.Tensor, t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``T^{(i)}_t`` on a feature map ``[B, C, H_i, W_i]`` of an ``H x W`` image: the same
        registry magnitude on the map's own pixel grid (about its centre); the identity for
        photometric families and ``1 x 1`` maps."""
        h, w = fmap.shape[-2:]
        if not self.geometric or (h == 1 and w == 1):
            return fmap
        m = self.param(t, H, W).to(fmap.dtype)
        return warp_affine(fmap, self.spec.matrix_fn(m, h, w))

    def generator(self, H: int, W: int, h: int | None = None, w: int | None = None):
        """``d/dt A_t |_{t=0}`` ``[2, 3]`` (float64): the derivative of the forward pixel
        matrix on an ``h x w`` grid (default the image's ``H x W``) of an ``H x W`` image,
        taken exactly (autograd through the registry's matrix in float64). Geometric only.

        Its linear part and offset give the vector field ``v(p) = A' (p, 1)`` in pixel
        coordinates (origin at the top-left pixel centre, x right, y down) per unit of t.
        """
        if not self.geometric:
            raise InvariscopeError(f"{self.name} is photometric: it has no pixel generator")
        h, w = (H, W) if h is None else (h, w)

        def matrix(t: torch.Tensor) -> torch.Tensor:
            return self.spec.matrix_fn(self.param(t, H, W), h, w)

        with torch.inference_mode(False), torch.enable_grad():
            t0 = torch.zeros(1, dtype=torch.float64)
            _, d = torch.autograd.functional.jvp(matrix, t0, torch.ones_like(t0), strict=False)
        return d.reshape(-1, 2, 3)[0].detach()

    def tangent(self, images: torch.Tensor) -> torch.Tensor:
        """``d/dt T_t images |_{t=0}`` ``[B, C, H, W]``, built directly (no resampling).

        Geometric: ``-(v_x D_x I + v_y D_y I)`` with ``v`` the generator's vector field and
        ``D`` the FORWARD difference ``I(p + 1) - I(p)`` with zeros outside (the warp
        core's convention at t = 0, exact in every dtype). Photometric: brightness 1,
        contrast (log-factor) ``I``, grayscale ``gray(I) - I``; other photometric families
        the exact derivative of their formula in t (autograd through the transformation
        alone, no network).
        """
        if self.geometric:
            H, W = images.shape[-2:]
            return _flow_tangent(images, self.generator(H, W))
        known = _KNOWN.get(self.name)
        if known is not None and known[2] is self.param:
            if self.name == "brightness":
                return torch.ones_like(images)
            if self.name == "contrast":
                return images.clone()
            if self.name == "grayscale":
                return self.apply(images, torch.ones(images.shape[0]).to(images)) - images
        with torch.inference_mode(False), torch.enable_grad():
            x = images.clone() if images.is_inference() else images
            t0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            _, d = torch.autograd.functional.jvp(
                lambda t: self.apply(x, t), t0, torch.ones_like(t0), strict=False
            )
        return d.detach()

    def map_tangent(self, fmap: torch.Tensor, H: int, W: int) -> torch.Tensor | None:
        """``rho'_i fmap = d/dt T^{(i)}_t fmap |_{t=0}`` for a feature map ``[B, C, h, w]`` of
        an ``H x W`` image (see :meth:`act_on_map`), built as :meth:`tangent` with the
        map's own generator; None where the family acts trivially (photometric, ``1 x 1``
        maps, tensors that are not 4-D)."""
        if not self.geometric or fmap.dim() != 4:
            return None
        h, w = fmap.shape[-2:]
        if h == 1 and w == 1:
            return None
        return _flow_tangent(fmap, self.generator(H, W, h, w))


def _same(t, H, W):
    return t


def _exp(t, H, W):
    return torch.exp(t)


_KNOWN: dict[str, tuple[str, str, Callable]] = {
    "translate_x": ("pixel", "fraction of width = t / W", lambda t, H, W: t / W),
    "translate_y": ("pixel", "fraction of height = t / H", lambda t, H, W: t / H),
    "rotation": ("degree", "angle = t degrees", _same),
    "zoom": ("log-scale", "factor = exp(t)", _exp),
    "scale_x": ("log-scale", "factor = exp(t)", _exp),
    "scale_y": ("log-scale", "factor = exp(t)", _exp),
    "shear_x": ("shear factor", "k = t", _same),
    "shear_y": ("shear factor", "k = t", _same),
    "brightness": ("intensity", "v = t (I + t, not clamped)", _same),
    "contrast": ("log-factor", "factor = exp(t) (exp(t) I, not clamped)", _exp),
    "grayscale": ("blend weight", "v = t ((1 - t) I + t gray(I), not clamped)", _same),
}

_REFUSED = {
    "gaussian_blur": (
        "gaussian_blur has no Lie derivative: blurs form a semigroup in sigma^2 with no "
        "inverse, and sigma -> blur is not differentiable at the identity sigma = 0"
    ),
    "gaussian_noise": (
        "gaussian_noise has no Lie derivative: I + v z moves the image along a random "
        "direction z, not along a transformation of its content; use a sweep instead"
    ),
    "affine": (
        "affine is not a one-parameter family (its magnitude is a [2, 3] matrix); name one "
        "such as rotation, translate_x or zoom"
    ),
}


def lie_family(name: str) -> LieFamily:
    """The one-parameter family of a registered transformation, in its natural unit.

    Raises:
        InvariscopeError: unknown, discrete, matrix-valued or non-differentiable
            transformations, ``gaussian_blur`` and ``gaussian_noise`` (one line, why).
    """
    if name not in list_transforms():
        get_transform(str(name))  # raises the registry's "unknown transform" error
    spec = get_transform(name)
    if name in _REFUSED:
        raise InvariscopeError(_REFUSED[name])
    if spec.kind == "discrete" or spec.integer:
        raise InvariscopeError(
            f"{name} is a discrete transformation with no Lie derivative (no continuous "
            "one-parameter family); name a continuous one such as rotation or translate_x"
        )
    if spec.magnitude_shape or not spec.differentiable:
        raise InvariscopeError(
            f"{name} has no Lie derivative here (its magnitude is not a differentiable "
            "scalar); name one such as rotation, translate_x or zoom"
        )
    if name in _KNOWN:
        unit, text, param = _KNOWN[name]
    else:
        ident = float(spec.identity)
        unit, text = spec.unit, f"{spec.symbol} = {ident:g} + t"

        def param(t, H, W, _i=ident):
            return t + _i

    return LieFamily(name, unit, text, param, spec)


def _flow_tangent(images: torch.Tensor, generator: torch.Tensor) -> torch.Tensor:
    """``-(u_x D_x I + u_y D_y I)``: the t = 0 tangent of warping ``images`` ``[B, C, h, w]``
    along the vector field ``u(p) = generator @ (p, 1)`` (pixel coordinates), with ``D``
    the forward difference and zeros outside. The field is built in float64 and cast;
    the difference is taken first (exact for close neighbours), then scaled."""
    h, w = images.shape[-2:]
    a = generator.tolist()
    xs = torch.arange(w, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64)
    out = None
    for row, axis in ((a[0], -1), (a[1], -2)):
        if row == [0.0, 0.0, 0.0]:
            continue
        field = row[0] * xs[None, :] + row[1] * ys[:, None] + row[2]
        field = field.to(dtype=images.dtype, device=images.device)
        minus = torch.empty_like(images)  # -D I = I(p) - I(p + 1); I(p) on the last one
        if axis == -1:
            torch.sub(images[..., :-1], images[..., 1:], out=minus[..., :-1])
            minus[..., -1] = images[..., -1]
        else:
            torch.sub(images[..., :-1, :], images[..., 1:, :], out=minus[..., :-1, :])
            minus[..., -1, :] = images[..., -1, :]
        out = minus.mul_(field) if out is None else out.addcmul_(minus, field)
    return torch.zeros_like(images) if out is None else out


# ------------------------------------------------------------------------------ units

#: ``units=`` values: ``"invariscope"`` (the table in the module docstring) or ``"gruver"``.
UNIT_SYSTEMS = ("invariscope", "gruver")

# Gruver et al.'s released code (ngruver/lie-deriv, ``lee/lie_derivs.py`` and its
# ``transforms``) warps with ``F.affine_grid(theta, align_corners=True)``, ``theta`` the
# OUTPUT -> INPUT map in normalised coordinates (one unit = (W - 1) / 2 pixels along x,
# (H - 1) / 2 along y). Per family: the unit's name and d t_invariscope / d t_gruver.
_GRUVER: dict[str, tuple[str, Callable[[int, int], float]]] = {
    # theta[0, 2] = t samples x + t: the content moves LEFT by t (W - 1) / 2 pixels
    "translate_x": ("(W-1)/2 px, leftward", lambda H, W: -(W - 1) / 2.0),
    "translate_y": ("(H-1)/2 px, upward", lambda H, W: -(H - 1) / 2.0),
    # theta = [[cos, sin], [-sin, cos]] samples R p: the content turns clockwise (y down)
    "rotation": ("radian, clockwise", lambda H, W: -180.0 / math.pi),
    # theta[0, 1] = t samples x + t y (normalised): x' = x - t (W - 1) / (H - 1) y in pixels
    "shear_x": ("shear, flipped", lambda H, W: -(W - 1) / (H - 1)),
    "shear_y": ("shear, flipped", lambda H, W: -(H - 1) / (W - 1)),
    # stretch: theta[0, 0] = 1 + s samples (1 + s) x: magnification 1 / (1 + s)
    "scale_x": ("stretch", lambda H, W: -1.0),
    "scale_y": ("stretch", lambda H, W: -1.0),
    # scale: theta = (1 - s) I: magnification 1 / (1 - s)
    "zoom": ("scale", lambda H, W: 1.0),
    # saturate: (1 + s) I
    "contrast": ("saturation", lambda H, W: 1.0),
}


def _check_units(units: str) -> str:
    if units not in UNIT_SYSTEMS:
        raise InvariscopeError(
            f"units '{units}' is not one of {', '.join(UNIT_SYSTEMS)}; pass units='gruver' to "
            "compare with Gruver et al.'s published values"
        )
    return units


def unit_name(transform: str | LieFamily, units: str = "invariscope") -> str:
    """The unit of ``t`` of ``transform`` in the unit system ``units`` (see :func:`unit_scale`)."""
    family = transform if isinstance(transform, LieFamily) else lie_family(transform)
    if _check_units(units) == "invariscope":
        return family.unit
    known = _GRUVER.get(family.name)
    return f"Gruver {known[0]}" if known else f"{family.unit} (not Gruver's)"


def unit_scale(transform: str | LieFamily, H: int, W: int, units: str = "invariscope") -> float:
    """``d t / d s``: invariscope's ``t`` (module docstring) per unit ``s`` of ``units``.

    A derivative in ``units`` is the derivative per invariscope unit times this factor
    (e.g. per pixel x ``dpixel / ds``). ``"gruver"``, for an ``H x W`` image (Gruver et
    al.'s ``affine_grid`` with ``align_corners=True``, a normalised unit being
    ``(W - 1) / 2`` pixels): translate_x ``-(W - 1) / 2``, translate_y ``-(H - 1) / 2``,
    rotation ``-180 / pi`` (square images only: their rotation turns normalised
    coordinates), shear_x ``-(W - 1) / (H - 1)``, shear_y ``-(H - 1) / (W - 1)``,
    scale_x / scale_y ``-1`` (their stretch), zoom ``1`` (their scale), contrast ``1``
    (their saturation); ``1`` for families they do not have (brightness, grayscale).

    Raises:
        InvariscopeError: unknown ``units``; ``"gruver"`` rotation on a non-square image.
    """
    family = transform if isinstance(transform, LieFamily) else lie_family(transform)
    if _check_units(units) == "invariscope" or family.name not in _GRUVER:
        return 1.0
    if H < 2 or W < 2:
        raise InvariscopeError(f"units='gruver' needs images of at least 2 x 2, got {H} x {W}")
    if family.name == "rotation" and H != W:
        raise InvariscopeError(
            f"units='gruver' for rotation needs square images (Gruver et al. rotate "
            f"normalised coordinates, not a rotation of a {H} x {W} image); use units='invariscope'"
        )
    return float(_GRUVER[family.name][1](H, W))


def image_tangent(
    transform: str | LieFamily, images: torch.Tensor, *, units: str = "invariscope"
) -> torch.Tensor:
    """``d/dt T_t images |_{t=0}`` ``[B, C, H, W]``: the direction every Lie derivative
    pushes through the network, built directly (see :meth:`LieFamily.tangent`), per unit
    of ``t`` in ``units``.

    >>> import torch
    >>> image_tangent("translate_x", torch.tensor([[[[1.0, 2.0, 4.0]]]])).tolist()
    [[[[-1.0, -2.0, 4.0]]]]
    """
    family = transform if isinstance(transform, LieFamily) else lie_family(transform)
    H, W = images.shape[-2:]
    scale = unit_scale(family, H, W, units)
    tangent = family.tangent(images.detach())
    return tangent if scale == 1.0 else tangent * scale


# ------------------------------------------------------------------------ derivatives


@dataclass
class LieDerivatives:
    """What :func:`lie_derivatives` returns (detached, in the model's output dtype, on the
    images' device).

    Attributes:
        logits: ``f(x)`` ``[B, K]``.
        tangent: ``L f(x) = d/dt f(T_t x)|_{t=0}`` ``[B, K]`` (per unit of t).
        layers: ``{layer: (L_i(x) [B, C, H_i, W_i], Gamma_i(x) [B, C, H_i, W_i])}``.
    """

    logits: torch.Tensor
    tangent: torch.Tensor
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


# How each module's forward product was last taken: "forward" (forward-mode AD),
# "forward-math" (forward-mode AD with the composite attention kernels) or "double"
# (the double-backward trick), so that a model without forward rules fails only once.
_AD_MODE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_AD_MODES = ("forward", "forward-math", "double")


@contextlib.contextmanager
def _composite_attention() -> Iterator[None]:
    """Attention through its composite (math) kernels: ``scaled_dot_product_attention``'s
    fused CPU/GPU kernels and ``nn.MultiheadAttention``'s / ``nn.TransformerEncoderLayer``'s
    fast paths have no forward-mode rule (nor, on CPU, a double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)


def _no_forward_rule(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, NotImplementedError) or (
        isinstance(error, RuntimeError) and ("forward AD" in text or "forward-mode" in text)
    )


def _argument(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _replaced(args: tuple, kwargs: dict, values: dict[int, tuple[str, Any]]):
    """``args, kwargs`` with the arguments at ``{index: (name, value)}`` replaced."""
    args, kwargs = list(args), dict(kwargs)
    for index, (name, value) in values.items():
        if len(args) > index:
            args[index] = value
        else:
            kwargs[name] = value
    return args, kwargs


def _has_tangent(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and fwAD.unpack_dual(value).tangent is not None


_LINEAR_OPS = frozenset(
    {
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        F.linear,
    }
)


class _LinearRules(TorchFunctionMode):
    """Cheaper forward-mode rules for the common layers, active during :func:`_forward_ad`.

    A convolution or linear layer whose weight (and bias) carry no tangent is applied to
    the primal (exactly the model's own call) and, without the bias, to the tangent;
    eval-mode batch norm maps the tangent to ``t * weight / sqrt(running_var + eps)``;
    in-place ``relu`` / ``hardtanh`` (ReLU6) and ``+=`` / ``add_`` update primal and
    tangent in place. PyTorch's generic rules compute the same numbers with two extra
    convolutions per convolution (a product with a zero weight tangent), a dozen
    elementwise passes per batch norm and a copy per in-place op (together 4x the
    forward pass on a ResNet-50 instead of 2x); every other op keeps PyTorch's own rule.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            handled = func in _HANDLED
        except TypeError:  # an unhashable callable: not one of ours
            handled = False
        if not handled:
            return func(*args, **kwargs)
        if func in _LINEAR_OPS:
            inputs = _argument(args, kwargs, 0, "input")
            weight, bias = _argument(args, kwargs, 1, "weight"), _argument(args, kwargs, 2, "bias")
            if _has_tangent(inputs) and not _has_tangent(weight) and not _has_tangent(bias):
                primal, tangent = fwAD.unpack_dual(inputs)
                a, k = _replaced(args, kwargs, {0: ("input", primal)})
                out = func(*a, **k)
                a, k = _replaced(args, kwargs, {0: ("input", tangent), 2: ("bias", None)})
                return fwAD.make_dual(out, func(*a, **k))
        elif func is F.batch_norm:
            inputs = _argument(args, kwargs, 0, "input")
            stats = [_argument(args, kwargs, i, n) for i, n in enumerate(_BN_ARGS, start=1)]
            training = _argument(args, kwargs, 5, "training", False)
            if (
                _has_tangent(inputs)
                and not training
                and stats[0] is not None
                and stats[1] is not None
                and not any(_has_tangent(s) for s in stats)
            ):
                primal, tangent = fwAD.unpack_dual(inputs)
                a, k = _replaced(args, kwargs, {0: ("input", primal)})
                out = func(*a, **k)
                eps = _argument(args, kwargs, 7, "eps", 1e-5)
                scale = torch.rsqrt(stats[1] + eps)
                if stats[2] is not None:
                    scale = scale * stats[2]
                shape = (1, -1) + (1,) * (tangent.dim() - 2)
                return fwAD.make_dual(out, tangent * scale.to(tangent.dtype).view(shape))
        elif func in _IN_PLACE_ADDS:
            out = self._add_in_place(args, kwargs)
            if out is not None:
                return out
        elif func is F.relu or func is F.hardtanh:
            inputs = _argument(args, kwargs, 0, "input")
            bounds = (0.0, math.inf)
            if func is F.hardtanh:
                bounds = (
                    _argument(args, kwargs, 1, "min_val", -1.0),
                    _argument(args, kwargs, 2, "max_val", 1.0),
                )
            inplace = _argument(args, kwargs, 3 if func is F.hardtanh else 1, "inplace", False)
            if inplace and _has_tangent(inputs):
                # in place, like PyTorch's own rule, without its extra copy of the tangent
                primal, tangent = fwAD.unpack_dual(inputs)
                if func is F.relu:
                    primal.clamp_min_(0)
                    torch.ops.aten.threshold_backward.grad_input(
                        tangent, primal, 0, grad_input=tangent
                    )
                else:
                    primal.clamp_(bounds[0], bounds[1])
                    torch.ops.aten.hardtanh_backward.grad_input(
                        tangent, primal, bounds[0], bounds[1], grad_input=tangent
                    )
                return inputs
        return func(*args, **kwargs)

    @staticmethod
    def _add_in_place(args: tuple, kwargs: dict) -> torch.Tensor | None:
        """``a += b`` / ``a.add_(b, alpha=...)`` with a tangent on ``a``: both parts in place."""
        if len(args) < 2 or set(kwargs) - {"alpha"} or not _has_tangent(args[0]):
            return None
        target, other = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if not isinstance(other, torch.Tensor) or target.shape != torch.broadcast_shapes(
            target.shape, other.shape
        ):
            return None
        primal, tangent = fwAD.unpack_dual(target)
        other_primal, other_tangent = fwAD.unpack_dual(other)
        primal.add_(other_primal, alpha=alpha)
        if other_tangent is not None:
            tangent.add_(other_tangent, alpha=alpha)
        return target


_BN_ARGS = ("running_mean", "running_var", "weight", "bias")
_IN_PLACE_ADDS = frozenset({torch.Tensor.add_, torch.Tensor.__iadd__})
_HANDLED = _LINEAR_OPS | _IN_PLACE_ADDS | {F.batch_norm, F.relu, F.hardtanh}


def _forward_ad(fn, x: torch.Tensor, v: torch.Tensor):
    # inference mode would silently drop every tangent: leave it for the pass
    with torch.inference_mode(False), torch.no_grad(), fwAD.dual_level(), _LinearRules():
        v = v.clone() if v.is_inference() else v
        outs = fn(fwAD.make_dual(x.clone(), v))  # a copy: in-place ops must not reach x
        primals, tangents = [], []
        for out in outs:
            p, d = fwAD.unpack_dual(out)
            primals.append(p)
            tangents.append(torch.zeros_like(p) if d is None else d)
    return primals, tangents


def _double_backward(fn, x: torch.Tensor, v: torch.Tensor):
    with torch.inference_mode(False), torch.enable_grad():
        x, v = (z.clone() if z.is_inference() else z for z in (x, v))
        outs, tans = torch.autograd.functional.jvp(
            lambda z: tuple(fn(z.clone())), x, v, strict=False
        )
    return [o.detach() for o in outs], [d.detach() for d in tans]


def _forward_product(key: nn.Module, fn, x: torch.Tensor, v: torch.Tensor):
    """``(fn(x), J_fn(x) v)`` for ``fn`` returning a sequence of tensors: ONE forward-mode
    pass (``torch.autograd.forward_ad``, the mechanism of ``torch.func.jvp``, under
    ``no_grad``: nothing is recorded for backward); where an op has no forward rule, the
    composite attention kernels, then the double-backward trick
    (:func:`torch.autograd.functional.jvp`) with the same tangent. ``key`` remembers the
    mode that worked (per module)."""
    x, v = x.detach(), v.detach()
    if v.shape != x.shape:
        raise InvariscopeError(f"tangent shape {list(v.shape)} != input shape {list(x.shape)}")
    start = _AD_MODE.get(key, "forward")
    for mode in _AD_MODES[_AD_MODES.index(start) :]:
        try:
            if mode == "forward":
                result = _forward_ad(fn, x, v)
            elif mode == "forward-math":
                with _composite_attention():
                    result = _forward_ad(fn, x, v)
            else:
                with _composite_attention():
                    result = _double_backward(fn, x, v)
        except (NotImplementedError, RuntimeError) as error:
            if mode == "double" or not _no_forward_rule(error):
                raise
            log.info("LEE: %s; retrying without it (%s)", str(error).splitlines()[0], mode)
            continue
        if mode != start:
            _AD_MODE[key] = mode
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def lie_derivatives(
    model: nn.Module,
    images: torch.Tensor,
    transform: str | LieFamily,
    *,
    layers: Sequence[str] = (),
    base: float = 0.0,
    units: str = "invariscope",
) -> LieDerivatives:
    """Lie derivatives of ``model``'s logits (and of its layers' maps) on a batch.

    At ``t = 0`` (``base=0``, the default): the image tangent ``v = d/dt T_t x`` is built
    directly (:func:`image_tangent`: the generator's vector field times the image's
    forward differences, or the photometric derivative), and ONE forward-mode product
    ``J_f(x) v`` through the model gives every image's ``L f(x)`` (with the fallbacks
    of the module docstring); each probed layer's own error is
    ``L_i = J_{Gamma_i}(x) v - rho'_i Gamma_i(x)`` from the same pass, ``rho'_i`` built
    the same direct way on the map's grid. ``base != 0`` moves the point of
    differentiation (e.g. to non-integer sample positions, for checks against finite
    differences): then ``g(t) = T^{(i)}_{-(base + t)} Gamma_i(T_{base + t} x)`` is
    differentiated through the warp core (double backward). The model is put in eval
    mode for the call (and restored); no gradient reaches its parameters.

    Args:
        model: images ``[B, C, H, W]`` in ``[0, 1]`` -> logits ``[B, K]``.
        images: the batch, ``[B, C, H, W]``.
        transform: a registered transformation name or a :class:`LieFamily`.
        layers: probe-able layer names whose 4-D outputs get their own derivative.
        base: the point of differentiation (0: the Lie derivative).
        units: ``"invariscope"`` (default) or ``"gruver"`` (:func:`unit_scale`).
    """
    family = transform if isinstance(transform, LieFamily) else lie_family(transform)
    if images.dim() != 4:
        raise InvariscopeError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    H, W = images.shape[-2:]
    scale = unit_scale(family, H, W, units)
    if base != 0.0:
        d = _warp_lie_derivatives(model, images, family, layers=layers, base=base)
        if scale != 1.0:
            d.tangent = d.tangent * scale
            d.layers = {n: (t * scale, a) for n, (t, a) in d.layers.items()}
        return d
    names = list(dict.fromkeys(str(n) for n in layers))
    captured: dict[str, Any] = {}

    def hook(name):
        def record(module, inputs, output) -> None:
            # a copy: an in-place op after the layer (ReLU(inplace=True)) must not change it
            captured[name] = output.clone() if isinstance(output, torch.Tensor) else output

        return record

    x = images.detach()
    v = image_tangent(family, x, units=units)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        v = v.contiguous(memory_format=torch.channels_last)

    def g(inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured.clear()
        logits = model(inputs)
        return (logits, *_checked_maps(logits, captured, names))

    handles = [register_layer_hook(model, n, hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        outputs, tangents = _forward_product(model, g, x, v)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        captured.clear()
    out = [o.detach() for o in outputs]
    tan = [d.detach() for d in tangents]
    maps = {}
    for i, n in enumerate(names):
        act, jv = out[i + 1], tan[i + 1]
        own = family.map_tangent(act, H, W)
        maps[n] = (jv if own is None else jv - own * scale, act)
    return LieDerivatives(logits=out[0], tangent=tan[0], layers=maps)


def _checked_maps(logits: Any, captured: dict[str, Any], names: Sequence[str]) -> list:
    """The captured 4-D maps of ``names`` in order, after checking that the model gave
    logits ``[B, K]`` and every layer a ``[B, C, H, W]`` map (one-line errors otherwise)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise InvariscopeError(
            f"the model must return logits [B, K], got {getattr(logits, 'shape', type(logits))}"
        )
    maps = []
    for n in names:
        a = captured.get(n)
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            shape = list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise InvariscopeError(
                f"layer '{n}' has no 4-D feature map output (got {shape}); pick layers "
                "whose output is [B, C, H, W], or --layers none"
            )
        maps.append(a)
    return maps


def _warp_lie_derivatives(
    model: nn.Module,
    images: torch.Tensor,
    family: LieFamily,
    *,
    layers: Sequence[str] = (),
    base: float = 0.0,
) -> LieDerivatives:
    """The Lie derivatives through the warp core: ``g(t) = T^{(i)}_{-s} Gamma_i(T_s x)``,
    ``s = base + t``, differentiated at ``t = 0`` with the double-backward trick through
    ``grid_sample`` (the reference of the direct tangent, and the path for ``base != 0``).
    At ``t = 0`` it follows the forward-difference convention only where the warp core's
    identity grid lands exactly on the pixel centres (float64 up to ~64 px; not float32)."""
    H, W = images.shape[-2:]
    names = list(dict.fromkeys(str(n) for n in layers))
    captured: dict[str, Any] = {}

    def hook(name):
        def record(module, inputs, output) -> None:
            captured[name] = output

        return record

    handles = [register_layer_hook(model, n, hook(n)) for n in names]
    was_training = model.training
    model.eval()
    x = images.detach()
    t0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def g(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured.clear()
        s = t + base
        logits = model(family.apply(x, s))
        maps = _checked_maps(logits, captured, names)
        return (logits, *(family.act_on_map(a, -s, H, W) for a in maps))

    try:
        with torch.enable_grad():
            outputs, tangents = torch.autograd.functional.jvp(
                g, t0, torch.ones_like(t0), create_graph=False, strict=False
            )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        captured.clear()
    out = [o.detach() for o in outputs]
    tan = [d.detach() for d in tangents]
    return LieDerivatives(
        logits=out[0],
        tangent=tan[0],
        layers={n: (tan[i + 1], out[i + 1]) for i, n in enumerate(names)},
    )


def _per_image(d: LieDerivatives) -> dict[str, np.ndarray]:
    tangent = d.tangent.double()
    p = torch.softmax(d.logits.double(), dim=1)
    dp = p * (tangent - (p * tangent).sum(dim=1, keepdim=True))
    return {
        "pred": d.logits.argmax(dim=1).cpu().numpy().astype(np.int64),
        "lee": tangent.pow(2).sum(dim=1).cpu().numpy(),
        "lee_abs": tangent.abs().sum(dim=1).cpu().numpy(),
        "lee_prob_abs": dp.abs().mean(dim=1).cpu().numpy(),
    }


def _layer_values(tangent: torch.Tensor, act: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    lee = tangent.double().flatten(1).pow(2).mean(dim=1)
    power = act.double().flatten(1).pow(2).mean(dim=1)
    rel = torch.where(power > 0, lee / power.clamp_min(1e-300), torch.full_like(lee, math.nan))
    return lee.cpu().numpy(), rel.cpu().numpy()


# ---------------------------------------------------------------- decomposition


def model_chain(model: nn.Module) -> list[tuple[str, Callable[[torch.Tensor], Any]]] | None:
    """The layers ``[(name, f_i)]`` of a network that is a chain of modules, else None.

    A :class:`~invariscope.models.classifier.Classifier` whose ``net`` is a plain
    ``nn.Sequential`` (its forward not overridden): ``preprocess`` (the normalisation),
    then every top-level child of ``net`` (``net.<child>``; a Sequential stage of residual
    blocks is one unit). A bare ``nn.Sequential``: its top-level children.
    """

    def plain(seq: nn.Module) -> bool:
        return isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward

    if isinstance(model, Classifier) and type(model).forward is Classifier.forward:
        if not plain(model.net):
            return None
        return [("preprocess", model.preprocess)] + [
            (f"net.{name}", child) for name, child in model.net.named_children()
        ]
    if plain(model):
        return [(name, child) for name, child in model.named_children()]
    return None


def _not_a_chain(model: nn.Module) -> str:
    return (
        f"the layer-wise decomposition needs a chain of modules (a Classifier whose net is "
        f"an nn.Sequential, or an nn.Sequential); {type(model).__name__} is not one"
    )


@dataclass
class LieContributions:
    """What :func:`lie_contributions` returns (detached, on the images' device).

    Attributes:
        layers: the chain's layer names, input to output.
        contributions: ``c_i`` ``[L, B, K]``: layer i's local equivariance error carried
            to the logits by the rest of the network.
        total: ``sum_i c_i`` ``[B, K]`` (= the Lie derivative ``L f(x)``).
    """

    layers: list[str]
    contributions: torch.Tensor
    total: torch.Tensor


def lie_contributions(
    model: nn.Module,
    images: torch.Tensor,
    transform: str | LieFamily,
    *,
    units: str = "invariscope",
) -> LieContributions:
    """Gruver et al.'s additive decomposition of the Lie derivative over a chain's layers.

    One forward pass collects ``z_i``; per layer, ``e_i = J_{f_i}(z_{i-1}) rho'_{i-1}
    z_{i-1} - rho'_i z_i`` (the tangents built directly, as in :func:`lie_derivatives`:
    ``rho'_0`` the image tangent, ``rho'_i`` the map's own; a forward-mode product of
    ``f_i`` alone, none where ``rho'_{i-1}`` is trivial) and ``c_i`` the forward-mode
    product of the rest of the chain at ``z_i`` with tangent ``e_i`` (see the module
    docstring). Eval mode for the call (restored); no gradient reaches the parameters.

    Raises:
        InvariscopeError: ``model`` is not a chain (:func:`model_chain`), or a layer's
            output is not a tensor, or the logits are not ``[B, K]``.
    """
    family = transform if isinstance(transform, LieFamily) else lie_family(transform)
    chain = model_chain(model)
    if chain is None:
        raise InvariscopeError(_not_a_chain(model))
    if images.dim() != 4:
        raise InvariscopeError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    H, W = images.shape[-2:]
    scale = unit_scale(family, H, W, units)
    x = images.detach()

    def rho_tangent(i: int, z: torch.Tensor) -> torch.Tensor | None:
        """``rho'_i z_i`` (None: trivial)."""
        if i == 0:
            return image_tangent(family, z, units=units)
        own = family.map_tangent(z, H, W)  # non-spatial tensors (and the logits): trivial
        return None if own is None else own * scale

    was_training = model.training
    model.eval()
    try:
        zs = [x]
        with torch.no_grad():
            for name, f in chain:
                z = f(zs[-1])
                if not isinstance(z, torch.Tensor):
                    raise InvariscopeError(
                        f"layer '{name}' returns {type(z).__name__}, not a tensor: the "
                        "layer-wise decomposition needs a chain of tensors"
                    )
                zs.append(z)
        if zs[-1].dim() != 2:
            raise InvariscopeError(f"the model must return logits [B, K], got {list(zs[-1].shape)}")
        contributions = []
        incoming = rho_tangent(0, x)
        for i, (_, f) in enumerate(chain):
            outgoing = rho_tangent(i + 1, zs[i + 1])
            e = None
            if incoming is not None:
                _, (e,) = _forward_product(model, lambda z, f=f: (f(z),), zs[i], incoming)
            if outgoing is not None:
                e = -outgoing if e is None else e - outgoing
            rest = [module for _, module in chain[i + 1 :]]
            if e is None:
                c = torch.zeros_like(zs[-1])
            elif rest:

                def tail(z: torch.Tensor, rest=rest) -> tuple[torch.Tensor]:
                    for module in rest:
                        z = module(z)
                    return (z,)

                _, (c,) = _forward_product(model, tail, zs[i + 1], e)
            else:
                c = e
            contributions.append(c.detach())
            incoming = outgoing
    finally:
        model.train(was_training)
    stacked = torch.stack(contributions)
    return LieContributions([name for name, _ in chain], stacked, stacked.sum(dim=0))


def _contribution_values(d: LieContributions) -> tuple[np.ndarray, np.ndarray]:
    """``||c_i||^2`` and ``<c_i, S> / ||S||^2`` ``[L, B]`` (float64; NaN share when S = 0)."""
    c = d.contributions.double()
    total = c.sum(dim=0)
    norm = total.pow(2).sum(dim=1)
    dot = (c * total).sum(dim=2)
    share = torch.where(norm > 0, dot / norm.clamp_min(1e-300), torch.full_like(dot, math.nan))
    return c.pow(2).sum(dim=2).cpu().numpy(), share.cpu().numpy()


# ---------------------------------------------------------------------- aggregation


def lee_summary(per_image: pd.DataFrame, units: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per transform: ``transform, unit, n, lee, lee_low, lee_high, lee_abs,
    lee_abs_low, lee_abs_high, median_lee, lee_prob_abs`` (means over images with
    mean +- 1.96 standard errors; ``lee`` squared l2 over logits, ``lee_abs`` l1 over
    logits, ``lee_prob_abs`` Gruver et al.'s script's mean |L softmax|)."""
    rows = []
    units = units or {}
    for name, g in per_image.groupby("transform", sort=False):
        row: dict[str, Any] = {"transform": name, "unit": units.get(name, ""), "n": len(g)}
        row["lee"], row["lee_low"], row["lee_high"] = mean_interval(g["lee"])
        row["lee_abs"], row["lee_abs_low"], row["lee_abs_high"] = mean_interval(g["lee_abs"])
        row["median_lee"] = float(np.median(g["lee"].to_numpy(np.float64)))
        row["lee_prob_abs"] = float(g["lee_prob_abs"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def _per_layer_means(
    per_layer: pd.DataFrame, order: Sequence[str], value: str, extra: str, extra_name: str
) -> pd.DataFrame:
    """Per (transform, layer): ``mean, low, high`` of ``value`` (mean +- 1.96 SE over
    images), ``extra_name`` (the mean of the finite ``extra``) and ``n`` images, in the
    order of ``order`` (transforms) and ``order`` (layers)."""
    rows = []
    rank = {name: i for i, name in enumerate(order)}
    for (name, o, layer), g in per_layer.groupby(["transform", "order", "layer"], sort=False):
        m, lo, hi = mean_interval(g[value])
        other = g[extra].to_numpy(np.float64)
        other = other[np.isfinite(other)]
        rows.append(
            {
                "transform": name,
                "layer": layer,
                "order": int(o),
                "mean": m,
                "low": lo,
                "high": hi,
                extra_name: float(other.mean()) if len(other) else math.nan,
                "n": len(g),
            }
        )
    out = pd.DataFrame(rows)
    if len(out):
        out["_rank"] = out["transform"].map(rank).fillna(len(rank))
        out = out.sort_values(["_rank", "order"], kind="stable").drop(columns="_rank")
        out = out.reset_index(drop=True)
    return out


def lee_layers_mean(per_layer: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Per (transform, layer): ``mean, low, high`` (of ``lee``, mean +- 1.96 SE over
    images), ``rel_mean`` (mean ``lee_rel``) and ``n`` images."""
    return _per_layer_means(per_layer, order, "lee", "lee_rel", "rel_mean")


def lee_contrib_mean(per_layer: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Per (transform, layer): ``mean, low, high`` of ``contribution`` (mean +- 1.96 SE
    over images), ``share_mean`` (mean finite ``share``) and ``n`` images."""
    return _per_layer_means(per_layer, order, "contribution", "share", "share_mean")


# ------------------------------------------------------------------------- the analysis


def _model_layers(model: nn.Module) -> list[str]:
    names = getattr(model, "layer_names", None)
    return list(names) if names is not None else default_layer_names(model)


def feature_map_layers(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The probe-able layers whose output on ``sample`` is a 4-D ``[B, C, H, W]`` map."""
    names = _model_layers(model)
    four_d: set[str] = set()

    def hook(name):
        def record(module, inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                four_d.add(name)

        return record

    handles = [register_layer_hook(model, n, hook(n)) for n in names]
    try:
        with torch.inference_mode():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return [n for n in names if n in four_d]


class LEEAnalysis(Analysis):
    """Gruver et al.'s local equivariance error of a classifier, on the engine.

    Parts: one per (transform, batch) (``lee-<k>-<batch>``), each one forward-mode
    product (the direct t = 0 tangent pushed through the model) per chunk of at most
    ``ctx.forward_batch`` images, giving the logits' Lie derivative and every chosen
    layer's own equivariance error in the same pass.

    Tables: ``lee`` (``transform, index, label, pred, lee, lee_abs, lee_prob_abs``: per
    image; ``lee`` = squared l2 norm of ``L f(x)`` over the logits, ``lee_abs`` = its l1
    norm, ``lee_prob_abs`` = mean over classes of ``|L softmax(f)(x)|``, Gruver et al.'s
    script's number) and ``lee_layers`` (``transform, index, layer, order, lee,
    lee_rel``: each layer's own representation equivariance error, the mean over the
    map's elements of ``(d/dt T^{(i)}_{-t} Gamma_i(T_t x))^2`` and that over the mean
    squared activation) and ``lee_contrib`` (``transform, index, layer, order,
    contribution, share``: Gruver et al.'s additive decomposition of ``L f(x)`` over the
    layers of a chain, ``contribution = ||c_i||^2`` over the logits and the signed
    ``share = <c_i, L f(x)> / ||L f(x)||^2``; see the module docstring). Units are per
    unit of t (see the module docstring and the ``transforms`` table; ``units``).

    Args:
        transforms: registered continuous transformation names (default translate_x,
            rotation).
        layers: layers for the per-layer error (default: the model's probe-able layers
            with 4-D outputs); ``()`` skips it.
        decompose: the layer-wise decomposition: ``None`` (default) for chains
            (:func:`model_chain`), skipped with a warning (and a note in the summary) for
            other models; ``True`` asks for it (an error for a model that is not a
            chain); ``False`` skips it.
        units: ``"invariscope"`` (default: pixel, degree, log-scale...) or ``"gruver"``
            (Gruver et al.'s units, so that ``lee_prob_abs`` is their published number;
            see :func:`unit_scale`).
    """

    name = "lee"
    # 2: lee_contrib, lee_contrib_mean; 3: direct t = 0 tangent (the forward-difference
    # convention exact in every dtype and size), units
    version = 3
    grad = True
    part_tables = PART_TABLES
    aggregate_tables = AGGREGATE_TABLES

    def __init__(
        self,
        transforms: str | Sequence[str] = ("translate_x", "rotation"),
        layers: Sequence[str] | None = None,
        decompose: bool | None = None,
        units: str = "invariscope",
    ) -> None:
        self.units = _check_units(units)
        if isinstance(transforms, str):
            transforms = [t.strip() for t in transforms.split(",") if t.strip()]
        names = [str(t) for t in transforms]
        if not names:
            raise InvariscopeError("give at least one transform, e.g. --transforms rotation")
        if len(set(names)) != len(names):
            raise InvariscopeError(f"transform listed twice: {', '.join(names)}")
        self.families = [lie_family(n) for n in names]
        self.layers = None if layers is None else [str(n) for n in layers]
        self.resolved_layers: list[str] = []
        if decompose not in (None, True, False):
            raise InvariscopeError(f"decompose must be True, False or None, got {decompose!r}")
        self.decompose = decompose
        self.chain: list[str] = []
        self.decompose_note = ""

    @property
    def transform_names(self) -> list[str]:
        return [f.name for f in self.families]

    def _layers(self) -> list[str]:
        return self.resolved_layers if self.layers is None else self.layers

    def _check_chain(self, model: nn.Module) -> None:
        self.chain, self.decompose_note = [], ""
        if self.decompose is False:
            self.decompose_note = "not asked for (decompose=False)"
            return
        chain = model_chain(model)
        if chain is None:
            if self.decompose:
                raise InvariscopeError(_not_a_chain(model))
            self.decompose_note = "skipped: " + _not_a_chain(model)
            log.warning("LEE: %s", self.decompose_note)
            return
        self.chain = [name for name, _ in chain]

    def check(self, ctx) -> None:
        model = ctx.models["model"]
        self._check_chain(model)
        x, _ = ctx.datasets["data"][int(ctx.indices["data"][0])]
        x = torch.as_tensor(x)[None].to(ctx.device)
        for family in self.families:  # e.g. units='gruver' rotation needs square images
            unit_scale(family, x.shape[-2], x.shape[-1], self.units)
        if self.layers is None:
            self.resolved_layers = feature_map_layers(model, x)
            return
        for layer in self.layers:
            resolve_layer(model, layer)
        if self.layers:
            shapes: dict[str, Any] = {}

            def hook(name):
                def record(module, inputs, output) -> None:
                    shapes[name] = (
                        list(output.shape)
                        if isinstance(output, torch.Tensor)
                        else type(output).__name__
                    )

                return record

            handles = [register_layer_hook(model, n, hook(n)) for n in self.layers]
            try:
                with torch.inference_mode():
                    model(x)
            finally:
                for h in handles:
                    h.remove()
            for n in self.layers:
                s = shapes.get(n)
                if not (isinstance(s, list) and len(s) == 4):
                    raise InvariscopeError(
                        f"layer '{n}' has no 4-D feature map output (got {s}); pick layers "
                        "whose output is [B, C, H, W], or --layers none"
                    )

    def config(self) -> dict[str, Any]:
        return {
            "transforms": self.transform_names,
            "units": {f.name: unit_name(f, self.units) for f in self.families},
            "unit_system": self.units,
            "layers": self._layers(),
            "layers_default": self.layers is None,
            "decompose": self.decompose,
            "decompose_layers": list(self.chain),
        }

    def work(self, ctx) -> int:
        return 3 * len(ctx.indices["data"]) * len(self.families) * (1 + len(self.chain))

    def max_forward_batch(self, ctx) -> int:
        return max(len(b) for b in ctx.batches["data"])

    def plan(self, ctx) -> list[Part]:
        return [
            Part(part_id("lee", k, b), batch=b, key=k)
            for b in range(len(ctx.batches["data"]))
            for k in range(len(self.families))
        ]

    def compute(self, part: Part, ctx, batch: Batch) -> dict[str, pd.DataFrame]:
        family = self.families[part.key]
        layers = self._layers()
        model = ctx.models["model"]
        n = batch.x.shape[0]
        step = max(1, int(ctx.forward_batch))
        images: list[pd.DataFrame] = []
        per_layer: list[pd.DataFrame] = []
        per_contrib: list[pd.DataFrame] = []
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            d = lie_derivatives(model, batch.x[sl], family, layers=layers, units=self.units)
            index = batch.index[sl].cpu().numpy().astype(np.int64)
            values = _per_image(d)
            images.append(
                pd.DataFrame(
                    {
                        "transform": family.name,
                        "index": index,
                        "label": batch.y[sl].cpu().numpy().astype(np.int64),
                        "pred": values["pred"],
                        "lee": values["lee"],
                        "lee_abs": values["lee_abs"],
                        "lee_prob_abs": values["lee_prob_abs"],
                    }
                )
            )
            for order, layer in enumerate(layers):
                lee, rel = _layer_values(*d.layers[layer])
                per_layer.append(
                    pd.DataFrame(
                        {
                            "transform": family.name,
                            "index": index,
                            "layer": layer,
                            "order": np.full(len(index), order, dtype=np.int64),
                            "lee": lee,
                            "lee_rel": rel,
                        }
                    )
                )
            if self.chain:
                parts = lie_contributions(model, batch.x[sl], family, units=self.units)
                contrib, share = _contribution_values(parts)
                for order, layer in enumerate(self.chain):
                    per_contrib.append(
                        pd.DataFrame(
                            {
                                "transform": family.name,
                                "index": index,
                                "layer": layer,
                                "order": np.full(len(index), order, dtype=np.int64),
                                "contribution": contrib[order],
                                "share": share[order],
                            }
                        )
                    )
        out = {"lee": pd.concat(images, ignore_index=True)}
        # layer-major, images in batch order: independent of the chunking
        if per_layer:
            table = pd.concat(per_layer, ignore_index=True)
            out["lee_layers"] = table.sort_values("order", kind="stable").reset_index(drop=True)
        if per_contrib:
            table = pd.concat(per_contrib, ignore_index=True)
            out["lee_contrib"] = table.sort_values("order", kind="stable").reset_index(drop=True)
        return out

    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        r = ctx.results
        names = ctx.classes["data"]
        units = {f.name: unit_name(f, self.units) for f in self.families}
        per_image = r.read_table("lee")
        rank = {name: i for i, name in enumerate(self.transform_names)}
        per_image = per_image.sort_values(
            ["transform", "index"], key=lambda c: c.map(rank) if c.name == "transform" else c
        ).reset_index(drop=True)
        out = {
            "lee_summary": lee_summary(per_image, units),
            "transforms": pd.DataFrame(
                {
                    "transform": self.transform_names,
                    "unit": [units[f.name] for f in self.families],
                    "magnitude": [f.magnitude_text for f in self.families],
                }
            ),
            "classes": pd.DataFrame(
                {"label": np.arange(len(names), dtype=np.int64), "name": names}
            ),
        }
        if "lee_layers" in r.tables():
            per_layer = r.read_table("lee_layers")
            per_layer = per_layer.sort_values(
                ["transform", "order", "index"],
                key=lambda c: c.map(rank) if c.name == "transform" else c,
            ).reset_index(drop=True)
            out["lee_layers_mean"] = lee_layers_mean(per_layer, self.transform_names)
        if "lee_contrib" in r.tables():
            per_contrib = r.read_table("lee_contrib")
            per_contrib = per_contrib.sort_values(
                ["transform", "order", "index"],
                key=lambda c: c.map(rank) if c.name == "transform" else c,
            ).reset_index(drop=True)
            out["lee_contrib_mean"] = lee_contrib_mean(per_contrib, self.transform_names)
        return out

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        table = aggregates.get("lee_summary")
        if table is None or not len(table):
            return super().headline(summary, aggregates, config)
        parts = [
            f"{r.transform} {ci(r.lee, r.lee_low, r.lee_high)} per {r.unit}"
            for r in table.itertuples(index=False)
        ]
        text = (
            f"Local equivariance error of the logits on {summary.get('num_images')} images "
            "(mean with 95% interval; per unit of each transformation, so not comparable "
            "across transformations): " + ", ".join(parts) + "."
        )
        top = {
            name: entry.get("top_contribution_layer")
            for name, entry in summary.items()
            if isinstance(entry, dict) and entry.get("top_contribution_layer")
        }
        if top:
            by_layer: dict[str, list[str]] = {}
            for name, layer in top.items():
                by_layer.setdefault(str(layer), []).append(name)
            text += (
                " Most of it comes from "
                + "; ".join(f"{layer} ({', '.join(names)})" for layer, names in by_layer.items())
                + "."
            )
        return text

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        out: dict[str, pd.DataFrame] = {}
        table = aggregates.get("lee_summary")
        if table is None or not len(table):
            return out
        units = dict(zip(table["transform"], table["unit"], strict=True))
        out["Local equivariance error of the logits (per unit of the transformation)"] = (
            pd.DataFrame(
                {
                    "unit": table["unit"].to_numpy(),
                    "images": table["n"].to_numpy(),
                    "LEE (mean)": table["lee"].to_numpy(),
                    "95% low": table["lee_low"].to_numpy(),
                    "95% high": table["lee_high"].to_numpy(),
                    "median": table["median_lee"].to_numpy(),
                    "|LEE| of p(class)": table["lee_prob_abs"].to_numpy(),
                },
                index=pd.Index(table["transform"].to_numpy(), name="transformation"),
            )
        )
        for name, caption in (
            ("lee_layers_mean", "Each layer's own equivariance error (layer x transformation)"),
            (
                "lee_contrib_mean",
                "Contribution of each layer to the logits' LEE (layer x transformation)",
            ),
        ):
            t = aggregates.get(name) if name in aggregates else None
            if t is None or not len(t):
                continue
            pivot = tidy_pivot(
                t.sort_values("order", kind="stable"), ["order", "layer"], "transform", "mean"
            )
            pivot.index = pd.Index(pivot.index.get_level_values("layer"), name="layer")
            pivot.columns = [f"{c} (per {units.get(c, 'unit')})" for c in pivot.columns]
            out[caption] = pivot
        return out

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        result: dict[str, Any] = {"num_images": int(len(ctx.indices["data"]))}
        for row in aggregates["lee_summary"].itertuples(index=False):
            result[row.transform] = {
                "unit": row.unit,
                "lee": _round(row.lee),
                "lee_low": _round(row.lee_low),
                "lee_high": _round(row.lee_high),
                "lee_abs": _round(row.lee_abs),
            }
        contrib = aggregates.get("lee_contrib_mean")
        if contrib is not None and len(contrib):
            for name, g in contrib.groupby("transform", sort=False):
                if name in result:
                    top = g.loc[g["mean"].idxmax()] if g["mean"].notna().any() else None
                    result[name]["top_contribution_layer"] = (
                        None if top is None else str(top["layer"])
                    )
        elif self.decompose_note:
            result["decomposition"] = self.decompose_note
        return result


def _round(value: float) -> float | None:
    v = float(value)
    return None if not math.isfinite(v) else float(f"{v:.6g}")


# ------------------------------------------------------------------------- Python API


@dataclass
class LEEResult:
    """What :func:`lie_derivative` returns: ``summary`` (``lee_summary``), ``layers``
    (``lee_layers_mean``, empty when no layer was probed), ``contributions``
    (``lee_contrib_mean``, empty when the model was not decomposed), every aggregate
    table, and the run directory."""

    summary: pd.DataFrame
    layers: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    run_dir: Path | None = None
    contributions: pd.DataFrame = field(default_factory=pd.DataFrame)


def lie_derivative(
    model: nn.Module,
    dataset: Dataset,
    transforms: str | Sequence[str] = ("translate_x", "rotation"),
    *,
    layers: Sequence[str] | None = None,
    decompose: bool | None = None,
    images: int | Sequence[int] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    units: str = "invariscope",
    **engine: Any,
) -> LEEResult:
    """The local equivariance error (LEE) of ``model`` on ``dataset``, in one call.

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    Runs :class:`LEEAnalysis` on the engine (resumable with ``out``, distributable
    under ``torchrun``). ``layers=None`` probes the model's 4-D layers, ``()`` none.
    ``decompose``: the layer-wise decomposition (``lee_contrib_mean``), as in
    :class:`LEEAnalysis` (default: for chains, skipped with a warning otherwise).
    ``units``: ``"invariscope"`` (default) or ``"gruver"`` (:func:`unit_scale`).

    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> r = lie_derivative(create_model("simple-cnn"), create_dataset("digits"), "rotation",
    ...                    images=4, layers=(), progress=False)
    >>> r.summary[["transform", "unit", "n"]].values.tolist()
    [['rotation', 'degree', 4]]
    """
    analysis = LEEAnalysis(transforms, layers=layers, decompose=decompose, units=units)
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
    return LEEResult(
        aggregates["lee_summary"],
        aggregates.get("lee_layers_mean", pd.DataFrame()),
        aggregates,
        result.run_dir,
        aggregates.get("lee_contrib_mean", pd.DataFrame()),
    )


register_analysis(
    AnalysisEntry(
        name="lee",
        analysis=LEEAnalysis,
        title="Lie derivative (local equivariance error)",
        paper=("Gruver et al. 2023 (ICLR), The Lie derivative for measuring learned equivariance"),
        about=(
            "The Lie derivative d/dt f(T_t x) at t = 0 measures how fast the logits change "
            "under an infinitesimal transformation (per pixel of translation, per degree of "
            "rotation, per unit of log-scale); the local equivariance error (LEE) is its "
            "squared norm averaged over images, zero for an exactly invariant model. Per "
            "layer, the same derivative of T_{-t} Gamma(T_t x) is each representation's own "
            "equivariance error; for a chain of layers, Gruver et al.'s additive "
            "decomposition splits the logits' derivative into per-layer contributions "
            "(squared norm; intervals: mean +- 1.96 SE over images)."
        ),
        command="lee",
        report_tables=("lee_summary", "lee_layers_mean", "lee_contrib_mean"),
        figures="invariscope.plots.lee:render_lee_run",
        demo="invariscope.demo:lee_stage",
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
            (("--data", "digits", "--transforms", "hflip"), "hflip is a discrete"),
            (("--data", "digits", "--transforms", "gaussian_blur"), "gaussian_blur"),
            (("--data", "digits", "--layers", "conv9"), "unknown layer 'conv9'"),
            (("--data", "digits", "--layers", "fc"), "no 4-D feature map"),
        ),
    )
)
