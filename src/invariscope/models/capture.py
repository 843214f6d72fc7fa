"""Capture intermediate activations with forward hooks.

``capture_activations(model, images, layers)`` runs ONE forward pass and returns the
logits and the output of each requested layer; hooks are removed in a ``finally``, also
when the forward raises. ``ActivationCapture`` is the same as a context manager for
callers that run the forward themselves.

Activations are returned as computed (not detached, not copied): wrap the call in
``torch.no_grad()`` when no gradient is needed, or keep the graph to differentiate
through a layer (equivariance maps, stitching).

A layer that runs more than once in one forward pass (a module reused, e.g. the shared
ReLU of a torchvision ``BasicBlock``) has no single activation: it is refused with an
error that says so. Probe its parent block or a module that runs once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from invariscope.errors import InvariscopeError, unknown_name
from invariscope.models.classifier import Classifier

__all__ = ["ActivationCapture", "capture_activations", "resolve_layer"]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model`` (a Classifier or any ``nn.Module``).

    Raises:
        InvariscopeError: unknown name, listing the probe-able layers.
    """
    if isinstance(model, Classifier):
        return model.layer(name)
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    raise unknown_name("layer", name, [n for n in modules if n])


class ActivationCapture:
    """Context manager recording the outputs of named layers during forward passes.

    >>> import torch
    >>> from invariscope.models import create_model
    >>> model = create_model("simple-cnn").eval()
    >>> with ActivationCapture(model, ["net.conv1", "fc"]) as cap:
    ...     logits = model(torch.rand(2, 1, 28, 28))
    >>> cap.activations["net.conv1"].shape, cap.activations["fc"].shape
    (torch.Size([2, 64, 20, 20]), torch.Size([2, 10]))

    Attributes:
        activations: ``{name: output}`` of the most recent call of each layer, keyed by
            the names as given.
        calls: ``{name: number of calls}`` since entering (or :meth:`clear`).
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str]) -> None:
        names = [layers] if isinstance(layers, str) else [str(n) for n in layers]
        self.names = list(dict.fromkeys(names))  # drop repeats, keep order
        self.modules = {n: resolve_layer(model, n) for n in self.names}
        self.activations: dict[str, Any] = {}
        self.calls: dict[str, int] = {n: 0 for n in self.names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.activations[name] = output
            self.calls[name] += 1

        return hook

    def clear(self) -> None:
        """Forget recorded activations and call counts."""
        self.activations = {}
        self.calls = {n: 0 for n in self.names}

    def __enter__(self) -> ActivationCapture:
        try:
            for name, module in self.modules.items():
                if isinstance(module, torch.jit.ScriptModule):
                    raise InvariscopeError(
                        f"layer '{name}' is part of a TorchScript model, which cannot take "
                        "forward hooks; load the model from its Python code "
                        "(module:factory with a weights file) to probe layers"
                    )
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def capture_activations(
    model: nn.Module, images: torch.Tensor, layers: str | Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the activations of ``layers`` from ONE forward pass of ``model``.

    Args:
        model: a :class:`Classifier` (layer names as in ``model.layer_names``, or short
            names relative to its network) or any ``nn.Module`` (module paths).
        images: the model's input, for a Classifier ``[B, C, H, W]`` in ``[0, 1]``.
        layers: a layer name or a sequence of them.

    Returns:
        ``(logits, {name: activation})``, e.g. ``[B, 64, 20, 20]`` for ``net.conv1`` of
        ``simple-cnn``; keys are the names as given.

    Raises:
        InvariscopeError: unknown layer (lists the valid names), or a layer that did
            not run exactly once in the forward pass.
    """
    with ActivationCapture(model, layers) as cap:
        logits = model(images)
    for name, n in cap.calls.items():
        if n != 1:
            how = "did not run" if n == 0 else f"ran {n} times"
            raise InvariscopeError(
                f"layer '{name}' {how} in one forward pass, so it has no single "
                "activation; probe a module that runs exactly once (e.g. its parent block)"
            )
    return logits, {n: cap.activations[n] for n in cap.names}
