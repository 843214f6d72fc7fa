"""Capture intermediate activations with forward hooks; address each call of a reused layer.

``capture_activations(model, images, layers)`` runs ONE forward pass and returns the
logits and the output of each requested layer; hooks are removed in a ``finally``, also
when the forward raises. ``ActivationCapture`` is the same as a context manager for
callers that run the forward themselves.

Activations are returned as computed (not detached, not copied): wrap the call in
``torch.no_grad()`` when no gradient is needed, or keep the graph to differentiate
through a layer (equivariance maps, stitching).

Layer references. A layer is named by its module path (``"layer1.0.conv1"``, relative to a
Classifier or its ``net``). A module that runs more than once in one forward pass (a
module reused, e.g. the shared ``relu`` of a torchvision ``BasicBlock``, which runs twice,
or the one ``_swish`` of an EfficientNet) is addressed per call with ``name:k``, ``k``
counting from 0 in execution order: ``layer1.0.relu:1`` is the block's second ReLU. A bare
name of a module that runs twice is refused at its second call, with an error that says
how to name the call. "One forward pass" is one outermost module call, whichever module
that is (``model(x)``, ``model.net(x)``, ...): call counters restart there.
:func:`register_layer_hook` is the one place every per-layer analysis hooks a layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from invariscope.errors import InvariscopeError, unknown_name
from invariscope.models.classifier import Classifier

__all__ = [
    "ActivationCapture",
    "LayerHook",
    "capture_activations",
    "parse_layer",
    "register_layer_hook",
    "resolve_layer",
]

_CALL_RE = re.compile(r"^(?P<name>.+):(?P<call>[0-9]+)$")


def parse_layer(ref: str) -> tuple[str, int | None]:
    """``"layer1.0.relu:1" -> ("layer1.0.relu", 1)``; a bare name has call ``None``.

    >>> parse_layer("layer1.0.relu:1"), parse_layer("net.conv1")
    (('layer1.0.relu', 1), ('net.conv1', None))
    """
    m = _CALL_RE.match(str(ref))
    if m is None:
        return str(ref), None
    return m.group("name"), int(m.group("call"))


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model`` (a Classifier or any ``nn.Module``).

    A call suffix (``"layer1.0.relu:1"``) is accepted and ignored here: the module is
    the same for every call.

    Raises:
        InvariscopeError: unknown name, listing the probe-able layers.
    """
    name, _ = parse_layer(name)
    if isinstance(model, Classifier):
        return model.layer(name)
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    raise unknown_name("layer", name, [n for n in modules if n])


class _ForwardDepth:
    """Counts nested module calls process-wide while layer hooks are installed, so that a
    layer's call counter restarts at every outermost forward pass."""

    def __init__(self) -> None:
        self.depth = 0
        self.users = 0
        self.epoch = 0  # incremented at the start of every outermost forward
        self._handles: list[Any] = []

    def _pre(self, module, inputs) -> None:
        if self.depth == 0:
            self.epoch += 1
        self.depth += 1

    def _post(self, module, inputs, output) -> None:
        self.depth = max(0, self.depth - 1)

    def acquire(self) -> None:
        if self.users == 0:
            reg = nn.modules.module
            self._handles = [
                reg.register_module_forward_pre_hook(self._pre),
                reg.register_module_forward_hook(self._post, always_call=True),
            ]
            self.depth = 0
        self.users += 1

    def release(self) -> None:
        self.users = max(0, self.users - 1)
        if self.users == 0:
            while self._handles:
                self._handles.pop().remove()
            self.depth = 0


_DEPTH = _ForwardDepth()


