"""The transformation registry: :class:`TransformSpec`, lookup, magnitude checks.

Every transformation of :mod:`invariscope.transforms` is registered here once, with
the facts a sweep, a training loop or the command line need about it: identity
magnitude, valid domain, default sweep range, unit, sign convention, kind and, for
geometric ones, its 2x3 pixel matrix. The functions themselves call
:func:`prepare_magnitude`, so a magnitude outside the domain is refused the same way
whether it comes through the registry, the function or the module.

Convention:
    Magnitudes are float tensors ``[B]`` (``[B, 2, 3]`` for ``affine``); a Python number
    or 0-d tensor is broadcast to the batch. Sweep magnitudes (:meth:`TransformSpec.magnitudes`)
    are ``float64`` 1-D tensors; every function casts magnitudes to the images' dtype.
"""

from __future__ import annotations

import builtins
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from invariscope.errors import InvariscopeError, unknown_name

__all__ = [
    "Domain",
    "TransformSpec",
    "TransformModule",
    "register",
    "get_transform",
    "list_transforms",
    "apply",
    "prepare_magnitude",
    "check_images",
]

Kind = Literal["geometric", "photometric", "discrete"]

# The most values a sweep may have: a typo such as ``rotation=-180:180:0.0001`` is refused
# instead of filling memory.
MAX_SWEEP = 100_000


