"""MobileNetV2 (Sandler et al. 2018) and EfficientNet-B0 (Tan & Le 2019), torchvision's trees.

``mobilenet_v2``: ``features`` = ``Sequential(Conv2dNormActivation 3x3/2 (ReLU6),
InvertedResidual x 17, Conv2dNormActivation 1x1 -> 1280)``, functional global average
pool, ``classifier`` = ``Sequential(Dropout, Linear)``. Each :class:`InvertedResidual`
holds ``conv`` = ``Sequential([expand Conv2dNormActivation 1x1,] depthwise
Conv2dNormActivation 3x3, Conv2d 1x1, BatchNorm2d)`` and adds its input when
``use_res_connect``.

``efficientnet_b0``: ``features`` = ``Sequential(stem Conv2dNormActivation 3x3/2 (SiLU),
7 stages of MBConv, Conv2dNormActivation 1x1 -> 4 x last)``, ``avgpool``,
``classifier`` = ``Sequential(Dropout, Linear)``. Each :class:`MBConv` holds ``block`` =
``Sequential([expand,] depthwise, SqueezeExcitation, project)`` and a
``stochastic_depth`` (probability rising linearly from 0 to 0.2 over the blocks;
identity at evaluation) on its residual branch.

Activations are in-place where torchvision's are (every Conv2dNormActivation
activation, the classifier dropout of EfficientNet); initialisation as torchvision.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
from torch import nn

from invariscope.models.classifier import Classifier
from invariscope.models.registry import register_model
from invariscope.models.zoo.ops import (
    IMAGE_SIZES,
    Conv2dNormActivation,
    SqueezeExcitation,
    StochasticDepth,
    check_float,
    check_image_size,
    check_int,
    check_prob,
    make_divisible,
    wrap,
)

__all__ = [
    "InvertedResidual",
    "MobileNetV2",
    "MBConvConfig",
    "MBConv",
    "EfficientNet",
    "mobilenet_v2",
    "efficientnet_b0",
]


# ------------------------------------------------------------------------ MobileNetV2
class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 (ReLU6), depthwise 3x3 (ReLU6), linear project 1x1.

    Shapes: ``[B, inp, H, W]`` -> ``[B, oup, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(
                Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6)
            )
        layers += [
            Conv2dNormActivation(
                hidden_dim,
                hidden_dim,
                stride=stride,
                groups=hidden_dim,
                activation_layer=nn.ReLU6,
            ),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


#: MobileNetV2's stages: expansion t, channels c, blocks n, first stride s.
MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """``torchvision.models.MobileNetV2`` plus ``in_channels`` and a depth multiplier.

    Args:
        num_classes: outputs.
        width_mult: channel multiplier (channels rounded to multiples of ``round_nearest``;
            the last conv keeps 1280 channels for ``width_mult < 1``, as torchvision).
        depth_mult: blocks per stage ``ceil(n * depth_mult)`` (1.0: 1-2-3-4-3-3-1).
        dropout: classifier dropout probability.
        in_channels: input channels of the stem.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [
            Conv2dNormActivation(in_channels, input_channel, stride=2, activation_layer=nn.ReLU6)
        ]
        for t, c, n, s in MOBILENET_V2_SETTING:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(int(math.ceil(n * depth_mult))):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
        features.append(
            Conv2dNormActivation(
                input_channel, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6
            )
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("mobilenet_v2", image_sizes=IMAGE_SIZES)
def mobilenet_v2(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    depth: float = 1.0,
    dropout: float = 0.2,
) -> Classifier:
    """MobileNetV2 as torchvision's (inverted residuals, ReLU6, 3.5 M parameters)."""
    arch = "mobilenet_v2"
    in_channels = check_int(arch, "in_channels", in_channels, 1)
    image_size = check_image_size(arch, image_size)
    num_classes = check_int(arch, "num_classes", num_classes, 1)
    width = check_float(arch, "width", width, 0.0)
    depth = check_float(arch, "depth", depth, 0.0)
    dropout = check_prob(arch, "dropout", dropout)
    net = MobileNetV2(num_classes, width, depth, dropout=dropout, in_channels=in_channels)
    names = [f"net.features.{i}" for i in range(len(net.features))] + ["net.classifier.1"]
    return wrap(
        net,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        layer_names=names,
    )


# ----------------------------------------------------------------------- EfficientNet
class MBConvConfig:
    """One EfficientNet stage: expansion, kernel, stride, in/out channels, blocks.

    Channels are scaled by ``width_mult`` (multiples of 8) and blocks by ``depth_mult``
    (``ceil``), as torchvision's ``MBConvConfig``.
    """

    def __init__(
        self,
        expand_ratio: float,
        kernel: int,
        stride: int,
        input_channels: int,
        out_channels: int,
        num_layers: int,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
    ) -> None:
        self.expand_ratio = expand_ratio
        self.kernel = kernel
        self.stride = stride
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.num_layers = int(math.ceil(num_layers * depth_mult))

    @staticmethod
    def adjust_channels(channels: float, width_mult: float, min_value: int | None = None) -> int:
        """``make_divisible(channels * width_mult, 8, min_value)``."""
        return make_divisible(channels * width_mult, 8, min_value)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (SiLU), torchvision's ``MBConv``.

    ``block`` = ``[expand 1x1,] depthwise kxk/stride, SqueezeExcitation (squeeze to
    ``max(1, in // 4)``), project 1x1 (no activation)``; when stride 1 and in == out the
    output is ``stochastic_depth(block(x)) + x``.

    Shapes: ``[B, in, H, W]`` -> ``[B, out, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, cnf: MBConvConfig, stochastic_depth_prob: float) -> None:
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        expanded = cnf.adjust_channels(cnf.input_channels, cnf.expand_ratio)
        if expanded != cnf.input_channels:
            layers.append(
                Conv2dNormActivation(
                    cnf.input_channels, expanded, kernel_size=1, activation_layer=nn.SiLU
                )
            )
        layers.append(
            Conv2dNormActivation(
                expanded,
                expanded,
                kernel_size=cnf.kernel,
                stride=cnf.stride,
                groups=expanded,
                activation_layer=nn.SiLU,
            )
        )
        squeeze = max(1, cnf.input_channels // 4)
        layers.append(
            SqueezeExcitation(expanded, squeeze, activation=partial(nn.SiLU, inplace=True))
        )
        layers.append(
            Conv2dNormActivation(expanded, cnf.out_channels, kernel_size=1, activation_layer=None)
        )
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


#: EfficientNet-B0's stages: expansion, kernel, stride, in, out, blocks.
EFFICIENTNET_B0_SETTING = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class EfficientNet(nn.Module):
    """``torchvision.models.EfficientNet`` for the B0 stage table, with multipliers.

    Args:
        width_mult, depth_mult: EfficientNet's compound-scaling multipliers (B0: 1, 1).
        dropout: classifier dropout probability (B0: 0.2).
        stochastic_depth_prob: drop probability of the last block (0.2).
        num_classes: outputs.
        in_channels: input channels of the stem.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, num_classes]``.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        setting = [
            MBConvConfig(*row, width_mult=width_mult, depth_mult=depth_mult)
            for row in EFFICIENTNET_B0_SETTING
        ]
        first = setting[0].input_channels
        layers: list[nn.Module] = [
            Conv2dNormActivation(
                in_channels, first, kernel_size=3, stride=2, activation_layer=nn.SiLU
            )
        ]
        total = sum(cnf.num_layers for cnf in setting)
        block_id = 0
        for cnf in setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = copy.copy(cnf)
                if stage:
                    block_cnf.input_channels = block_cnf.out_channels
                    block_cnf.stride = 1
                sd_prob = stochastic_depth_prob * float(block_id) / total
                stage.append(MBConv(block_cnf, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = setting[-1].out_channels
        last_out = 4 * last_in
        layers.append(
            Conv2dNormActivation(last_in, last_out, kernel_size=1, activation_layer=nn.SiLU)
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True), nn.Linear(last_out, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("efficientnet_b0", image_sizes=IMAGE_SIZES)
def efficientnet_b0(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    depth: float = 1.0,
    dropout: float = 0.2,
    stochastic_depth_prob: float = 0.2,
) -> Classifier:
    """EfficientNet-B0 as torchvision's (MBConv + squeeze-excitation, SiLU, 5.3 M parameters)."""
    arch = "efficientnet_b0"
    in_channels = check_int(arch, "in_channels", in_channels, 1)
    image_size = check_image_size(arch, image_size)
    num_classes = check_int(arch, "num_classes", num_classes, 1)
    width = check_float(arch, "width", width, 0.0)
    depth = check_float(arch, "depth", depth, 0.0)
    dropout = check_prob(arch, "dropout", dropout)
    sd = check_prob(arch, "stochastic_depth_prob", stochastic_depth_prob)
    net = EfficientNet(width, depth, dropout, sd, num_classes, in_channels)
    names = [f"net.features.{i}" for i in range(len(net.features))]
    return wrap(
        net,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        layer_names=names + ["net.avgpool", "net.classifier.1"],
    )
