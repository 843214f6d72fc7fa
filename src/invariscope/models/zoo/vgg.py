"""VGG with BatchNorm (Simonyan & Zisserman 2015) with torchvision's tree: ``vgg11_bn``, ``vgg16_bn``.

``features`` = ``Sequential`` of ``Conv2d 3x3 (bias), BatchNorm2d, ReLU(inplace)`` triples
with a ``MaxPool2d(2, 2)`` closing each of the five stages (torchvision's
``make_layers(cfg, batch_norm=True)``, so indices such as ``features.3`` match), then
``avgpool`` = ``AdaptiveAvgPool2d((7, 7))``, flatten, ``classifier`` =
``Sequential(Linear(512*7*7, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout,
Linear(4096, num_classes))``. Initialisation as torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from invariscope.models.classifier import Classifier
from invariscope.models.registry import register_model
from invariscope.models.zoo.ops import (
    IMAGE_SIZES,
    check_float,
    check_image_size,
    check_int,
    check_prob,
    check_stages,
    scaled,
    wrap,
)

__all__ = ["VGG", "make_layers", "vgg11_bn", "vgg16_bn"]

_STAGE_WIDTHS = (64, 128, 256, 512, 512)


def make_layers(
    layers: Sequence[int], width: float = 1.0, in_channels: int = 3
) -> tuple[nn.Sequential, int]:
    """VGG's ``features``: ``layers[s]`` conv-BN-ReLU triples then a max pool per stage.

    Returns the ``Sequential`` and its output channels. ``layers=(1, 1, 2, 2, 2)`` is
    torchvision's configuration "A" (VGG-11), ``(2, 2, 3, 3, 3)`` "D" (VGG-16).
    """
    modules: list[nn.Module] = []
    c_in = in_channels
    for n, c in zip(layers, _STAGE_WIDTHS, strict=True):
        c_out = scaled(c, width)
        for _ in range(n):
            modules += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*modules), c_in


class VGG(nn.Module):
    """``torchvision.models.VGG`` with BatchNorm, a channel multiplier and ``in_channels``.

    Args:
        layers: convolutions in each of the five stages.
        num_classes: outputs.
        width: multiplies the conv widths 64-128-256-512-512 and the classifier's 4096.
        dropout: classifier dropout probability.
        in_channels: input channels.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, num_classes]``, ``H, W >= 32``.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        width: float = 1.0,
        dropout: float = 0.5,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.features, c = make_layers(layers, width, in_channels)
        hidden = scaled(4096, width)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(c * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg_layer_names(net: VGG) -> list[str]:
    """Every ReLU and max pool of ``features``, ``avgpool``, the classifier ReLUs, logits."""
    names = [
        f"net.features.{i}"
        for i, m in enumerate(net.features)
        if isinstance(m, nn.ReLU | nn.MaxPool2d)
    ]
    return names + ["net.avgpool", "net.classifier.1", "net.classifier.4", "net.classifier.6"]


def _build(
    arch: str,
    layers: Sequence[int],
    in_channels: int,
    image_size: int,
    num_classes: int,
    width: float,
    dropout: float,
) -> Classifier:
    layers = check_stages(arch, "layers", layers, 5)
    in_channels = check_int(arch, "in_channels", in_channels, 1)
    image_size = check_image_size(arch, image_size)
    num_classes = check_int(arch, "num_classes", num_classes, 1)
    width = check_float(arch, "width", width, 0.0)
    dropout = check_prob(arch, "dropout", dropout)
    net = VGG(layers, num_classes, width, dropout, in_channels)
    return wrap(
        net,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        layer_names=vgg_layer_names(net),
    )


@register_model("vgg11_bn", image_sizes=IMAGE_SIZES)
def vgg11_bn(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    layers: Sequence[int] = (1, 1, 2, 2, 2),
    dropout: float = 0.5,
) -> Classifier:
    """VGG-11 with BatchNorm as torchvision's (configuration A, 132.9 M parameters)."""
    return _build("vgg11_bn", layers, in_channels, image_size, num_classes, width, dropout)


@register_model("vgg16_bn", image_sizes=IMAGE_SIZES)
def vgg16_bn(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    layers: Sequence[int] = (2, 2, 3, 3, 3),
    dropout: float = 0.5,
) -> Classifier:
    """VGG-16 with BatchNorm as torchvision's (configuration D, 138.4 M parameters)."""
    return _build("vgg16_bn", layers, in_channels, image_size, num_classes, width, dropout)
