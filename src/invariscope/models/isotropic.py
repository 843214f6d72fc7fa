"""Isotropic (rotation-invariant) convolutions and ``isotropic-cnn``.

Jansson et al. (2020) prove that a purely spatial transformation of CNN feature maps
cannot align the maps of a transformed image with those of the original, except for
translations or when the filters are themselves invariant to the transformation
(``lambda(x) = lambda(T x)``): a network built from rotation-invariant filters has
feature maps that are *rotation-covariant*, ``Gamma(R f) = R Gamma(f)``, up to the
resampling of the discrete grid. :class:`IsotropicConv2d` is such a filter bank.

Convention:
    Each filter ``lambda_{o,i}`` is radially symmetric: a radial profile with nodes at
    radii ``r = 0, 1, ..., N - 1`` pixels (``N = (kernel_size - 1) // 2 + 1``, the
    learnable values) and value 0 at ``r = N``, linearly interpolated in ``r`` and 0
    beyond ``N``. The discrete ``kernel_size x kernel_size`` kernel samples this
    continuous filter at the pixel centres, ``r = sqrt(dx^2 + dy^2)`` from the kernel's
    centre pixel. The continuous filter is invariant to every rotation; the discrete
    kernel is exactly invariant to the 8 symmetries of the square (quarter turns and
    mirrors), because ``r`` is. Odd kernel sizes only (the centre is a pixel).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.models.classifier import Classifier
from invariscope.models.registry import register_model

__all__ = ["IsotropicConv2d", "IsotropicCNN", "radial_kernel"]


def radial_kernel(profile: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The ``[..., k, k]`` kernels of radial profiles ``[..., N]`` (see the module docstring).

    Node ``n`` of the profile is the filter's value at radius ``n`` pixels; the value at
    radius ``N`` is 0; linear in ``r`` between nodes, 0 beyond ``N``.

    >>> import torch
    >>> k = radial_kernel(torch.tensor([2.0, 1.0]), 3)   # N = 2: r = 0 -> 2, 1 -> 1, 2 -> 0
    >>> k.tolist()[1]
    [1.0, 2.0, 1.0]
    >>> round(k[0, 0].item(), 4)   # the corner, r = sqrt(2): 1 - 0.4142 * 1
    0.5858
    """
    k = int(kernel_size)
    half = (k - 1) / 2.0
    coords = torch.arange(k, dtype=profile.dtype, device=profile.device) - half
    r = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)  # [k, k]
    nodes = torch.cat([profile, torch.zeros_like(profile[..., :1])], dim=-1)  # [..., N + 1]
    n = profile.shape[-1]
    r = r.clamp(max=float(n))
    lo = torch.floor(r).long().clamp(max=n - 1)
    frac = r - lo.to(r.dtype)
    values_lo = nodes[..., lo]  # [..., k, k]
    values_hi = nodes[..., lo + 1]
    return values_lo * (1 - frac) + values_hi * frac


class IsotropicConv2d(nn.Module):
    """A 2-D convolution whose every filter is radially symmetric (rotation-invariant).

    Parameters: ``profile`` ``[out_channels, in_channels, N]`` (the radial profiles,
    ``N = (kernel_size - 1) // 2 + 1``) and ``bias`` ``[out_channels]``. The kernel
    :attr:`weight` ``[out, in, k, k]`` is rebuilt from the profiles at each forward
    (:func:`radial_kernel`), so gradients reach the profiles.

    Shapes: ``[B, in, H, W]`` -> ``[B, out, (H + 2 p - k) // s + 1, (W + 2 p - k) // s + 1]``,
    as :class:`torch.nn.Conv2d` with the same ``stride``, ``padding`` (zeros).
    Attributes ``kernel_size``, ``stride``, ``padding``, ``dilation`` are tuples, as
    ``nn.Conv2d``'s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        k = int(kernel_size)
        if k < 1 or k % 2 == 0:
            raise InvariscopeError(
                f"IsotropicConv2d: kernel_size must be odd and >= 1 (a centre pixel), got {k}"
            )
        if int(stride) < 1 or int(padding) < 0:
            raise InvariscopeError(
                f"IsotropicConv2d: stride must be >= 1 and padding >= 0, got {stride}, {padding}"
            )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (k, k)
        self.stride = (int(stride), int(stride))
        self.padding = (int(padding), int(padding))
        self.dilation = (1, 1)
        n = (k - 1) // 2 + 1
        self.profile = nn.Parameter(torch.empty(self.out_channels, self.in_channels, n))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``+-1 / sqrt(fan_in)``, ``fan_in = in_channels * k * k``: the bound
        ``nn.Conv2d`` uses for its bias, here for the profile values too."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] ** 2)
        nn.init.uniform_(self.profile, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The discrete kernels ``[out, in, k, k]`` sampled from the radial profiles."""
        return radial_kernel(self.profile, self.kernel_size[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, radial nodes="
            f"{self.profile.shape[-1]}, bias={self.bias is not None}"
        )


class IsotropicCNN(nn.Sequential):
    """``simple-cnn``'s layout with isotropic convolutions.

    ``conv1`` isotropic 9x9 (64) -> ``pool1`` max 2 -> ``relu1`` -> ``conv2`` isotropic
    7x7 (64) -> ``pool2`` max 2 -> ``relu2`` -> ``flatten`` -> ``fc`` (linear); unpadded,
    so ``image_size`` 28 gives a 64 x 2 x 2 map before ``fc``. The max pools (2x2 windows
    on the square grid) are NOT rotation-covariant: only the convolutions are isotropic.

    Shapes: ``[B, in_channels, S, S]`` -> ``[B, num_classes]``, ``S >= 22``.
    """

    layer_names = ("conv1", "pool1", "relu1", "conv2", "pool2", "relu2", "fc")

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        for name, value, lo in (
            ("in_channels", in_channels, 1),
            ("image_size", image_size, 22),
            ("num_classes", num_classes, 1),
        ):
            if int(value) < lo:
                raise InvariscopeError(f"isotropic-cnn: {name} must be >= {lo}, got {value}")
        side = ((int(image_size) - 8) // 2 - 6) // 2
        super().__init__(
            OrderedDict(
                conv1=IsotropicConv2d(int(in_channels), 64, 9),
                pool1=nn.MaxPool2d(2),
                relu1=nn.ReLU(),
                conv2=IsotropicConv2d(64, 64, 7),
                pool2=nn.MaxPool2d(2),
                relu2=nn.ReLU(),
                flatten=nn.Flatten(),
                fc=nn.Linear(64 * side * side, int(num_classes)),
            )
        )


@register_model("isotropic-cnn", image_sizes=(28, 60, 112))
def isotropic_cnn(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> Classifier:
    """simple-cnn with isotropic (radially symmetric, rotation-invariant) convolutions."""
    net = IsotropicCNN(in_channels, image_size, num_classes)
    return Classifier(
        net,
        input_size=(int(in_channels), int(image_size), int(image_size)),
        mean=0.5,
        std=0.5,
        num_classes=int(num_classes),
    )
