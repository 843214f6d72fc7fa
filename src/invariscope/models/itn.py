"""The Invariant Transformer Net (Bunne et al. 2018, strategy 2): a learned family of
transformations ``F(k1, k2)`` that a frozen classifier is invariant to.

Two small fully connected nets (two layers, ReLU) each map ONE control ``k`` in ``[0, 1]``
to an affine transformation:

- the *spatial* net gives ``A_theta`` ``[2, 3]``, a forward affine map in normalised
  centred coordinates (below);
- the *colour* net gives ``A_phi`` ``[C, C + 1]`` acting on each pixel's colour vector in
  homogeneous coordinates: ``I'_c = sum_c' A_phi[c, c'] I_c' + A_phi[c, C]`` (so
  brightness shifts are possible; ``C`` = image channels: 3 for RGB, 1 for digits, where
  ``A_phi = [contrast, brightness]``).

The image is colour-transformed first (NOT clamped by default: the paper's colour
transformer is a plain matrix product; with a clamp to ``[0, 1]`` a saturating contrast
increase becomes nearly free, a direction in which the invariance loss grows without
bound while the image hardly changes, which the ITN finds and follows on digits), then
warped through the warp core
:func:`invariscope.transforms.warp_affine` (bilinear, zeros outside by default), and then
fed to the frozen classifier. Both nets start at the identity transformation for every
``k`` (last layer: zero weights, identity bias), so at initialisation the transformed
images equal the inputs.

Which control drives which transformation: the paper's text and figures disagree. Its
loss ``c_theta L_k1(A_phi) + L_k2(A_theta)`` lets ``k1`` drive the colour transformation
and ``k2`` the spatial one, while its figure 5 and its discussion ("changes of the
parameter k1 result in a changing spatial transformation") let ``k1`` drive the spatial
one. Here the mapping is explicit: ``controls=("spatial", "colour")`` (default, as the
figures: ``k1`` spatial, ``k2`` colour) or ``("colour", "spatial")`` (as the text).

Convention (spatial):
    ``A_theta`` maps normalised centred coordinates FORWARD: the input point ``u`` lands
    at ``A_theta @ (u, 1)`` in the output, where ``u = ((x - (W - 1) / 2) / (W / 2),
    (y - (H - 1) / 2) / (H / 2))`` for pixel coordinates ``(x, y)`` (origin at the
    centre of the top-left pixel, x right, y down). So the image centre is the origin
    and the image spans ``[-1, 1]`` between its outer pixel edges on both axes: these
    are the coordinates of ``F.affine_grid`` with ``align_corners=False``, but the map
    goes input -> output (an STN's ``theta`` goes output -> input). The identity is
    ``[[1, 0, 0], [0, 1, 0]]``. :func:`theta_to_pixel_matrix` converts it to the warp
    core's pixel matrix. The invariance loss uses ``A_theta`` itself, so it does not
    depend on the image resolution.

Loss (the paper's section III.D): for an affine ``A`` ``[r, r + 1]`` extended to the
square ``A_hat`` (last row ``[0, ..., 0, 1]``),
``L(A) = -(1 / |S|) sum_{x in S} ||A_hat x - x||^2`` over random unit vectors ``S`` in
``R^{r + 1}``; ``L_k(A) = (1 / B) sum_j k_j L(A_j)`` over the batch (the paper writes the
sum; the mean makes the value independent of the batch size). The training rule (which
of the classifier's loss and ``c_theta L_k(spatial) + L_k(colour)`` a batch uses) is
:func:`select_loss`; the training loop lives in :mod:`invariscope.measure.itn`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.transforms.warp import check_warp_options, to_homogeneous, warp_affine

__all__ = [
    "CONTROLS",
    "ControlNet",
    "InvariantTransformerNet",
    "colour_transform",
    "control_loss",
    "decompose_colour",
    "decompose_spatial",
    "extend_square",
    "invariance_loss",
    "mean_displacement",
    "rms_displacement",
    "select_loss",
    "theta_to_pixel_matrix",
    "unit_vectors",
]

#: The two transformation kinds; ``controls`` names which one ``k1`` and ``k2`` drive.
CONTROLS = ("spatial", "colour")


# ---------------------------------------------------------------------- the loss


def extend_square(matrix: torch.Tensor) -> torch.Tensor:
    """``[B, r, r + 1]`` affine matrices -> ``[B, r + 1, r + 1]`` with last row ``[0, ..., 0, 1]``."""
    if matrix.dim() != 3 or matrix.shape[-1] != matrix.shape[-2] + 1:
        raise InvariscopeError(
            f"an affine matrix must have shape [B, r, r + 1], got {list(matrix.shape)}"
        )
    bottom = torch.zeros_like(matrix[:, :1, :])
    bottom[:, 0, -1] = 1
    return torch.cat([matrix, bottom], dim=1)


def unit_vectors(
    n: int, dim: int, *, generator: torch.Generator | None = None, dtype=torch.float32
) -> torch.Tensor:
    """``n`` random unit vectors ``[n, dim]``, uniform on the sphere (normalised Gaussians)."""
    z = torch.randn(n, dim, generator=generator, dtype=dtype)
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def invariance_loss(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The paper's transformation loss ``L(A)`` per matrix: ``[B]``.

    ``L(A) = -(1 / |S|) sum_{x in S} ||A_hat x - x||^2`` with ``A_hat`` the square
    extension of ``A`` (:func:`extend_square`) and ``S`` = ``vectors`` ``[n, r + 1]``
    (unit vectors, e.g. from :func:`unit_vectors`). Non-positive; 0 exactly at the
    identity; more negative for transformations that move points further.

    >>> import torch
    >>> shift = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # x -> x + 0.5 (normalised)
    >>> invariance_loss(shift, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])).tolist()
    [-0.125]
    """
    square = extend_square(matrix)
    eye = torch.eye(square.shape[-1], dtype=square.dtype, device=square.device)
    if vectors.dim() != 2 or vectors.shape[1] != square.shape[-1]:
        raise InvariscopeError(
            f"the vectors S must have shape [n, {square.shape[-1]}], got {list(vectors.shape)}"
        )
    diff = torch.einsum("bij,nj->bni", square - eye, vectors.to(square))
    return -(diff**2).sum(dim=-1).mean(dim=-1)


