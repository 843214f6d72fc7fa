"""Composition: apply transformations in order, fusing consecutive warps into one.

A step is ``(name, magnitude)`` or ``(name, magnitude, options)`` with ``options`` a
dict of that transformation's keyword options. Consecutive geometric / discrete steps
with the same ``mode`` and ``padding_mode`` are fused into ONE resampling by the
product of their forward matrices, so a rotation followed by its inverse returns the
image without losing the corners, and ``zoom`` then ``rotation`` interpolates once.

Convention:
    Steps apply in list order: ``compose(x, [(a, u), (b, v)]) = b(a(x, u), v)`` (up to
    the single resampling of fused warps). Fused matrix ``M_b @ M_a`` (forward pixel
    maps, see :mod:`invariscope.transforms.warp`). Warps fill with zeros by default,
    photometric steps clamp to ``[0, 1]`` by default. A single discrete step (flip,
    rot90), or a run of discrete steps only, is applied exactly (no interpolation).
    Odd ``rot90`` turns of non-square images are refused, fused or not, as by ``rot90``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.transforms.geometric import check_rot90_shape
from invariscope.transforms.registry import (
    TransformSpec,
    check_images,
    get_transform,
    list_transforms,
    prepare_magnitude,
)
from invariscope.transforms.warp import affine_product, warp_affine

__all__ = ["compose", "compose_matrix", "Compose", "Step"]

Step = tuple[str, Any] | tuple[str, Any, dict[str, Any]]


def _parse_steps(steps: Sequence[Any]) -> list[tuple[TransformSpec, Any, dict[str, Any]]]:
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise InvariscopeError(
            f"compose: steps must be a list of (name, magnitude[, options]) tuples, got {type(steps).__name__}"
        )
    parsed = []
    for i, step in enumerate(steps):
        if not isinstance(step, Sequence) or isinstance(step, str) or len(step) not in (2, 3):
            raise InvariscopeError(
                f"compose: step {i} must be (name, magnitude) or (name, magnitude, options), got {step!r}"
            )
        spec = get_transform(step[0])
        options = dict(step[2]) if len(step) == 3 else {}
        spec.check_options(options)
        parsed.append((spec, step[1], options))
    return parsed


def _known_options() -> set[str]:
    return {opt for name in list_transforms() for opt in get_transform(name).options}


def _check_shared_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - _known_options())
    if unknown:
        raise InvariscopeError(
            f"compose: unknown option '{unknown[0]}'; valid options: {', '.join(sorted(_known_options()))}"
        )


def compose(images: torch.Tensor, steps: Sequence[Step], **options: Any) -> torch.Tensor:
    """Apply ``steps`` to ``images`` ``[B, C, H, W]`` in order, fusing consecutive warps.

    Args:
        images: ``[B, C, H, W]`` float tensor in ``[0, 1]``.
        steps: ``[(name, magnitude), ...]`` or ``(name, magnitude, options)`` triples;
            each magnitude is whatever that transformation takes (number, ``[B]`` tensor,
            ``[B, 2, 3]`` for ``affine``).
        **options: defaults given to every step that takes them (``mode``,
            ``padding_mode``, ``clamp``, ``seed``, ``border_type``); a step's own options
            win.

    Returns:
        ``[B, C, H, W]``.

    Convention:
        In list order; consecutive geometric / discrete steps with equal ``mode`` and
        ``padding_mode`` become ONE warp by the product of their matrices (zeros fill
        by default); photometric steps break a run and clamp to ``[0, 1]`` by default.

    Raises:
        InvariscopeError: for a ``rot90`` step with odd k on non-square images (as
            ``rot90`` itself), also when it would be fused into a warp.

    >>> import torch
    >>> x = torch.rand(1, 1, 9, 9)
    >>> y = compose(x, [("rotation", 30.0), ("zoom", 1.5), ("zoom", 1 / 1.5), ("rotation", -30.0)])
    >>> bool((y - x).abs().max() < 1e-5)   # fused into one identity warp: corners survive
    True
    """
    check_images("compose", images)
    _check_shared_options(options)
    parsed = _parse_steps(steps)
    H, W = images.shape[-2:]
    for i, (spec, magnitude, _) in enumerate(parsed):
        # a fused warp would otherwise turn a non-square image by 90 degrees into its
        # own frame (cut off and zero-filled) where rot90 alone refuses it
        if spec.name == "rot90":
            if magnitude is None:
                magnitude = spec.default_magnitude
            k = prepare_magnitude(spec.name, images, magnitude)
            check_rot90_shape(k, H, W, who=f"compose: rot90 (step {i})")
    run: list[tuple[TransformSpec, Any, dict[str, Any]]] = []
    run_key: tuple[str, str] | None = None
    out = images
    for spec, magnitude, own in parsed:
        opts = {k: v for k, v in options.items() if k in spec.options} | own
        if spec.kind == "photometric":
            out = _flush(out, run)
            run, run_key = [], None
            out = spec(out, magnitude, **opts)
            continue
        key = (opts.get("mode", "bilinear"), opts.get("padding_mode", "zeros"))
        if run and key != run_key:
            out = _flush(out, run)
            run = []
        run.append((spec, magnitude, opts))
        run_key = key
    return _flush(out, run)


def _flush(
    images: torch.Tensor, run: list[tuple[TransformSpec, Any, dict[str, Any]]]
) -> torch.Tensor:
    """Apply a run of geometric / discrete steps: one warp, or exact ops if all discrete."""
    if not run:
        return images
    if len(run) == 1 or all(spec.kind == "discrete" for spec, _, _ in run):
        for spec, magnitude, opts in run:
            images = spec(images, magnitude, **opts)
        return images
    H, W = images.shape[-2:]
    matrix = None
    for spec, magnitude, _ in run:
        if magnitude is None:
            magnitude = spec.default_magnitude
        m = spec.matrix_fn(prepare_magnitude(spec.name, images, magnitude), H, W)
        matrix = m if matrix is None else affine_product(m, matrix)
    opts = run[0][2]
    return warp_affine(
        images,
        matrix,
        mode=opts.get("mode", "bilinear"),
        padding_mode=opts.get("padding_mode", "zeros"),
    )


def compose_matrix(steps: Sequence[Step], H: int, W: int) -> torch.Tensor:
    """The forward pixel matrix ``[B, 2, 3]`` of geometric / discrete ``steps`` applied in order.

    ``compose_matrix([(a, u), (b, v)], H, W) = M_b(v) @ M_a(u)``. Photometric steps have
    no matrix and are refused. The dtype is the promotion of the magnitudes' dtypes
    (the default dtype for Python numbers); ``B`` broadcasts over the steps.

    >>> compose_matrix([("translate_x", 0.25), ("hflip", 1)], 4, 4)[0].tolist()
    [[-1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]
    """
    parsed = _parse_steps(steps)
    if not parsed:
        raise InvariscopeError("compose_matrix: needs at least one step")
    dtype = torch.get_default_dtype()
    for _, magnitude, _ in parsed:
        if isinstance(magnitude, torch.Tensor) and magnitude.is_floating_point():
            dtype = torch.promote_types(dtype, magnitude.dtype)
    matrix = None
    for spec, magnitude, _ in parsed:
        if spec.kind == "photometric":
            raise InvariscopeError(
                f"compose_matrix: '{spec.name}' is photometric and has no matrix; "
                "keep only geometric and discrete steps"
            )
        m = spec.matrix(magnitude, H, W).to(dtype)
        matrix = m if matrix is None else affine_product(m, matrix)
    return matrix


class Compose(nn.Module):
    """Module form of :func:`compose`: ``Compose(steps, **options)(images)``.

    Steps are checked (names, options) when the module is built; magnitudes are fixed at
    construction. Same defaults as :func:`compose` (zeros fill, clamped photometric steps).
    """

    def __init__(self, steps: Sequence[Step], **options: Any) -> None:
        super().__init__()
        _check_shared_options(options)
        _parse_steps(steps)
        self.steps = list(steps)
        self.options = options

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return compose(images, self.steps, **self.options)

    def extra_repr(self) -> str:
        names = " -> ".join(str(step[0]) for step in self.steps)
        return f"{names}" + "".join(f", {k}={v!r}" for k, v in self.options.items())
