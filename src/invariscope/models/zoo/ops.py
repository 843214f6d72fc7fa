"""Building blocks of the zoo, mirroring ``torchvision.ops.misc`` and friends.

Module trees, parameter names and forward semantics (including torchvision's in-place
activations) are those of torchvision >= 0.13, so that ``state_dict`` keys and layer
names agree: :class:`Conv2dNormActivation` (a ``Sequential`` of conv, norm, activation:
keys ``0.weight``, ``1.running_mean``, ...), :class:`SqueezeExcitation`,
:class:`Permute`, :class:`MLP`, :class:`StochasticDepth` and ConvNeXt's
:class:`LayerNorm2d`. Also the argument checks and the Classifier wrapping shared by
the zoo factories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.models.adapters import IMAGENET_MEAN, IMAGENET_STD
from invariscope.models.classifier import Classifier

__all__ = [
    "IMAGE_SIZES",
    "Conv2dNormActivation",
    "SqueezeExcitation",
    "Permute",
    "MLP",
    "StochasticDepth",
    "stochastic_depth",
    "LayerNorm2d",
    "make_divisible",
]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never below 90% of ``v`` (torchvision).

    >>> make_divisible(32 * 0.25), make_divisible(1280 * 1.0), make_divisible(24 * 1.4)
    (8, 1280, 32)
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """``Sequential(conv, norm, activation)`` as ``torchvision.ops.Conv2dNormActivation``.

    ``padding`` defaults to ``(kernel_size - 1) // 2 * dilation``; the conv has a bias
    only when there is no norm layer (unless ``bias`` says otherwise); ``norm_layer`` or
    ``activation_layer`` ``None`` leaves that module out; the activation is built with
    ``inplace=inplace`` (torchvision's default ``True``) unless ``inplace`` is ``None``.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, out_channels, H', W']``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
        dilation: int = 1,
        inplace: bool | None = True,
        bias: bool | None = None,
    ) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation=dilation,
                groups=groups,
                bias=bias,
            )
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as ``torchvision.ops.SqueezeExcitation``.

    ``scale = scale_activation(fc2(activation(fc1(avgpool(x)))))``, returns ``scale * x``;
    ``fc1`` / ``fc2`` are 1x1 convolutions with bias.

    Shapes: ``[B, C, H, W]`` -> ``[B, C, H, W]``.
    """

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale(x) * x


class Permute(nn.Module):
    """``torch.permute(x, dims)`` as a module (``torchvision.ops.Permute``)."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class MLP(nn.Sequential):
    """``torchvision.ops.MLP``: ``[Linear, (norm), activation, Dropout]`` per hidden layer,
    then ``Linear, Dropout``; children named ``"0", "1", ...``.

    Shapes: ``[..., in_channels]`` -> ``[..., hidden_channels[-1]]``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: Sequence[int],
        norm_layer: Callable[..., nn.Module] | None = None,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        inplace: bool | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        params = {} if inplace is None else {"inplace": inplace}
        layers: list[nn.Module] = []
        in_dim = in_channels
        for hidden_dim in hidden_channels[:-1]:
            layers.append(nn.Linear(in_dim, hidden_dim, bias=bias))
            if norm_layer is not None:
                layers.append(norm_layer(hidden_dim))
            layers.append(activation_layer(**params))
            layers.append(nn.Dropout(dropout, **params))
            in_dim = hidden_dim
        layers.append(nn.Linear(in_dim, hidden_channels[-1], bias=bias))
        layers.append(nn.Dropout(dropout, **params))
        super().__init__(*layers)


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """Drop whole residual branches (Huang et al. 2016), ``torchvision.ops.stochastic_depth``.

    ``mode="row"`` zeroes each sample's branch with probability ``p`` and scales the
    survivors by ``1 / (1 - p)``; ``"batch"`` drops the branch for the whole batch. At
    evaluation (``training=False``) or ``p == 0`` it returns ``x`` itself.
    """
    if p < 0.0 or p > 1.0:
        raise InvariscopeError(f"stochastic depth probability must be in [0, 1], got {p}")
    if mode not in ("batch", "row"):
        raise InvariscopeError(f"stochastic depth mode must be 'batch' or 'row', got {mode!r}")
    if not training or p == 0.0:
        return x
    survival_rate = 1.0 - p
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return x * noise


# a leaf for torch.fx (as torchvision): traced graphs call it instead of inlining it
torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    """:func:`stochastic_depth` as a module (``torchvision.ops.StochasticDepth``)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``[B, C, H, W]`` (torchvision's ConvNeXt).

    Permutes to channels-last, normalises the last dimension, permutes back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


#: The square sizes every zoo model registers as ``image_sizes`` (the registry-wide tests
#: build each registered model at each of them): the smallest size every family takes,
#: and the native ImageNet size of the defaults.
IMAGE_SIZES = (32, 224)


# ----------------------------------------------------------------- argument checks
def check_int(arch: str, name: str, value: object, lo: int) -> int:
    """``value`` as an int ``>= lo``, else a one-line InvariscopeError naming ``arch``."""
    try:
        out = int(value)  # type: ignore[call-overload]
        ok = out == value and out >= lo
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvariscopeError(f"{arch}: {name} must be an integer >= {lo}, got {value!r}")
    return out


def check_float(arch: str, name: str, value: object, lo: float, hi: float | None = None) -> float:
    """``value`` as a float in ``(lo, hi]`` (``> lo``; ``<= hi`` when given)."""
    try:
        out = float(value)  # type: ignore[arg-type]
        ok = out > lo and (hi is None or out <= hi)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        bound = f"> {lo}" if hi is None else f"in ({lo}, {hi}]"
        raise InvariscopeError(f"{arch}: {name} must be a number {bound}, got {value!r}")
    return out


def check_prob(arch: str, name: str, value: object) -> float:
    """``value`` as a probability in ``[0, 1)``."""
    try:
        out = float(value)  # type: ignore[arg-type]
        ok = 0.0 <= out < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvariscopeError(f"{arch}: {name} must be in [0, 1), got {value!r}")
    return out


def check_stages(arch: str, name: str, value: object, n: int) -> tuple[int, ...]:
    """``value`` as ``n`` integers >= 1 (blocks or layers per stage)."""
    try:
        out = tuple(int(v) for v in value)  # type: ignore[attr-defined]
        ok = len(out) == n and min(out) >= 1 and list(out) == list(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvariscopeError(
            f"{arch}: {name} must be {n} integers >= 1 (one per stage), got {value!r}"
        )
    return out


def check_image_size(arch: str, image_size: object, lo: int = 32) -> int:
    """``image_size`` as an int ``>= lo`` (the CNNs subsample by 32)."""
    return check_int(arch, "image_size", image_size, lo)


def scaled(channels: int, width: float) -> int:
    """``round(channels * width)``, at least 1."""
    return max(1, int(round(channels * width)))


def wrap(
    net: nn.Module,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    layer_names: Sequence[str],
) -> Classifier:
    """A zoo network in its Classifier: ImageNet mean/std (their averages for C != 3), and
    the 1000 ImageNet class names when it has 1000 outputs (so ImageNet-labelled data such
    as ``photos`` or a wnid folder is scored against the right outputs)."""
    if in_channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean = sum(IMAGENET_MEAN) / 3.0
        std = sum(IMAGENET_STD) / 3.0
    net.layer_names = tuple(n.removeprefix("net.") for n in layer_names)
    names = None
    if num_classes == 1000:  # an ImageNet-shaped head: its outputs are ImageNet's classes
        from invariscope.data.imagenet import imagenet_classes

        names = imagenet_classes()
    return Classifier(
        net,
        input_size=(in_channels, image_size, image_size),
        mean=mean,
        std=std,
        class_names=names,
        num_classes=num_classes,
        layer_names=list(layer_names),
    )
