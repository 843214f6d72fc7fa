"""ResNet (He et al. 2016) with torchvision's module tree: ``resnet18/34/50``.

``conv1`` 7x7/2 -> ``bn1`` -> ``relu`` -> ``maxpool`` 3x3/2 -> ``layer1 .. layer4`` ->
``avgpool`` -> flatten -> ``fc``, as ``torchvision.models.ResNet``; ``layerK.i`` is a
:class:`BasicBlock` or :class:`Bottleneck` whose single ``relu`` module (in-place, as
torchvision's) runs two / three times per forward, and whose ``downsample`` is
``Sequential(conv1x1, BatchNorm2d)`` when the shape changes, else ``None``. Weights are
initialised as torchvision does (Kaiming-normal fan-out convs, unit BatchNorms).
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
    check_stages,
    scaled,
    wrap,
)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1 x)))) + downsample(x))``; one ``relu`` used twice.

    Shapes: ``[B, inplanes, H, W]`` -> ``[B, planes, ceil(H / stride), ceil(W / stride)]``.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision's "ResNet v1.5") -> 1x1 (x4), one ``relu``
    used three times.

    Shapes: ``[B, inplanes, H, W]`` -> ``[B, 4 planes, ceil(H / stride), ceil(W / stride)]``.
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """``torchvision.models.ResNet`` (groups 1, no dilation) with a channel multiplier.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks in ``layer1 .. layer4``.
        num_classes: outputs of ``fc``.
        in_channels: input channels of ``conv1``.
        width: multiplies the stage widths 64, 128, 256, 512 (rounded, at least 1).
        zero_init_residual: zero the last BN scale of each residual branch.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, num_classes]``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_layer_names(net: ResNet) -> list[str]:
    """Stem output, every residual block, pooled features, logits (``net.`` prefixed)."""
    names = ["net.maxpool"]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        names += [f"net.{stage}.{i}" for i in range(len(getattr(net, stage)))]
    return names + ["net.avgpool", "net.fc"]


def _build(
    arch: str,
    block: type[BasicBlock] | type[Bottleneck],
    layers: Sequence[int],
    in_channels: int,
    image_size: int,
    num_classes: int,
    width: float,
) -> Classifier:
    layers = check_stages(arch, "layers", layers, 4)
    in_channels = check_int(arch, "in_channels", in_channels, 1)
    image_size = check_image_size(arch, image_size)
    num_classes = check_int(arch, "num_classes", num_classes, 1)
    width = check_float(arch, "width", width, 0.0)
    net = ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, width=width)
    return wrap(
        net,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        layer_names=resnet_layer_names(net),
    )


@register_model("resnet18", image_sizes=IMAGE_SIZES)
def resnet18(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    layers: Sequence[int] = (2, 2, 2, 2),
) -> Classifier:
    """ResNet-18 as torchvision's (BasicBlock, layers 2-2-2-2, 11.7 M parameters)."""
    return _build("resnet18", BasicBlock, layers, in_channels, image_size, num_classes, width)


@register_model("resnet34", image_sizes=IMAGE_SIZES)
def resnet34(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    layers: Sequence[int] = (3, 4, 6, 3),
) -> Classifier:
    """ResNet-34 as torchvision's (BasicBlock, layers 3-4-6-3, 21.8 M parameters)."""
    return _build("resnet34", BasicBlock, layers, in_channels, image_size, num_classes, width)


@register_model("resnet50", image_sizes=IMAGE_SIZES)
def resnet50(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    layers: Sequence[int] = (3, 4, 6, 3),
) -> Classifier:
    """ResNet-50 as torchvision's (Bottleneck v1.5, layers 3-4-6-3, 25.6 M parameters)."""
    return _build("resnet50", Bottleneck, layers, in_channels, image_size, num_classes, width)