class Domain(NamedTuple):
    """Valid magnitudes: ``lo (<|<=) v (<|<=) hi``; ``inf`` bounds mean unbounded."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the finite entries of ``value`` inside the domain."""
        ok = torch.isfinite(value)
        if math.isfinite(self.lo):
            ok &= value > self.lo if self.lo_open else value >= self.lo
        if math.isfinite(self.hi):
            ok &= value < self.hi if self.hi_open else value <= self.hi
        return ok


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class TransformSpec:
    """One registered transformation.

    Fields follow ``docs/ARCHITECTURE.md``: ``name, fn, module, kind, identity, domain
    (lo, hi, lo_open, hi_open), default_range (start, stop, step), unit, sign,
    description``; the remaining fields have defaults and say how the magnitude is
    written in messages (``symbol``), whether it must be an integer, which keyword
    options the function takes, whether it is differentiable in the magnitude, and,
    for geometric and discrete kinds, ``matrix_fn(magnitude[B], H, W) -> [B, 2, 3]``.

    Calling the spec applies the transformation: ``spec(images, magnitude, **options)``.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    module: type[nn.Module]
    kind: Kind
    identity: Any
    domain: Domain
    default_range: tuple[float, float, float] | None
    unit: str
    sign: str
    description: str
    symbol: str = "v"
    integer: bool = False
    matrix_fn: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None
    options: tuple[str, ...] = ()
    differentiable: bool = True
    magnitude_shape: tuple[int, ...] = ()
    domain_text: str = ""
    extra_check: Callable[[torch.Tensor], str | None] | None = None

    # ------------------------------------------------------------------ description
    @property
    def valid_range(self) -> str:
        """The domain in words, e.g. ``"s > 0"`` or ``"-1 <= v <= 1"``."""
        if self.domain_text:
            return self.domain_text
        lo, hi, lo_open, hi_open = self.domain
        s = self.symbol
        if self.integer and math.isfinite(lo) and math.isfinite(hi):
            values = ", ".join(str(k) for k in builtins.range(math.ceil(lo), math.floor(hi) + 1))
            return f"{s} in {{{values}}}"
        if not math.isfinite(lo) and not math.isfinite(hi):
            return f"any finite {s}"
        if not math.isfinite(hi):
            return f"{s} {'>' if lo_open else '>='} {_num(lo)}"
        if not math.isfinite(lo):
            return f"{s} {'<' if hi_open else '<='} {_num(hi)}"
        return f"{_num(lo)} {'<' if lo_open else '<='} {s} {'<' if hi_open else '<='} {_num(hi)}"

    def domain_error(self, value: Any) -> InvariscopeError:
        """The one-line error for a magnitude outside the domain."""
        shown = _num(float(value)) if isinstance(value, int | float) else str(value)
        return InvariscopeError(
            f"{self.name}: magnitude {shown} outside the valid domain {self.valid_range} "
            f"({self.unit}; {self.sign})"
        )

    # ------------------------------------------------------------------ checks
    def check(self, magnitude: Any) -> None:
        """Raise :class:`InvariscopeError` if any magnitude lies outside the domain.

        The message names the transformation, the offending value and the valid range,
        e.g. ``zoom: magnitude 0 outside the valid domain s > 0 (factor; content
        magnified by s about the centre)``. NaN and infinities are always refused.
        """
        m = torch.as_tensor(magnitude).detach()
        if m.is_complex() or m.dtype == torch.bool:
            raise InvariscopeError(f"{self.name}: magnitude must be real numbers, got {m.dtype}")
        nd = len(self.magnitude_shape)
        if nd and tuple(m.shape[m.dim() - nd :]) != self.magnitude_shape:
            raise InvariscopeError(
                f"{self.name}: magnitude must have shape [B, {', '.join(map(str, self.magnitude_shape))}]"
                f", got {list(m.shape)}"
            )
        if m.numel() == 0:
            return
        m = m.to(torch.float64) if not m.is_floating_point() else m
        ok = self.domain.contains(m)
        if self.integer:
            ok &= m == torch.round(m)
        if not bool(ok.all()):
            if nd:
                size = math.prod(self.magnitude_shape)
                bad = (~ok).reshape(-1, size).any(-1).nonzero()[0, 0]
                raise self.domain_error(m.reshape(-1, *self.magnitude_shape)[bad].tolist())
            raise self.domain_error(m[~ok].flatten()[0].item())
        if self.extra_check is not None:
            problem = self.extra_check(m)
            if problem:
                raise InvariscopeError(f"{self.name}: {problem} ({self.unit}; {self.sign})")

    # ------------------------------------------------------------------ magnitudes
    def identity_magnitude(self, batch: int = 1, *, dtype=None, device=None) -> torch.Tensor:
        """The identity magnitude repeated for a batch: ``[batch]`` (``[batch, 2, 3]`` for affine)."""
        ident = torch.as_tensor(
            self.identity, dtype=dtype or torch.get_default_dtype(), device=device
        )
        return ident.expand(batch, *ident.shape).clone()

    def magnitudes(self, range: Any = None) -> torch.Tensor:  # noqa: A002 - contract name
        """Sweep magnitudes for ``range = (start, stop[, step])`` or ``"start:stop[:step]"``.

        Returns a sorted ``float64`` 1-D tensor ``start, start + step, ...``, inclusive of
        ``stop`` when it lies on the step grid (up to rounding), and always including the
        identity magnitude when it lies within ``[start, stop]``. ``range=None`` uses
        :attr:`default_range`; a missing step uses the default step. Every value is
        checked against the domain.

        >>> get_transform("zoom").magnitudes((0.5, 2.0, 0.4)).tolist()
        [0.5, 0.9, 1.0, 1.3, 1.7]
        """
        if self.magnitude_shape:
            raise InvariscopeError(
                f"{self.name}: has no scalar sweep (its magnitude is a [B, 2, 3] matrix); "
                "sweep a named transformation such as rotation or zoom instead"
            )
        start, stop, step = self._resolve_range(range)
        if not step > 0:
            raise InvariscopeError(f"{self.name}: sweep step must be > 0, got {_num(step)}")
        if start > stop:
            raise InvariscopeError(
                f"{self.name}: sweep start {_num(start)} is above stop {_num(stop)}; swap them"
            )
        n = math.floor((stop - start) / step + 1e-9)
        if n + 1 > MAX_SWEEP:
            raise InvariscopeError(
                f"{self.name}: sweep {_num(start)}:{_num(stop)}:{_num(step)} has {n + 1} values "
                f"(at most {MAX_SWEEP}); use a larger step"
            )
        values = [round(start + i * step, 12) for i in builtins.range(n + 1)]
        ident = float(self.identity)
        if start <= ident <= stop and not any(
            abs(v - ident) <= 1e-9 * max(1.0, abs(step)) for v in values
        ):
            values = sorted([*values, ident])
        out = torch.tensor(values, dtype=torch.float64)
        self.check(out)
        return out

    def _resolve_range(self, range: Any) -> tuple[float, float, float]:  # noqa: A002
        if range is None:
            if self.default_range is None:
                raise InvariscopeError(f"{self.name}: has no default sweep range; pass one")
            return tuple(float(v) for v in self.default_range)  # type: ignore[return-value]
        if isinstance(range, str):
            parts = range.split(":")
            if len(parts) not in (2, 3):
                raise InvariscopeError(
                    f"{self.name}: sweep range '{range}' must be START:STOP[:STEP], e.g. "
                    f"{self._example_range()}"
                )
            range = [_parse_number(self.name, p) for p in parts]
        try:
            values = [float(v) for v in range]
        except (TypeError, ValueError) as err:
            raise InvariscopeError(
                f"{self.name}: sweep range must be (start, stop[, step]) numbers, got {range!r}"
            ) from err
        if len(values) == 2:
            if self.default_range is None:
                raise InvariscopeError(f"{self.name}: sweep range needs a step, got {range!r}")
            values.append(float(self.default_range[2]))
        if len(values) != 3:
            raise InvariscopeError(
                f"{self.name}: sweep range must be (start, stop[, step]), got {len(values)} numbers"
            )
        if not all(math.isfinite(v) for v in values):
            raise InvariscopeError(
                f"{self.name}: sweep range must be finite numbers, got {range!r}"
            )
        return values[0], values[1], values[2]

    def _example_range(self) -> str:
        if self.default_range is None:
            return f"{self.name}=..."
        return ":".join(_num(v) for v in self.default_range)

    # ------------------------------------------------------------------ application
    def matrix(self, magnitude: Any, H: int, W: int) -> torch.Tensor | None:
        """The 2x3 pixel forward matrix ``[B, 2, 3]`` of this transformation, or None.

        ``None`` for photometric transformations. The matrix maps an input pixel
        position ``(x, y, 1)`` (origin at the centre of the top-left pixel, x right,
        y down) to its output position; it is what :func:`warp_affine` takes.
        """
        if self.matrix_fn is None:
            return None
        if magnitude is None:
            magnitude = self.default_magnitude
            if magnitude is None:
                raise InvariscopeError(f"{self.name}: no magnitude given")
        m = torch.as_tensor(magnitude)
        if not m.is_floating_point():
            m = m.to(torch.get_default_dtype())
        self.check(m)
        if m.dim() == len(self.magnitude_shape):
            m = m.unsqueeze(0)
        return self.matrix_fn(m, int(H), int(W))

    def __call__(self, images: torch.Tensor, magnitude: Any = None, **options: Any) -> torch.Tensor:
        self.check_options(options)
        if magnitude is None:
            return self.fn(images, **options)
        return self.fn(images, magnitude, **options)

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse keyword options this transformation does not take."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise InvariscopeError(
                f"{self.name}: unknown option '{unknown[0]}'; valid options: {valid}"
            )

    @property
    def default_magnitude(self) -> Any:
        """The function's default magnitude (1 for flips and rot90), or None if it has none."""
        param = inspect.signature(self.fn).parameters.get("magnitude")
        if param is None or param.default is inspect.Parameter.empty:
            return None
        return param.default


