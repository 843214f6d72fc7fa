"""``load_model``: one entry point for every model a user can bring.

=====================================  =============================================
spec                                   what is loaded
=====================================  =============================================
``path/to/model.pt`` (existing file)   an invariscope checkpoint (or a TorchScript
                                       file, wrapped; it cannot take layer hooks)
``simple-cnn`` (registry name)         the built-in net, fresh or with ``weights``
``package.module:factory``             ``factory(**model_kwargs)``; a plain network
                                       is wrapped with default preprocessing
``torchvision:<name>``                 built with ``weights=None``; random weights
                                       (with a warning) unless ``weights`` is given
``timm:<name>``                        built with ``pretrained=False``; the same
=====================================  =============================================

Registry names include the pretrained models of :mod:`invariscope.models.pretrained`
(``efficientnet-lite0``), whose weights ship inside an optional package (the extra
``pretrained``); they too are read from disk, never downloaded.

Nothing is ever downloaded. ``weights`` may be a state_dict, a checkpoint dict with
one under ``state_dict``/``model``/``model_state_dict``, an invariscope checkpoint, or
a TorchScript file (its parameters are loaded into the built network). See
:mod:`invariscope.models.adapters` for the default preprocessing of wrapped networks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from invariscope.errors import InvariscopeError, hint, unknown_name, warn
from invariscope.models import pretrained  # noqa: F401  (registers the pretrained models)
from invariscope.models.adapters import (
    _accepts,
    _import_factory,
    arch_kind,
    as_classifier,
    build_net,
    is_torchscript,
    load_state,
    read_weights,
)
from invariscope.models.checkpoint import load_checkpoint
from invariscope.models.classifier import Classifier
from invariscope.models.registry import list_models

__all__ = ["load_model"]

_WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".ts", ".pth.tar", ".tar")


def load_model(
    spec: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    input_size: Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    resize: bool | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Classifier:
    """Load the model named by ``spec`` (see the module docstring), in eval mode on CPU.

    Args:
        spec: checkpoint path, registry name, ``module:factory``, ``torchvision:<n>``,
            ``timm:<n>``.
        weights: optional weights file (refused with a checkpoint, which holds its own);
            without one, a torchvision/timm or registry architecture has random weights
            (torchvision/timm say so in a warning: weights are never downloaded).
        num_classes: number of outputs; passed to the architecture when it takes a
            ``num_classes`` argument (registry, torchvision, timm, factories that do),
            else checked against the network's output. Defaults to ``len(class_names)``.
        class_names, input_size, mean, std, resize: preprocessing and labels; they
            override what the checkpoint, the weights file or the defaults say.
        model_kwargs: further keyword arguments for the architecture (not for
            checkpoints); stored in ``arch_kwargs`` so checkpoints rebuild it.

    Raises:
        InvariscopeError: unknown spec (lists the registry names), missing file,
            torchvision/timm not installed or broken, weights that do not fit.
    """
    text = os.fspath(spec)
    overrides = {
        "input_size": input_size,
        "mean": mean,
        "std": std,
        "resize": resize,
        "class_names": class_names,
    }
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    kind = arch_kind(text)  # an architecture spec wins over a same-named file
    path = Path(text)
    if kind is None and path.is_file():
        if weights is not None:
            raise InvariscopeError(
                f"{text} is a model file that holds its own weights; drop the weights "
                "file (--weights), or give an architecture instead"
            )
        if model_kwargs:
            raise InvariscopeError(
                f"model arguments {dict(model_kwargs)} cannot change the saved model {text}"
            )
        if is_torchscript(path):
            try:
                net = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise InvariscopeError(f"cannot read TorchScript file {text} ({exc})") from exc
            model = as_classifier(net, arch=None, num_classes=num_classes, **overrides)
        else:
            model, _ = load_checkpoint(path)
            model = as_classifier(model, arch=None, num_classes=num_classes, **overrides)
        return model.eval()
    if kind is None:
        if path.is_dir():
            raise InvariscopeError(f"{text} is a directory; give a checkpoint file or a model name")
        if os.sep in text or "/" in text or text.endswith(_WEIGHT_SUFFIXES):
            raise InvariscopeError(f"model file not found: {text}")
        raise unknown_name("model", text, list_models())
    kwargs = dict(model_kwargs or {})
    if num_classes is not None and "num_classes" not in kwargs:
        takes_k = kind in ("registry", "torchvision", "timm")
        if kind == "factory":
            takes_k = _accepts(_import_factory(text), "num_classes")
        if takes_k:
            kwargs["num_classes"] = int(num_classes)
    module, hints = build_net(text, kwargs)
    model = as_classifier(
        module,
        arch=None if kind == "registry" else text,
        arch_kwargs=kwargs,
        hints=hints,
        num_classes=num_classes,
        validate=True,
        **overrides,
    )
    if weights is None and kind in ("torchvision", "timm"):
        warn(f"{text} has random weights (no {hint('weights=FILE', '--weights')} given)")
    if weights is not None:
        state, meta = read_weights(weights)
        load_state(model, state, os.fspath(weights))
        if meta is not None:  # an invariscope checkpoint used as weights: its labels too
            names = meta.get("class_names")
            if class_names is None and isinstance(names, list) and len(names) == model.num_classes:
                model.class_names = names
            pre = meta.get("preprocessing") or {}
            if resize is None and "resize" in pre:
                model.resize = bool(pre["resize"])
        model.set_preprocessing(**overrides)  # the caller's values win over the file's
    return model.eval()
