"""The one warp core: pixel-coordinate affine warps, and conversion to ``F.affine_grid``'s theta.

Every geometric transformation, spatial transformer network, the Invariant Transformer
Net and the equivariance maps resample images through :func:`warp_affine`, which is
:func:`kornia.geometry.transform.warp_affine` with invariscope's conventions fixed.

Convention:
    - Pixel coordinates: origin at the centre of the top-left pixel, x to the right,
      y down; the image centre is ``((W - 1) / 2, (H - 1) / 2)``.
    - A matrix ``M`` ``[B, 2, 3]`` is the FORWARD map: the input pixel at ``(x, y)``
      lands at ``M @ (x, y, 1)`` in the output. Applying ``M1`` then ``M2`` is the
      single warp ``M2 @ M1`` (3x3 homogeneous product, see :func:`affine_product`).
    - Resampling is bilinear by default; positions outside the input read zeros
      (``padding_mode="zeros"``), or the nearest border pixel (``"border"``), or the
      image mirrored about its outer pixel edges (``"reflection"``: pixel ``-1`` reads
      pixel ``0``). Sampling uses ``align_corners=False`` (pixel centres at
      ``(2 i + 1) / size - 1`` in normalised coordinates).
    - :func:`pixel_to_theta` gives the ``theta`` of :func:`torch.nn.functional.affine_grid`
      (an OUTPUT -> INPUT map in normalised coordinates) for either ``align_corners``;
      ``F.grid_sample(x, F.affine_grid(pixel_to_theta(M, H, W, align_corners=a), x.shape,
      align_corners=a), align_corners=a)`` equals ``warp_affine(x, M)`` for zeros and
      border padding with either ``a``, and for reflection padding with ``a=False``.
"""

from __future__ import annotations

import torch
from kornia.geometry.transform import invert_affine_transform
from kornia.geometry.transform import warp_affine as _kornia_warp_affine

from invariscope.errors import InvariscopeError
from invariscope.transforms.registry import check_images

__all__ = [
    "MODES",
    "PADDING_MODES",
    "warp_affine",
    "pixel_to_theta",
    "theta_to_pixel",
    "affine_product",
    "invert_affine",
    "about_centre",
    "to_homogeneous",
]

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")


def check_warp_options(name: str, mode: str, padding_mode: str) -> None:
    """Refuse an unknown interpolation or padding mode with a one-line error."""
    if mode not in MODES:
        raise InvariscopeError(f"{name}: mode '{mode}' is not one of {', '.join(MODES)}")
    if padding_mode not in PADDING_MODES:
        raise InvariscopeError(
            f"{name}: padding_mode '{padding_mode}' is not one of {', '.join(PADDING_MODES)}"
        )


