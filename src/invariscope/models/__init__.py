"""Models: registry, Classifier wrapper, built-in nets, loading, checkpoints, activations.

* :func:`register_model`, :func:`create_model`, :func:`list_models`, :func:`model_info`
  -- a timm-style registry (built-ins: ``simple-cnn``, ``small-vgg``, ``small-resnet``).
* :class:`Classifier` -- a network plus its preprocessing; takes ``[0, 1]`` images.
* :func:`load_model` -- checkpoints, registry names, ``module:factory``,
  ``torchvision:<name>``, ``timm:<name>`` with a local weights file; never downloads.
* :func:`save_checkpoint` / :func:`load_checkpoint` -- one atomic checkpoint format.
* :func:`check_class_names` -- a warning text when a model's class names and a
  dataset's differ.
* :func:`capture_activations` / :class:`ActivationCapture` -- layer outputs from one
  forward pass via hooks that are always removed.
* :func:`antialias` -- an anti-aliased copy of any network (``blurpool``: Zhang 2019;
  ``avgpool``: Azulay & Weiss 2019; ``aps``: Chaman & Dokmanic 2021), with
  :class:`BlurPool2d` and :class:`PolyphaseDown`.
"""

from invariscope.models import (
    nets,  # noqa: F401  (registers the built-in architectures)
    zoo,  # noqa: F401  (registers the zoo)
)
from invariscope.models.adapters import IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD
from invariscope.models.antialias import ANTIALIAS_METHODS, BlurPool2d, PolyphaseDown, antialias
from invariscope.models.capture import ActivationCapture, capture_activations
from invariscope.models.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from invariscope.models.classifier import Classifier, check_class_names, default_layer_names
from invariscope.models.isotropic import IsotropicConv2d  # noqa: F401  (registers isotropic-cnn)
from invariscope.models.loading import load_model
from invariscope.models.nets import BasicBlock, SimpleCNN, SmallResNet, SmallVGG
from invariscope.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "ANTIALIAS_METHODS",
    "ActivationCapture",
    "BasicBlock",
    "BlurPool2d",
    "Classifier",
    "FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ModelInfo",
    "PolyphaseDown",
    "SimpleCNN",
    "SmallResNet",
    "SmallVGG",
    "antialias",
    "capture_activations",
    "check_class_names",
    "create_model",
    "default_layer_names",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_info",
    "register_model",
    "save_checkpoint",
]