def _parse_number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvariscopeError(f"{name}: '{text}' is not a number") from None


_REGISTRY: dict[str, TransformSpec] = {}


def register(spec: TransformSpec) -> TransformSpec:
    """Add a transformation to the registry; a duplicate name is refused."""
    if spec.name in _REGISTRY:
        raise ValueError(f"transformation '{spec.name}' is already registered")
    if spec.kind not in ("geometric", "photometric", "discrete"):
        raise ValueError(f"transformation '{spec.name}': unknown kind {spec.kind!r}")
    if (spec.kind != "photometric") != (spec.matrix_fn is not None):
        raise ValueError(f"transformation '{spec.name}': geometric/discrete kinds need matrix_fn")
    _REGISTRY[spec.name] = spec
    return spec


def get_transform(name: str) -> TransformSpec:
    """The registered :class:`TransformSpec` called ``name`` (unknown -> InvariscopeError)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise unknown_name("transform", str(name), _REGISTRY) from None


def list_transforms() -> list[str]:
    """Names of all registered transformations, in registration order."""
    return list(_REGISTRY)


def apply(name: str, images: torch.Tensor, magnitude: Any = None, **options: Any) -> torch.Tensor:
    """Apply the registered transformation ``name``: ``get_transform(name)(images, magnitude, **options)``."""
    return get_transform(name)(images, magnitude, **options)


# ---------------------------------------------------------------------- helpers for the functions
def check_images(name: str, images: Any) -> None:
    """Refuse anything but a floating tensor ``[B, C, H, W]``, printing what was received."""
    if not isinstance(images, torch.Tensor):
        raise InvariscopeError(
            f"{name}: images must be a float tensor [B, C, H, W], got {type(images).__name__}"
        )
    if images.dim() != 4 or not images.is_floating_point():
        raise InvariscopeError(
            f"{name}: images must be a float tensor [B, C, H, W], got shape {list(images.shape)} "
            f"dtype {images.dtype}; add a batch dimension with images[None]"
        )


def prepare_magnitude(name: str, images: torch.Tensor, magnitude: Any) -> torch.Tensor:
    """Check ``images`` and return ``magnitude`` checked, on their device and dtype, as ``[B, *shape]``.

    A Python number, a 0-d tensor (or a single ``[2, 3]`` matrix for ``affine``) or a
    batch of one is broadcast to the images' batch ``B``; any other batch size is refused.
    Autograd flows through the conversion, so the result is differentiable in ``magnitude``.
    """
    check_images(name, images)
    spec = get_transform(name)
    shape = spec.magnitude_shape
    if isinstance(magnitude, torch.Tensor):
        spec.check(magnitude)
        m = magnitude.to(device=images.device, dtype=images.dtype)
    else:
        if magnitude is None:
            raise InvariscopeError(f"{name}: no magnitude given")
        try:
            m = torch.as_tensor(magnitude, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InvariscopeError(
                f"{name}: magnitude must be a number or a tensor, got {magnitude!r}"
            ) from err
        spec.check(m)
        m = m.to(device=images.device, dtype=images.dtype)
    B = images.shape[0]
    if m.dim() == len(shape):
        return m.expand(B, *shape)
    if m.dim() == len(shape) + 1 and m.shape[0] in (1, B):
        return m.expand(B, *shape)
    want = "[" + ", ".join(["B", *map(str, shape)]) + "]"
    raise InvariscopeError(
        f"{name}: magnitude has shape {list(m.shape)} but the images have a batch of {B}; "
        f"pass a number or a tensor of shape {want} with B = {B}"
    )


class TransformModule(nn.Module):
    """Base of the thin modules: ``Module(magnitude=None, **options)(images, magnitude=None)``.

    ``forward`` calls the registered function with the magnitude given to ``forward``,
    else the one given to the constructor, else the function's own default (flips,
    rot90); options are the function's keyword options with the same defaults.
    """

    transform_name: str = ""

    def __init__(self, magnitude: Any = None, **options: Any) -> None:
        super().__init__()
        get_transform(self.transform_name).check_options(options)
        self.magnitude = magnitude
        self.options = options

    def forward(self, images: torch.Tensor, magnitude: Any = None) -> torch.Tensor:
        spec = get_transform(self.transform_name)
        m = self.magnitude if magnitude is None else magnitude
        if m is None:
            if spec.default_magnitude is None:
                cls = type(self).__name__
                raise InvariscopeError(
                    f"{cls}: no magnitude given; pass it as {cls}(magnitude) or forward(images, magnitude)"
                )
            return spec.fn(images, **self.options)
        return spec.fn(images, m, **self.options)

    def extra_repr(self) -> str:
        parts = [] if self.magnitude is None else [f"magnitude={self.magnitude!r}"]
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        return ", ".join(parts)