def _as_matrix(name: str, matrix: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    matrix = torch.as_tensor(matrix)
    if matrix.dim() not in (2, 3) or tuple(matrix.shape[-2:]) != (2, 3):
        raise InvariscopeError(
            f"{name}: matrix must have shape [B, 2, 3], got {list(matrix.shape)}"
        )
    if matrix.dim() == 2:
        matrix = matrix.unsqueeze(0)
    if like is not None:
        matrix = matrix.to(device=like.device, dtype=like.dtype)
    elif not matrix.is_floating_point():
        matrix = matrix.to(torch.get_default_dtype())
    return matrix


def to_homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` -> ``[B, 3, 3]`` with the bottom row ``(0, 0, 1)``."""
    bottom = torch.zeros_like(matrix[:, :1, :])
    bottom[:, 0, 2] = 1
    return torch.cat([matrix, bottom], dim=1)


def affine_product(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The forward matrix of applying ``inner`` first, then ``outer``: ``outer @ inner``.

    Both ``[B, 2, 3]`` (or ``[1, 2, 3]``, broadcast); returns ``[B, 2, 3]``.

    >>> import torch
    >>> shift = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]])
    >>> affine_product(shift, shift)[0].tolist()
    [[1.0, 0.0, 4.0], [0.0, 1.0, 0.0]]
    """
    a = outer[..., :2]
    return torch.cat([a @ inner[..., :2], a @ inner[..., 2:] + outer[..., 2:]], dim=-1)


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of forward matrices ``[B, 2, 3]`` (kornia's ``invert_affine_transform``)."""
    return invert_affine_transform(_as_matrix("invert_affine", matrix))


def about_centre(linear: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward matrices ``[B, 2, 3]`` applying ``linear`` ``[B, 2, 2]`` about the image centre.

    The centre ``c = ((W - 1) / 2, (H - 1) / 2)`` stays fixed: ``p -> A (p - c) + c``.
    """
    c = linear.new_tensor([(W - 1) / 2.0, (H - 1) / 2.0])
    t = c - linear @ c
    return torch.cat([linear, t.unsqueeze(-1)], dim=-1)


def warp_affine(
    images: torch.Tensor,
    matrix: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Warp ``images`` by pixel-coordinate forward matrices (the one warp core).

    Args:
        images: ``[B, C, H, W]`` float tensor.
        matrix: ``[B, 2, 3]`` (or ``[1, 2, 3]`` / ``[2, 3]``, shared by the batch) forward
            map in pixel coordinates: the input pixel at ``(x, y)`` lands at
            ``matrix @ (x, y, 1)``. Cast to the images' dtype and device.
        mode: ``"bilinear"`` (default), ``"nearest"`` or ``"bicubic"``.
        padding_mode: what positions outside the input read: ``"zeros"`` (default),
            ``"border"`` or ``"reflection"``.

    Returns:
        ``[B, C, H, W]``, same dtype; differentiable in ``images`` and ``matrix``.

    Convention:
        Origin at the centre of the top-left pixel, x right, y down; forward map;
        zeros outside by default; ``align_corners=False`` sampling (see module docstring).

    >>> import torch
    >>> x = torch.zeros(1, 1, 3, 5); x[0, 0, 1, 1] = 1.0
    >>> right2 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    >>> warp_affine(x, right2)[0, 0, 1].tolist()
    [0.0, 0.0, 0.0, 1.0, 0.0]
    """
    check_images("warp_affine", images)
    check_warp_options("warp_affine", mode, padding_mode)
    matrix = _as_matrix("warp_affine", matrix, like=images)
    if matrix.shape[0] not in (1, images.shape[0]):
        raise InvariscopeError(
            f"warp_affine: matrix batch {matrix.shape[0]} does not match the images' batch "
            f"{images.shape[0]}; pass [B, 2, 3] or one [2, 3] matrix"
        )
    H, W = images.shape[-2:]
    return _kornia_warp_affine(
        images, matrix, (H, W), mode=mode, padding_mode=padding_mode, align_corners=False
    )


def _normaliser(H: int, W: int, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """``[1, 3, 3]`` map from pixel coordinates to ``F.affine_grid``'s normalised coordinates."""

    def axis(n: int) -> tuple[float, float]:
        if align_corners:
            return (1.0, 0.0) if n == 1 else (2.0 / (n - 1), -1.0)
        return 2.0 / n, 1.0 / n - 1.0

    (sx, ox), (sy, oy) = axis(W), axis(H)
    return like.new_tensor([[[sx, 0.0, ox], [0.0, sy, oy], [0.0, 0.0, 1.0]]])


def pixel_to_theta(
    matrix: torch.Tensor, H: int, W: int, *, align_corners: bool = False
) -> torch.Tensor:
    """Convert forward pixel matrices to ``F.affine_grid``'s ``theta``.

    Args:
        matrix: ``[B, 2, 3]`` forward map in pixel coordinates (as :func:`warp_affine`).
        H, W: image height and width in pixels.
        align_corners: the value you will pass to ``F.affine_grid`` and ``F.grid_sample``.

    Returns:
        ``theta`` ``[B, 2, 3]``: the OUTPUT -> INPUT map in normalised coordinates, so that
        ``F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=align_corners),
        align_corners=align_corners)`` equals ``warp_affine(x, matrix)`` (zeros or border
        padding; reflection with ``align_corners=False``). Differentiable in ``matrix``.

    >>> import torch
    >>> right1 = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    >>> pixel_to_theta(right1, 4, 4)[0].tolist()   # sample 1 px (0.5 normalised) to the left
    [[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]]
    """
    matrix = _as_matrix("pixel_to_theta", matrix)
    n = _normaliser(H, W, align_corners, matrix)
    inverse = to_homogeneous(invert_affine_transform(matrix))
    return (n @ inverse @ torch.linalg.inv(n))[:, :2, :]


def theta_to_pixel(
    theta: torch.Tensor, H: int, W: int, *, align_corners: bool = False
) -> torch.Tensor:
    """Inverse of :func:`pixel_to_theta`: ``F.affine_grid`` theta ``[B, 2, 3]`` -> forward pixel matrix.

    Use it to read the transformation a localisation network predicts in the same pixel
    units (degrees, pixels, factors) as the registered transformations.
    """
    theta = _as_matrix("theta_to_pixel", theta)
    n = _normaliser(H, W, align_corners, theta)
    sampling = torch.linalg.inv(n) @ to_homogeneous(theta) @ n
    return invert_affine_transform(sampling[:, :2, :])
