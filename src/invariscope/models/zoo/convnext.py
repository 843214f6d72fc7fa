"""ConvNeXt (Liu et al. 2022) with torchvision's module tree: ``convnext_tiny``.

``features`` = ``Sequential(stem, stage1, down1, stage2, down2, stage3, down3, stage4)``:
the stem is a ``Conv2dNormActivation`` (4x4 conv, stride 4, bias, then
:class:`~invariscope.models.zoo.ops.LayerNorm2d`, no activation); each stage a
``Sequential`` of :class:`CNBlock`; each ``down`` = ``Sequential(LayerNorm2d, Conv2d 2x2
stride 2)``. Then ``avgpool`` and ``classifier`` = ``Sequential(LayerNorm2d, Flatten,
Linear)``. A :class:`CNBlock` holds ``block`` = ``Sequential(Conv2d 7x7 depthwise,
Permute([0, 2, 3, 1]), LayerNorm, Linear(4x), GELU, Linear, Permute([0, 3, 1, 2]))``, a
``layer_scale`` parameter ``[C, 1, 1]`` (1e-6) and a ``stochastic_depth`` module
(probability rising linearly to 0.1 over the blocks; identity at evaluation).
Initialisation as torchvision (truncated normal, std 0.02, for convs and linears).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from invariscope.models.classifier import Classifier
from invariscope.models.registry import register_model
from invariscope.models.zoo.ops import (
    IMAGE_SIZES,
    Conv2dNormActivation,
    LayerNorm2d,
    Permute,
    StochasticDepth,
    check_float,
    check_image_size,
    check_int,
    check_prob,
    check_stages,
    scaled,
    wrap,
)

__all__ = ["CNBlock", "ConvNeXt", "convnext_tiny"]


class CNBlock(nn.Module):
    """ConvNeXt block: ``x + stochastic_depth(layer_scale * block(x))``.

    Shapes: ``[B, dim, H, W]`` -> ``[B, dim, H, W]``.
    """

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class ConvNeXt(nn.Module):
    """``torchvision.models.ConvNeXt`` with explicit stage widths and depths.

    Args:
        dims: channels of the four stages (tiny: 96, 192, 384, 768).
        layers: blocks per stage (tiny: 3, 3, 9, 3).
        stochastic_depth_prob: drop probability of the last block (tiny: 0.1).
        layer_scale: initial value of every ``layer_scale`` entry.
        num_classes: outputs.
        in_channels: input channels of the stem.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, num_classes]``, ``H, W >= 32``.
    """

    def __init__(
        self,
        dims: Sequence[int] = (96, 192, 384, 768),
        layers: Sequence[int] = (3, 3, 9, 3),
        stochastic_depth_prob: float = 0.1,
        layer_scale: float = 1e-6,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        norm_layer = partial(LayerNorm2d, eps=1e-6)
        modules: list[nn.Module] = [
            Conv2dNormActivation(
                in_channels,
                dims[0],
                kernel_size=4,
                stride=4,
                padding=0,
                norm_layer=norm_layer,
                activation_layer=None,
                bias=True,
            )
        ]
        total = sum(layers)
        block_id = 0
        for s, (dim, n) in enumerate(zip(dims, layers, strict=True)):
            stage = []
            for _ in range(n):
                # torchvision divides by (total - 1); one block in all gets probability 0
                sd_prob = stochastic_depth_prob * block_id / max(total - 1.0, 1.0)
                stage.append(CNBlock(dim, layer_scale, sd_prob))
                block_id += 1
            modules.append(nn.Sequential(*stage))
            if s + 1 < len(dims):
                modules.append(
                    nn.Sequential(
                        norm_layer(dim), nn.Conv2d(dim, dims[s + 1], kernel_size=2, stride=2)
                    )
                )
        self.features = nn.Sequential(*modules)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            norm_layer(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(x)


def convnext_layer_names(net: ConvNeXt) -> list[str]:
    """Stem, every block, every downsampling layer, pooled features, logits."""
    names = []
    for i, m in enumerate(net.features):
        if isinstance(m, nn.Sequential) and all(isinstance(b, CNBlock) for b in m):
            names += [f"net.features.{i}.{j}" for j in range(len(m))]
        else:
            names.append(f"net.features.{i}")
    return names + ["net.avgpool", "net.classifier.2"]


@register_model("convnext_tiny", image_sizes=IMAGE_SIZES)
def convnext_tiny(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    layers: Sequence[int] = (3, 3, 9, 3),
    stochastic_depth_prob: float = 0.1,
) -> Classifier:
    """ConvNeXt-T as torchvision's (widths 96-192-384-768, blocks 3-3-9-3, 28.6 M parameters)."""
    arch = "convnext_tiny"
    layers = check_stages(arch, "layers", layers, 4)
    in_channels = check_int(arch, "in_channels", in_channels, 1)
    image_size = check_image_size(arch, image_size)
    num_classes = check_int(arch, "num_classes", num_classes, 1)
    width = check_float(arch, "width", width, 0.0)
    sd = check_prob(arch, "stochastic_depth_prob", stochastic_depth_prob)
    dims = tuple(scaled(c, width) for c in (96, 192, 384, 768))
    net = ConvNeXt(dims, layers, sd, num_classes=num_classes, in_channels=in_channels)
    return wrap(
        net,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        layer_names=convnext_layer_names(net),
    )
