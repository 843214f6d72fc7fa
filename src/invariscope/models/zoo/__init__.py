"""A model zoo: random-init mirrors of torchvision's classifiers, without torchvision.

Each architecture rebuilds torchvision's module tree, so ``state_dict`` keys and layer
names are exactly torchvision's (``layer1.0.relu``, ``features.3.block.1``,
``encoder.layers.encoder_layer_0.mlp``, ...) and a torchvision ``state_dict`` loads into
the default configuration. Forward semantics follow torchvision too: ResNet blocks use
ONE ``relu`` module two (BasicBlock) or three (Bottleneck) times per forward, ReLUs and
SiLUs are in place where torchvision's are, stochastic depth and dropout are identities
at evaluation, and ``torch.fx`` traces every forward. Defaults are the real architecture
(1000 classes, 224 px, parameter counts equal to torchvision's); ``width`` / depth
arguments shrink it. Checked against torchvision 0.29.1: identical ``state_dict`` keys
and shapes, module paths and class names, and bit-identical logits (evaluation, and
training with the same seed) once torchvision's ``state_dict`` is loaded, for the
defaults and for small configurations; ``tests/test_zoo_models.py`` pins digests of
torchvision's key lists and module trees.

>>> from invariscope.models import create_model
>>> from invariscope.models.zoo import SMALL_CONFIGS
>>> m = create_model("resnet18", image_size=32, num_classes=5, **SMALL_CONFIGS["resnet18"])
>>> m.layer_names[:3], m.input_size
(['net.maxpool', 'net.layer1.0', 'net.layer2.0'], (3, 32, 32))

Registered names (``create_model(name, **kwargs)`` returns a
:class:`~invariscope.models.Classifier` with ImageNet mean/std -- for
``in_channels != 3``, the average of the three -- and ``input_size = (in_channels,
image_size, image_size)``):

===============  ============  =============================  ===================================
name             family        mirrors (parameters)           small config (SMALL_CONFIGS)
===============  ============  =============================  ===================================
resnet18         ResNet        BasicBlock 2-2-2-2 (11.7 M)    width=0.25, layers=(1, 1, 1, 1)
resnet34         ResNet        BasicBlock 3-4-6-3 (21.8 M)    width=0.25, layers=(1, 1, 1, 1)
resnet50         ResNet        Bottleneck 3-4-6-3 (25.6 M)    width=0.125, layers=(1, 1, 1, 1)
mobilenet_v2     MobileNetV2   InvertedResidual x 17 (3.5 M)  width=0.25, depth=0.25
efficientnet_b0  EfficientNet  MBConv + SE x 16 (5.3 M)       width=0.25, depth=0.25
vgg11_bn         VGG           config A + BN (132.9 M)        width=0.125
vgg16_bn         VGG           config D + BN (138.4 M)        width=0.125, layers=(1, 1, 1, 1, 1)
convnext_tiny    ConvNeXt      CNBlock 3-3-9-3 (28.6 M)       width=0.25, layers=(1, 1, 1, 1)
vit_b_16         ViT           ViT-B/16: 12 x D 768 (86.6 M)  patch_size=8, num_layers=2,
                                                              num_heads=2, hidden_dim=64,
                                                              mlp_dim=128
===============  ============  =============================  ===================================

Common arguments: ``in_channels`` (3), ``image_size`` (224; CNNs take any size >= 32,
the ViT a multiple of ``patch_size``), ``num_classes`` (1000). CNN families take
``width`` (a channel multiplier; MobileNet / EfficientNet round to multiples of 8 as
torchvision's ``width_mult``), ResNet / VGG / ConvNeXt ``layers`` (blocks or convs per
stage), MobileNet / EfficientNet ``depth`` (blocks per stage ``ceil(n * depth)``), the
ViT torchvision's ``patch_size, num_layers, num_heads, hidden_dim, mlp_dim``.
:data:`SMALL_CONFIGS` holds, per name, a configuration that runs a 32 px forward in
milliseconds on a CPU (add ``image_size`` and ``num_classes``). Every zoo model is
registered with ``image_sizes=(32, 224)``.

Default probe-able ``layer_names`` (``net.`` prefixed; none runs more than once per
forward): ResNet ``maxpool`` (stem), every block ``layerK.i``, ``avgpool``, ``fc``;
MobileNetV2 every ``features.i`` and ``classifier.1``; EfficientNet every ``features.i``
(stem, seven stages, head conv), ``avgpool``, ``classifier.1``; VGG every ReLU and max
pool of ``features``, ``avgpool``, ``classifier.1/4/6``; ConvNeXt the stem, every block
``features.s.i``, the three downsampling layers, ``avgpool``, ``classifier.2``; ViT
``conv_proj``, every ``encoder.layers.encoder_layer_i``, ``encoder.ln``, ``heads.head``.

Deviations from torchvision: the ViT head is initialised randomly (torchvision zeroes
it, so its random-init logits are all 0); ``in_channels``, ``width`` and the depth
arguments are additions (their defaults reproduce torchvision); MobileNetV2 has no
``avgpool`` module (neither has torchvision's: it pools functionally).
"""

from __future__ import annotations

from typing import Any

from invariscope.models.zoo.convnext import CNBlock, ConvNeXt, convnext_tiny
from invariscope.models.zoo.mobilenet import (
    EfficientNet,
    InvertedResidual,
    MBConv,
    MobileNetV2,
    efficientnet_b0,
    mobilenet_v2,
)
from invariscope.models.zoo.ops import (
    MLP,
    Conv2dNormActivation,
    LayerNorm2d,
    Permute,
    SqueezeExcitation,
    StochasticDepth,
)
from invariscope.models.zoo.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
)
from invariscope.models.zoo.vgg import VGG, vgg11_bn, vgg16_bn
from invariscope.models.zoo.vit import EncoderBlock, VisionTransformer, vit_b_16

#: Per registry name, keyword arguments of a small, fast configuration of the same
#: family (same module tree, fewer channels and blocks); add ``image_size`` (32 or 64
#: work for all) and ``num_classes``.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet18": {"width": 0.25, "layers": (1, 1, 1, 1)},
    "resnet34": {"width": 0.25, "layers": (1, 1, 1, 1)},
    "resnet50": {"width": 0.125, "layers": (1, 1, 1, 1)},
    "mobilenet_v2": {"width": 0.25, "depth": 0.25},
    "efficientnet_b0": {"width": 0.25, "depth": 0.25},
    "vgg11_bn": {"width": 0.125},
    "vgg16_bn": {"width": 0.125, "layers": (1, 1, 1, 1, 1)},
    "convnext_tiny": {"width": 0.25, "layers": (1, 1, 1, 1)},
    "vit_b_16": {
        "patch_size": 8,
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 64,
        "mlp_dim": 128,
    },
}

__all__ = [
    "SMALL_CONFIGS",
    "BasicBlock",
    "Bottleneck",
    "CNBlock",
    "Conv2dNormActivation",
    "ConvNeXt",
    "EfficientNet",
    "EncoderBlock",
    "InvertedResidual",
    "LayerNorm2d",
    "MBConv",
    "MLP",
    "MobileNetV2",
    "Permute",
    "ResNet",
    "SqueezeExcitation",
    "StochasticDepth",
    "VGG",
    "VisionTransformer",
    "convnext_tiny",
    "efficientnet_b0",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11_bn",
    "vgg16_bn",
    "vit_b_16",
]