def control_loss(matrix: torch.Tensor, k: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``L_k(A) = (1 / B) sum_j k_j L(A_j)``: the batch mean of each sample's control
    times its matrix's :func:`invariance_loss` (a 0-d tensor)."""
    return (k.to(matrix) * invariance_loss(matrix, vectors)).mean()


def select_loss(batch_accuracy: float, acc_orig: float) -> str:
    """The paper's switch rule: ``"classifier"`` when the batch accuracy is below
    ``acc_orig``, else ``"invariance"`` (at or above it).

    >>> select_loss(0.5, 0.9), select_loss(0.9, 0.9)
    ('classifier', 'invariance')
    """
    return "classifier" if batch_accuracy < acc_orig else "invariance"


def rms_displacement(matrix: torch.Tensor) -> torch.Tensor:
    """``sqrt(E ||A_hat x - x||^2)`` for ``x`` uniform on the unit sphere, exactly: ``[B]``.

    ``E[x x^T] = I / d`` on the unit sphere of ``R^d``, so the mean squared displacement
    is ``||A_hat - I||_F^2 / d`` (``d = r + 1``); ``-L(A)`` estimates its square.
    """
    square = extend_square(matrix)
    eye = torch.eye(square.shape[-1], dtype=square.dtype, device=square.device)
    return ((square - eye) ** 2).sum(dim=(-2, -1)).div(square.shape[-1]).sqrt()


def mean_displacement(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``(1 / |S|) sum_{x in S} ||A_hat x - x||`` (not squared) over ``vectors``: ``[B]``."""
    square = extend_square(matrix)
    eye = torch.eye(square.shape[-1], dtype=square.dtype, device=square.device)
    diff = torch.einsum("bij,nj->bni", square - eye, vectors.to(square))
    return diff.norm(dim=-1).mean(dim=-1)


# ---------------------------------------------------------------------- conventions


def _normaliser(H: int, W: int, like: torch.Tensor) -> torch.Tensor:
    """``[1, 3, 3]``: pixel coordinates -> normalised centred coordinates (half-size 1)."""
    return like.new_tensor(
        [[[2.0 / W, 0.0, 1.0 / W - 1.0], [0.0, 2.0 / H, 1.0 / H - 1.0], [0.0, 0.0, 1.0]]]
    )


def theta_to_pixel_matrix(theta: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Forward ``A_theta`` ``[B, 2, 3]`` in normalised centred coordinates -> the warp core's
    forward pixel matrix ``[B, 2, 3]`` (``N^-1 A_theta N``, ``N`` pixel -> normalised).

    >>> import torch
    >>> half = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # a quarter width right
    >>> theta_to_pixel_matrix(half, 8, 8)[0].tolist()
    [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]
    """
    n = _normaliser(H, W, theta)
    return (torch.linalg.inv(n) @ to_homogeneous(theta) @ n)[:, :2, :]


def colour_transform(
    images: torch.Tensor, matrix: torch.Tensor, *, clamp: bool = False
) -> torch.Tensor:
    """Apply per-image colour affine maps ``[B, C, C + 1]`` to ``images`` ``[B, C, H, W]``.

    ``out[c] = sum_c' matrix[c, c'] images[c'] + matrix[c, C]`` at every pixel; clamped
    to ``[0, 1]`` only when ``clamp`` (default False). Differentiable in both arguments.
    """
    C = images.shape[1]
    if matrix.shape[-2:] != (C, C + 1):
        raise InvariscopeError(
            f"the colour matrices must have shape [B, {C}, {C + 1}] for {C}-channel images, "
            f"got {list(matrix.shape)}"
        )
    out = torch.einsum("bij,bjhw->bihw", matrix[:, :, :C], images) + matrix[:, :, C, None, None]
    return out.clamp(0.0, 1.0) if clamp else out


def decompose_spatial(pixel_matrix: torch.Tensor, H: int, W: int) -> dict[str, torch.Tensor]:
    """Decompose forward pixel matrices ``[B, 2, 3]`` into rotation, scale, shear, translation.

    The linear part is ``L = R(rotation) @ diag(scale_x, scale_y) @ [[1, shear], [0, 1]]``
    (``shear`` as :func:`invariscope.transforms.shear_x`: rows below the centre move
    right for > 0, applied first); ``rotation_deg`` is counter-clockwise as displayed (as
    :func:`invariscope.transforms.rotation`); scale factors > 1 magnify the content;
    ``scale_y < 0`` means a mirror. ``tx_px``, ``ty_px``: where the image centre moves
    (pixels, right / down). Returns ``{name: [B]}``.
    """
    L = pixel_matrix[:, :, :2]
    a, b, c, d = L[:, 0, 0], L[:, 0, 1], L[:, 1, 0], L[:, 1, 1]
    angle = torch.atan2(-c, a)  # counter-clockwise as displayed: R = [[cos, sin], [-sin, cos]]
    cos, sin = torch.cos(angle), torch.sin(angle)
    scale_x = torch.hypot(a, c)
    upper = cos * b - sin * d  # (R^T L)[0, 1] = scale_x * shear
    scale_y = sin * b + cos * d  # (R^T L)[1, 1]
    centre = pixel_matrix.new_tensor([(W - 1) / 2.0, (H - 1) / 2.0])
    moved = (L @ centre) + pixel_matrix[:, :, 2] - centre
    return {
        "rotation_deg": torch.rad2deg(angle),
        "scale_x": scale_x,
        "scale_y": scale_y,
        "shear": upper / scale_x,
        "tx_px": moved[:, 0],
        "ty_px": moved[:, 1],
    }


def decompose_colour(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summarise colour matrices ``[B, C, C + 1]``: ``contrast`` (mean of the diagonal of
    the linear part: 1 = unchanged), ``brightness`` (mean additive term, in ``[0, 1]``
    pixel units), ``mixing`` (root mean square of the off-diagonal terms: how much
    channels leak into each other; 0 for one channel). Returns ``{name: [B]}``."""
    C = matrix.shape[-2]
    linear = matrix[:, :, :C]
    diag = torch.diagonal(linear, dim1=-2, dim2=-1)
    off = linear - torch.diag_embed(diag)
    mixing = (
        (off**2).sum(dim=(-2, -1)).div(C * (C - 1)).sqrt()
        if C > 1
        else torch.zeros_like(diag[:, 0])
    )
    return {
        "contrast": diag.mean(dim=-1),
        "brightness": matrix[:, :, C].mean(dim=-1),
        "mixing": mixing,
    }


# ---------------------------------------------------------------------- the nets


class ControlNet(nn.Module):
    """Two fully connected layers with a ReLU: a control ``k`` ``[B]`` -> a matrix ``[B, *shape]``.

    ``Linear(1, hidden) -> ReLU -> Linear(hidden, prod(shape))``; the last layer starts
    with zero weights and the flattened ``identity`` as its bias, so the output is
    ``identity`` for every ``k`` until training moves it.
    """

    def __init__(self, identity: torch.Tensor, hidden: int = 32) -> None:
        super().__init__()
        self.shape = tuple(identity.shape)
        self.hidden = nn.Linear(1, hidden)
        self.out = nn.Linear(hidden, identity.numel())
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.copy_(identity.reshape(-1))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(k.reshape(-1, 1).to(self.hidden.weight)))
        return self.out(h).reshape(-1, *self.shape)


class InvariantTransformerNet(nn.Module):
    """The Invariant Transformer Net ``F(k1, k2)`` (Bunne et al. 2018, section III.D).

    Args:
        channels: image channels ``C`` (the colour matrix is ``[C, C + 1]``).
        hidden: width of each control net's hidden layer.
        controls: which transformation ``k1`` and ``k2`` drive: ``("spatial", "colour")``
            (default: ``k1`` spatial, as the paper's figures) or ``("colour", "spatial")``
            (as the paper's loss formula); see the module docstring.
        clamp: clamp the colour-transformed image to ``[0, 1]`` (default False: see the
            module docstring).
        padding_mode: what the warp reads outside the image (``"zeros"`` default).

    ``forward(images, k1, k2)`` returns the transformed images ``[B, C, H, W]`` (colour
    first, then the warp); ``k1``, ``k2`` are ``[B]`` (or scalars, broadcast) in ``[0, 1]``.

    >>> import torch
    >>> itn = InvariantTransformerNet(channels=1)
    >>> x = torch.rand(2, 1, 8, 8)
    >>> bool(torch.allclose(itn(x, torch.rand(2), torch.rand(2)), x, atol=1e-6))
    True
    """

    def __init__(
        self,
        channels: int,
        *,
        hidden: int = 32,
        controls: Sequence[str] = CONTROLS,
        clamp: bool = False,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        controls = tuple(controls)
        if sorted(controls) != sorted(CONTROLS):
            raise InvariscopeError(
                f"controls must name each of {', '.join(CONTROLS)} once (k1 first), got "
                f"{', '.join(map(str, controls)) or 'nothing'}"
            )
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise InvariscopeError(f"channels must be a positive integer, got {channels!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise InvariscopeError(f"hidden must be a positive integer, got {hidden!r}")
        check_warp_options("InvariantTransformerNet", "bilinear", padding_mode)
        self.channels, self.controls = channels, controls
        self.clamp, self.padding_mode = bool(clamp), padding_mode
        self.spatial = ControlNet(torch.eye(2, 3), hidden)
        self.colour = ControlNet(torch.eye(channels, channels + 1), hidden)

    def split(self, k1: torch.Tensor, k2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_spatial, k_colour)`` from ``(k1, k2)`` by the ``controls`` mapping."""
        return (k1, k2) if self.controls[0] == "spatial" else (k2, k1)

    def matrices(self, k1: torch.Tensor, k2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_theta [B, 2, 3], A_phi [B, C, C + 1])`` for controls ``k1``, ``k2`` ``[B]``."""
        k_spatial, k_colour = self.split(*_controls(k1, k2))
        return self.spatial(k_spatial), self.colour(k_colour)

    def transform(
        self, images: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor
    ) -> torch.Tensor:
        """Colour-transform ``images`` by ``phi``, then warp them by ``theta`` (normalised)."""
        H, W = images.shape[-2:]
        coloured = colour_transform(images, phi.to(images), clamp=self.clamp)
        return warp_affine(
            coloured, theta_to_pixel_matrix(theta.to(images), H, W), padding_mode=self.padding_mode
        )

    def forward(self, images: torch.Tensor, k1, k2) -> torch.Tensor:
        B = images.shape[0]
        k1, k2 = _controls(k1, k2, B, images.device)
        theta, phi = self.matrices(k1, k2)
        return self.transform(images, theta, phi)


def _controls(k1, k2, batch: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for k in (k1, k2):
        k = torch.as_tensor(k, dtype=torch.float32, device=device).reshape(-1)
        if batch is not None and k.numel() == 1:
            k = k.expand(batch)
        if not bool(torch.isfinite(k).all()):
            raise InvariscopeError("the controls k1, k2 must be finite numbers in [0, 1]")
        out.append(k)
    if out[0].shape != out[1].shape or (batch is not None and out[0].numel() != batch):
        raise InvariscopeError(
            f"k1 and k2 must be scalars or [B] with B = {batch}, got {out[0].numel()} and "
            f"{out[1].numel()} values"
        )
    return out[0], out[1]