class LayerHook:
    """A forward hook on one call of one layer (see :func:`register_layer_hook`)."""

    def __init__(self, model: nn.Module, ref: str, hook: Callable[..., Any]) -> None:
        self.ref = str(ref)
        self.name, self.call = parse_layer(self.ref)
        self.module = resolve_layer(model, self.ref)
        if isinstance(self.module, torch.jit.ScriptModule):
            raise InvariscopeError(
                f"layer '{self.ref}' is part of a TorchScript model, which cannot take "
                "forward hooks; load the model from its Python code "
                "(module:factory with a weights file) to probe layers"
            )
        self.hook = hook
        self.fired = 0  # how many times the addressed call ran (over all forwards)
        self._epoch = -1
        self._count = 0
        _DEPTH.acquire()
        self._handle: Any = self.module.register_forward_hook(self._wrapped)

    def _wrapped(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if self._epoch != _DEPTH.epoch:
            self._epoch, self._count = _DEPTH.epoch, 0
        k = self._count
        self._count += 1
        if self.call is None:
            if k >= 1:
                raise InvariscopeError(
                    f"layer '{self.name}' ran {k + 1} times in one forward pass (a reused "
                    f"module), so it has no single activation; name one call: "
                    f"'{self.name}:0' (first), '{self.name}:1' (second), ..."
                )
        elif k != self.call:
            return None
        self.fired += 1
        return self.hook(module, inputs, output)

    def calls_seen(self) -> int:
        """How many times the module ran in the latest forward pass."""
        return self._count if self._epoch == _DEPTH.epoch else 0

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            _DEPTH.release()


def register_layer_hook(model: nn.Module, ref: str, hook: Callable[..., Any]) -> LayerHook:
    """``resolve_layer(model, ref).register_forward_hook(hook)``, for one call of the layer.

    ``ref`` is a layer name, optionally with a call index (``"layer1.0.relu:1"``): the
    hook runs on that call only (its return value, if not None, replaces the output, as
    with any forward hook). A bare name hooks the layer's only call; if the module runs a
    second time in the same forward pass, that call raises a one-line
    :class:`InvariscopeError` telling how to name a call. A call index beyond the calls
    that happen simply never fires (callers check :attr:`LayerHook.fired`).

    Returns:
        a :class:`LayerHook` (``.remove()`` it, e.g. in a ``finally``).
    """
    return LayerHook(model, ref, hook)


class ActivationCapture:
    """Context manager recording the outputs of named layers during forward passes.

    >>> import torch
    >>> from invariscope.models import create_model
    >>> model = create_model("simple-cnn").eval()
    >>> with ActivationCapture(model, ["net.conv1", "fc"]) as cap:
    ...     logits = model(torch.rand(2, 1, 28, 28))
    >>> cap.activations["net.conv1"].shape, cap.activations["fc"].shape
    (torch.Size([2, 64, 20, 20]), torch.Size([2, 10]))

    Layer names may carry a call index (``"layer1.0.relu:1"``, see the module docs).

    Attributes:
        activations: ``{name: output}`` of the most recent call of each layer, keyed by
            the names as given.
        calls: ``{name: number of calls}`` since entering (or :meth:`clear`).
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str]) -> None:
        names = [layers] if isinstance(layers, str) else [str(n) for n in layers]
        self.names = list(dict.fromkeys(names))  # drop repeats, keep order
        self.model = model
        self.modules = {n: resolve_layer(model, n) for n in self.names}
        self.activations: dict[str, Any] = {}
        self.calls: dict[str, int] = {n: 0 for n in self.names}
        self._handles: list[LayerHook] = []

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
            for name in self.names:
                self._handles.append(register_layer_hook(self.model, name, self._hook(name)))
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
        layers: a layer name or a sequence of them; ``name:k`` is the k-th call (from 0)
            of a module that runs several times per forward.

    Returns:
        ``(logits, {name: activation})``, e.g. ``[B, 64, 20, 20]`` for ``net.conv1`` of
        ``simple-cnn``; keys are the names as given.

    Raises:
        InvariscopeError: unknown layer (lists the valid names), a bare name of a layer
            that ran more than once, or a layer (call) that did not run.
    """
    with ActivationCapture(model, layers) as cap:
        logits = model(images)
    for name, n in cap.calls.items():
        if n != 1:
            raise InvariscopeError(
                f"layer '{name}' did not run in the forward pass"
                + (" that many times" if parse_layer(name)[1] is not None else "")
                + "; pick a layer the network uses"
            )
    return logits, {n: cap.activations[n] for n in cap.names}
