"""Built-in architectures: ``simple-cnn``, ``small-vgg``, ``small-resnet``.

Each network is an ``nn.Sequential`` subclass with named stages, so later variants can
cut it at a depth (a spatial transformer before ``conv2`` is ``net[:3]``, STN, ``net[3:]``
in Finnveden et al.'s STN-C1) or swap a pooling layer for an anti-aliased one by name.
Each declares its probe-able ``layer_names`` (relative to the network; the Classifier
lists them as ``net.<name>``).

Preprocessing: all built-ins normalise with mean 0.5 and std 0.5 per channel, so the
network sees ``2x - 1`` in ``[-1, 1]``. The built-in datasets are generated, so dataset
statistics such as MNIST's (0.1307, 0.3081) would not describe them; pass
``mean=``/``std=`` to ``create_model`` to use others.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.models.classifier import Classifier
from invariscope.models.registry import register_model

__all__ = ["SimpleCNN", "SmallVGG", "SmallResNet", "BasicBlock"]


def _check(name: str, value: int, lo: int, what: str) -> int:
    value = int(value)
    if value < lo:
        raise InvariscopeError(f"{name}: {what} must be >= {lo}, got {value}")
    return value


class SimpleCNN(nn.Sequential):
    """The classification network of Finnveden et al. (2020) for MNIST-like digits.

    ``conv1`` 9x9 (64) -> ``pool1`` max 2 -> ``relu1`` -> ``conv2`` 7x7 (64) -> ``pool2``
    max 2 -> ``relu2`` -> ``flatten`` -> ``fc`` (linear). Convolutions are unpadded, so
    the linear layer's size follows from ``image_size``: 28 -> 64*2*2, 60 -> 64*10*10,
    112 -> 64*23*23.

    ``width`` (default 64) is the number of channels of both convolutions; the paper keeps
    its networks deliberately small (50-70 thousand parameters with the localisation net
    on the 28 and 60 px sets) so that the classifier cannot learn the perturbations alone.

    Shapes: ``[B, in_channels, S, S]`` -> ``[B, num_classes]``, ``S >= 22``.
    """

    layer_names = ("conv1", "pool1", "relu1", "conv2", "pool2", "relu2", "fc")

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 64
    ):
        width = _check("simple-cnn", width, 1, "width")
        in_channels = _check("simple-cnn", in_channels, 1, "in_channels")
        image_size = _check("simple-cnn", image_size, 22, "image_size")
        num_classes = _check("simple-cnn", num_classes, 1, "num_classes")
        side = ((image_size - 8) // 2 - 6) // 2
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, width, kernel_size=9),
                pool1=nn.MaxPool2d(2),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(width, width, kernel_size=7),
                pool2=nn.MaxPool2d(2),
                relu2=nn.ReLU(),
                flatten=nn.Flatten(),
                fc=nn.Linear(width * side * side, num_classes),
            )
        )


class SmallVGG(nn.Sequential):
    """A small VGG: three stages of two 3x3 conv-BN-ReLU and a 2x2 max pool.

    Widths ``width, 2 width, 4 width``; global average pooling (``gap``) before the
    linear classifier ``fc``, so any ``image_size >= 8`` works (32 and 64 are tested).
    Layers named ``conv<s>_<i>, bn<s>_<i>, relu<s>_<i>, pool<s>, gap, flatten, fc``;
    ``layer_names`` lists all but the BatchNorms and ``flatten``.

    Shapes: ``[B, in_channels, S, S]`` -> ``[B, num_classes]``.
    """

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 32
    ):
        in_channels = _check("small-vgg", in_channels, 1, "in_channels")
        _check("small-vgg", image_size, 8, "image_size")
        num_classes = _check("small-vgg", num_classes, 1, "num_classes")
        width = _check("small-vgg", width, 1, "width")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        names: list[str] = []
        c_in = in_channels
        for s, c_out in enumerate((width, 2 * width, 4 * width), start=1):
            for i in (1, 2):
                layers[f"conv{s}_{i}"] = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
                layers[f"bn{s}_{i}"] = nn.BatchNorm2d(c_out)
                layers[f"relu{s}_{i}"] = nn.ReLU()
                names += [f"conv{s}_{i}", f"relu{s}_{i}"]
                c_in = c_out
            layers[f"pool{s}"] = nn.MaxPool2d(2)
            names.append(f"pool{s}")
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(c_in, num_classes)
        super().__init__(layers)
        self.layer_names = tuple(names + ["gap", "fc"])


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu2(bn2(conv2(relu1(bn1(conv1 x)))) + shortcut x)``.

    The shortcut is the identity, or a strided 1x1 conv + BN when the shape changes.
    Each ReLU is its own module, so a forward hook on any layer fires once per pass.

    Shapes: ``[B, c_in, H, W]`` -> ``[B, c_out, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Sequential):
    """A small ResNet for 32/64 px images (CIFAR-style, three stages).

    ``conv1`` 3x3 (width) -> ``bn1`` -> ``relu1`` -> ``layer1`` (stride 1, width) ->
    ``layer2`` (stride 2, 2 width) -> ``layer3`` (stride 2, 4 width) -> ``gap`` ->
    ``flatten`` -> ``fc``; each stage holds ``blocks`` :class:`BasicBlock` s
    (``layer2.0.conv1`` etc. are reachable by path). Any ``image_size >= 8`` works.

    Shapes: ``[B, in_channels, S, S]`` -> ``[B, num_classes]``.
    """

    layer_names = ("conv1", "relu1", "layer1", "layer2", "layer3", "gap", "fc")

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width: int = 32,
        blocks: int = 1,
    ):
        in_channels = _check("small-resnet", in_channels, 1, "in_channels")
        _check("small-resnet", image_size, 8, "image_size")
        num_classes = _check("small-resnet", num_classes, 1, "num_classes")
        width = _check("small-resnet", width, 1, "width")
        blocks = _check("small-resnet", blocks, 1, "blocks")

        def stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                BasicBlock(c_in, c_out, stride),
                *(BasicBlock(c_out, c_out) for _ in range(blocks - 1)),
            )

        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                bn1=nn.BatchNorm2d(width),
                relu1=nn.ReLU(),
                layer1=stage(width, width, 1),
                layer2=stage(width, 2 * width, 2),
                layer3=stage(2 * width, 4 * width, 2),
                gap=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                fc=nn.Linear(4 * width, num_classes),
            )
        )


_MEAN_STD = 0.5  # see the module docstring


def _wrap(net: nn.Module, in_channels: int, image_size: int, num_classes: int) -> Classifier:
    """A built-in net in its Classifier: square input, mean/std 0.5 per channel."""
    return Classifier(
        net,
        input_size=(in_channels, image_size, image_size),
        mean=_MEAN_STD,
        std=_MEAN_STD,
        num_classes=num_classes,
    )


@register_model("simple-cnn", image_sizes=(28, 60, 112))
def simple_cnn(
    in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 64
) -> Classifier:
    """Finnveden et al.'s MNIST CNN: conv9x9(w)-pool-relu-conv7x7(w)-pool-relu-linear, w=64."""
    net = SimpleCNN(in_channels, image_size, num_classes, width)
    return _wrap(net, in_channels, image_size, num_classes)


@register_model("small-vgg", image_sizes=(32, 64))
def small_vgg(
    in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 32
) -> Classifier:
    """Small VGG (3 stages of 2 conv3x3-BN-ReLU + max pool, global average pool, linear)."""
    net = SmallVGG(in_channels, image_size, num_classes, width)
    return _wrap(net, in_channels, image_size, num_classes)


@register_model("small-resnet", image_sizes=(32, 64))
def small_resnet(
    in_channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    width: int = 32,
    blocks: int = 1,
) -> Classifier:
    """Small ResNet (conv3x3 stem, 3 stages of basic blocks, global average pool, linear)."""
    net = SmallResNet(in_channels, image_size, num_classes, width, blocks)
    return _wrap(net, in_channels, image_size, num_classes)
