"""``Classifier``: a network plus the preprocessing and labels that belong to it.

Every transformation in invariscope acts on ``[0, 1]`` pixels, as in the papers, so the
mean/std normalisation is the model's business, not the data's: ``Classifier.forward``
takes ``[B, C, H, W]`` images in ``[0, 1]``, optionally resizes them to ``input_size``,
normalises them and runs the wrapped network.

Convention:
    * input: float ``[B, C, H, W]`` in ``[0, 1]``; ``C`` must equal ``input_size[0]``.
    * normalisation: ``(x - mean[c]) / std[c]`` per channel, AFTER the optional resize.
      ``mean`` and ``std`` are persistent buffers (they are in the ``state_dict``).
    * resize (``resize=True``): bilinear, ``align_corners=False``, anti-aliased when
      shrinking, to ``input_size[1:]``; only when the incoming ``H, W`` differ. With
      ``resize=False`` (default) another size is an error, so no measurement silently
      resamples its images.
    * output: logits ``[B, num_classes]``.
    * layer names are module paths relative to the Classifier (``"net.conv1"``); the
      short form relative to the network (``"conv1"``) is accepted by :meth:`layer`.

>>> import torch
>>> from torch import nn
>>> m = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), input_size=(1, 2, 2),
...                mean=0.5, std=0.5, num_classes=3)
>>> m(torch.rand(5, 1, 2, 2)).shape
torch.Size([5, 3])
>>> m.layer_names
['net.0', 'net.1']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from invariscope.errors import InvariscopeError, hint, unknown_name

__all__ = ["Classifier", "check_class_names", "default_layer_names"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_stage(module: nn.Module) -> bool:
    """A container of repeated blocks: a ``Sequential`` / ``ModuleList`` with at least two
    elements of one class that have children of their own (a ResNet ``layer1``, a ViT's
    ``encoder.layers``), as opposed to a small container of different layers."""
    if not isinstance(module, (nn.Sequential, nn.ModuleList)):
        return False
    kinds: dict[type, int] = {}
    for child in module.children():
        if any(True for _ in child.children()):
            kinds[type(child)] = kinds.get(type(child), 0) + 1
    return any(n >= 2 for n in kinds.values())


def default_layer_names(net: nn.Module, prefix: str = "") -> list[str]:
    """Probe-able layers of an arbitrary network, in registration order.

    A network may declare them with a ``layer_names`` attribute (names relative to the
    network). Otherwise its children are listed, containers (``Sequential``,
    ``ModuleList``, ``ModuleDict``) expanded into their elements, and so is any other
    child that holds a stage of repeated blocks (a ViT's ``encoder`` holding
    ``encoder.layers``): a torchvision ResNet gives ``conv1, bn1, relu, maxpool,
    layer1.0, layer1.1, ..., avgpool, fc`` (its block outputs), a torchvision ViT
    ``conv_proj, encoder.dropout, encoder.layers.encoder_layer_0, ..., encoder.ln,
    heads.head``. TorchScript modules cannot take Python forward hooks, so they have none.
    A :class:`Classifier` built without explicit names keeps, of these, the ones that run
    exactly once per forward pass and return a tensor (see ``Classifier.layer_names``).
    """
    if isinstance(net, torch.jit.ScriptModule):
        return []
    declared = getattr(net, "layer_names", None)
    if declared is not None:
        return [prefix + n for n in declared]
    names: list[str] = []
    for child_name, child in net.named_children():
        expand = isinstance(child, _CONTAINERS) or any(
            _is_stage(grandchild) for grandchild in child.children()
        )
        if expand and not isinstance(child, torch.jit.ScriptModule):
            names.extend(default_layer_names(child, prefix + child_name + "."))
        else:
            names.append(prefix + child_name)
    return names


def _runs_once(model: nn.Module, names: Sequence[str], input_size: Sequence[int]) -> list[str]:
    """Of ``names``, those whose module runs exactly once and returns a tensor in one
    forward pass of two random images (eval mode, no gradient); all of them when that
    forward fails (the caller's own checks then speak)."""
    modules = dict(model.named_modules())
    calls = {n: 0 for n in names}
    tensor = {n: False for n in names}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            calls[name] += 1
            tensor[name] = isinstance(output, torch.Tensor)

        return record

    try:
        param = next(iter(model.parameters()), None)
    except Exception:  # pragma: no cover - exotic modules
        param = None
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.rand(2, *input_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    handles = [modules[n].register_forward_hook(hook(n)) for n in names if n in modules]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception:
        return list(names)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [n for n in names if calls[n] == 1 and tensor[n]]


def _per_channel(value: float | Sequence[float] | torch.Tensor, channels: int, what: str):
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise InvariscopeError(
            f"{what} has {t.numel()} values but the model has {channels} channel(s); "
            f"give one value or {channels}"
        )
    if not torch.isfinite(t).all():
        raise InvariscopeError(f"{what} must be finite, got {t.tolist()}")
    return t


def _input_size(value: Sequence[int]) -> tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise InvariscopeError(f"input_size must be (C, H, W) of positive ints, got {value!r}")
    return size  # type: ignore[return-value]


def _shape(x: Any) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


class Classifier(nn.Module):
    """A classifier that takes ``[0, 1]`` images and owns its preprocessing.

    Args:
        net: the network; maps normalised ``[B, C, H, W]`` to logits ``[B, K]``.
        input_size: ``(C, H, W)`` the network expects.
        mean, std: per-channel normalisation (one value is broadcast); default 0.5 / 0.5,
            i.e. the network sees ``2x - 1``.
        class_names: label of each output; defaults to ``"0" .. "K-1"``.
        num_classes: ``K``, needed only when ``class_names`` is not given.
        resize: resize images of another ``H, W`` to ``input_size`` (else refuse them).
        arch, arch_kwargs: how to rebuild ``net`` (registry name, ``module:factory``,
            ``torchvision:<name>`` or ``timm:<name>``, and its keyword arguments);
            set by :func:`create_model` / :func:`load_model`, used by checkpoints.
        layer_names: probe-able layers, module paths relative to the Classifier
            (``"net.conv1"``); default :func:`default_layer_names` of ``net``.

    Shapes:
        ``forward``: ``[B, C, H, W]`` in ``[0, 1]`` -> logits ``[B, K]``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        *,
        input_size: Sequence[int],
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        resize: bool = False,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        layer_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.input_size = _input_size(input_size)
        channels = self.input_size[0]
        self.register_buffer("mean", _per_channel(mean, channels, "mean"))
        self.register_buffer("std", _per_channel(std, channels, "std"))
        self._check_std(self.std)
        if class_names is None:
            if num_classes is None:
                raise InvariscopeError("Classifier needs class_names or num_classes")
            if int(num_classes) < 1:
                raise InvariscopeError(f"num_classes must be >= 1, got {num_classes}")
            class_names = [str(i) for i in range(int(num_classes))]
        elif num_classes is not None and len(class_names) != int(num_classes):
            raise InvariscopeError(
                f"{len(class_names)} class names given for num_classes={num_classes}"
            )
        self._class_names = [str(c) for c in class_names]
        self.resize = bool(resize)
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self._probed_layers: list[str] | None = None
        self._declared_layers: list[str] | None = None
        if layer_names is not None:
            self.layer_names = layer_names
        elif getattr(net, "layer_names", None) is not None:
            self._declared_layers = default_layer_names(net, "net.")

    # ------------------------------------------------------------------ labels
    @property
    def class_names(self) -> list[str]:
        """Label of each output unit (a copy; assign a new list to relabel)."""
        return list(self._class_names)

    @class_names.setter
    def class_names(self, names: Sequence[str]) -> None:
        names = [str(c) for c in names]
        if len(names) != len(self._class_names):
            raise InvariscopeError(
                f"{len(names)} class names given for a model with {len(self._class_names)} outputs"
            )
        self._class_names = names

    @property
    def num_classes(self) -> int:
        """Number of outputs ``K``."""
        return len(self._class_names)

    # ----------------------------------------------------------- preprocessing
    @staticmethod
    def _check_std(std: torch.Tensor) -> None:
        if (std <= 0).any():
            raise InvariscopeError(f"std must be > 0, got {std.tolist()}")

    def set_preprocessing(
        self,
        *,
        input_size: Sequence[int] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        resize: bool | None = None,
        class_names: Sequence[str] | None = None,
    ) -> Classifier:
        """Change the preprocessing in place (``None`` keeps a value); returns self.

        The channel count of ``input_size`` cannot change: it is fixed by the network.
        """
        if input_size is not None:
            size = _input_size(input_size)
            if size[0] != self.input_size[0]:
                raise InvariscopeError(
                    f"input_size {list(size)} has {size[0]} channel(s) but the network "
                    f"takes {self.input_size[0]}"
                )
            self.input_size = size
        channels = self.input_size[0]
        with torch.no_grad():
            if mean is not None:
                self.mean.copy_(_per_channel(mean, channels, "mean"))
            if std is not None:
                new_std = _per_channel(std, channels, "std")
                self._check_std(new_std)
                self.std.copy_(new_std)
        if resize is not None:
            self.resize = bool(resize)
        if class_names is not None:
            self.class_names = class_names
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line :class:`InvariscopeError` unless ``x`` is a valid batch."""
        c, h, w = self.input_size
        expected = f"float images [B, {c}, {h}, {w}] in [0, 1]"
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise InvariscopeError(f"model expects {expected}, got {_shape(x)}")
        if not x.is_floating_point():
            raise InvariscopeError(
                f"model expects {expected}, got dtype {x.dtype} with shape {_shape(x)}; "
                "convert with x.float() / 255"
            )
        if x.shape[1] != c:
            raise InvariscopeError(
                f"model expects {expected}, got shape {_shape(x)} "
                f"({x.shape[1]} channel(s) instead of {c})"
            )
        if not self.resize and tuple(x.shape[2:]) != (h, w):
            raise InvariscopeError(
                f"model expects {expected}, got shape {_shape(x)}; resize the images "
                "or enable resizing (" + hint("resize=True", "--resize") + ")"
            )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Check, resize (if enabled and needed) and normalise ``[0, 1]`` images.

        Shapes: ``[B, C, H', W']`` -> ``[B, C, H, W]`` with ``(C, H, W) = input_size``.
        """
        self.check_input(x)
        size = tuple(self.input_size[1:])
        if tuple(x.shape[2:]) != size:
            shrink = x.shape[2] > size[0] or x.shape[3] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        mean = self.mean.to(x.dtype).view(1, -1, 1, 1)
        std = self.std.to(x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of ``[0, 1]`` images ``x`` ``[B, C, H, W]``."""
        return self.net(self.preprocess(x))

    # ------------------------------------------------------------------ layers
    @property
    def layer_names(self) -> list[str]:
        """Ordered names of the layers a user can probe (relative to the Classifier).

        Given explicitly (``layer_names=``) or declared by the network, they are used as
        they are. Otherwise they are :func:`default_layer_names` of ``net`` (block
        outputs for residual networks) minus the modules that do not run exactly once
        per forward pass or return no tensor (a reused activation such as an
        EfficientNet's single ``_swish``): found once, by one forward pass of two random
        images in eval mode, and cached.
        """
        if self._declared_layers is not None:
            return list(self._declared_layers)
        if self._probed_layers is None:
            candidates = default_layer_names(self.net, "net.")
            self._probed_layers = _runs_once(self, candidates, self.input_size)
        return list(self._probed_layers)

    @layer_names.setter
    def layer_names(self, layer_names: Sequence[str]) -> None:
        names = [str(n) for n in layer_names]
        modules = dict(self.named_modules())
        for n in names:
            base = n.rsplit(":", 1)[0] if n.rsplit(":", 1)[-1].isdigit() else n
            if not base or base not in modules:
                raise InvariscopeError(
                    f"layer name '{n}' is not a submodule of the Classifier "
                    "(names are relative to it, e.g. 'net.conv1')"
                )
        self._declared_layers = names

    def layer(self, name: str) -> nn.Module:
        """The submodule called ``name`` (``"net.conv1"`` or, short, ``"conv1"``).

        Any submodule path is accepted, not only those in :attr:`layer_names`.

        Raises:
            InvariscopeError: unknown name (lists :attr:`layer_names`).
        """
        modules = dict(self.named_modules())
        if name:
            if name in modules:
                return modules[name]
            if "net." + name in modules:
                return modules["net." + name]
        raise unknown_name("layer", name, self.layer_names)

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, input_size={self.input_size}, "
            f"num_classes={self.num_classes}, mean={[round(v, 4) for v in self.mean.tolist()]}, "
            f"std={[round(v, 4) for v in self.std.tolist()]}, resize={self.resize}"
        )


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def check_class_names(model: Any, dataset: Any) -> str | None:
    """A one-line warning when ``model`` and ``dataset`` name their classes differently.

    Both sides' ``class_names`` (model) and ``classes`` (dataset; ``class_names`` is
    accepted too) are compared as strings when both exist and have the same length:
    label ``i`` of the data is scored against output ``i`` of the model, so other names
    (``a..j`` against ``0..9``), or the same names in another order, mean the accuracy
    measures the wrong thing. Returns None when they agree, when either side has no
    names, when the lengths differ (a mismatch the caller reports separately), or when
    the model's names are the defaults ``"0" .. "K-1"`` of a network loaded without
    names (nothing to compare then).

    >>> from types import SimpleNamespace as NS
    >>> check_class_names(NS(class_names=["a", "b"]), NS(classes=["a", "b"])) is None
    True
    >>> print(check_class_names(NS(class_names=["b", "a"]), NS(classes=["a", "b"])))
    the model's class names (b, a) are the dataset's (a, b) in another order: dataset label 0 ('a') is scored as model output 0 ('b'); check that the model was trained on this dataset
    """
    ours = getattr(model, "class_names", None)
    theirs = getattr(dataset, "classes", None)
    if theirs is None:
        theirs = getattr(dataset, "class_names", None)
    if not ours or not theirs:
        return None
    ours, theirs = [str(c) for c in ours], [str(c) for c in theirs]
    if len(ours) != len(theirs) or ours == theirs:
        return None
    if ours == [str(i) for i in range(len(ours))]:  # defaults: the model has no names
        return None
    i = next(k for k, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    how = "are the dataset's" if sorted(ours) == sorted(theirs) else "differ from the dataset's"
    order = " in another order" if sorted(ours) == sorted(theirs) else ""
    return (
        f"the model's class names ({_preview(ours)}) {how} ({_preview(theirs)}){order}: "
        f"dataset label {i} ('{theirs[i]}') is scored as model output {i} ('{ours[i]}'); "
        "check that the model was trained on this dataset"
    )
