"""Model registry in the style of timm: ``@register_model`` on small factories.

A factory is a function ``(**kwargs) -> Classifier`` whose keyword arguments all have
defaults (the defaults are what ``invariscope models`` lists). ``create_model`` calls it,
then records the architecture name and the *complete* keyword arguments (defaults
filled in) on the returned :class:`~invariscope.models.Classifier` as ``arch`` /
``arch_kwargs``, so that a checkpoint can rebuild exactly the same network.

Later modules (spatial transformers, anti-aliased variants) register their own factories
with the same decorator; a factory decides the layer names of its model through
``Classifier(layer_names=...)`` or a ``layer_names`` attribute on the network.

>>> from invariscope.models import create_model, list_models
>>> "simple-cnn" in list_models()
True
>>> create_model("simple-cnn").arch_kwargs
{'in_channels': 1, 'image_size': 28, 'num_classes': 10, 'width': 64}
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from invariscope.errors import InvariscopeError, unknown_name

__all__ = [
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "PREPROCESSING_KWARGS",
]

#: Keyword arguments that ``create_model`` applies to the returned Classifier itself
#: (not to the factory) unless the factory declares a parameter of the same name.
PREPROCESSING_KWARGS = ("class_names", "mean", "std", "resize")

# A registry name may not contain ':' (that marks ``module:factory`` and
# ``torchvision:<name>`` specs), path separators or white space.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class ModelInfo:
    """What ``invariscope models`` lists about one registered architecture.

    Attributes:
        name: the registry name.
        description: first line of the factory's docstring.
        defaults: the factory's keyword arguments and their defaults, in signature order.
        image_sizes: the square image sizes the architecture supports and is tested at
            (passed as ``image_size=``), or ``()`` when it takes no ``image_size``.
    """

    name: str
    description: str
    defaults: dict[str, Any]
    image_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., Any]
    info: ModelInfo


_MODELS: dict[str, _Entry] = {}


def _defaults(fn: Callable[..., Any], name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise InvariscopeError(
                f"model factory '{name}' has a parameter without a default ({p.name}); "
                "give every parameter a default"
            )
        out[p.name] = p.default
    return out


def register_model(
    name: str, *, image_sizes: Sequence[int] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a model factory under ``name``.

    Args:
        name: registry name (letters, digits, ``- _ . +``; no ``:`` or ``/``).
        image_sizes: square input sizes the architecture supports; the factory must then
            take an ``image_size`` keyword. Listed by ``invariscope models`` and used by
            the registry-wide tests.

    Raises:
        InvariscopeError: the name is already registered or malformed, or a factory
            parameter has no default.

    The factory itself is returned unchanged, so it stays callable directly (without
    ``arch`` being recorded; use :func:`create_model` for that).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvariscopeError(
            f"invalid model name {name!r}: use letters, digits and '-_.+' (no ':' or '/')"
        )
    sizes = tuple(int(s) for s in image_sizes)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _MODELS:
            other = _MODELS[name].fn
            raise InvariscopeError(
                f"model name '{name}' is already registered (by "
                f"{other.__module__}.{other.__qualname__}); choose another name"
            )
        defaults = _defaults(fn, name)
        if sizes and "image_size" not in defaults:
            raise InvariscopeError(
                f"model factory '{name}' lists image_sizes but takes no image_size keyword"
            )
        doc = inspect.getdoc(fn) or ""
        description = doc.strip().splitlines()[0] if doc.strip() else ""
        _MODELS[name] = _Entry(fn, ModelInfo(name, description, defaults, sizes))
        return fn

    return decorator


def _entry(name: str) -> _Entry:
    try:
        return _MODELS[name]
    except KeyError:
        raise unknown_name("model", name, _MODELS) from None


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob ``pattern``.

    >>> list_models("small-*")
    ['small-resnet', 'small-vgg']
    """
    names = sorted(_MODELS)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def model_info(name: str) -> ModelInfo:
    """Description, default keyword arguments and supported sizes of a registered model.

    >>> model_info("simple-cnn").defaults
    {'in_channels': 1, 'image_size': 28, 'num_classes': 10, 'width': 64}
    """
    return _entry(name).info


def create_model(name: str, **kwargs: Any):
    """Build the registered model ``name`` with keyword arguments ``kwargs``.

    Keyword arguments the factory does not declare but that name preprocessing
    (``class_names``, ``mean``, ``std``, ``resize``) are applied to the returned
    Classifier; any other unknown keyword is an error. The result carries ``arch=name``
    and ``arch_kwargs`` = the factory's full keyword arguments (defaults filled in).

    Returns:
        Classifier: in training mode, freshly initialised.

    Raises:
        InvariscopeError: unknown name (lists the known ones) or unknown keyword.
    """
    from invariscope.models.classifier import Classifier

    entry = _entry(name)
    params = inspect.signature(entry.fn).parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    factory_kw: dict[str, Any] = {}
    preprocessing: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in params or takes_var_kw:
            factory_kw[key] = value
        elif key in PREPROCESSING_KWARGS:
            preprocessing[key] = value
        else:
            known = [k for k in entry.info.defaults] + list(PREPROCESSING_KWARGS)
            raise InvariscopeError(
                f"model '{name}' takes no argument '{key}'; it takes: {', '.join(known)}"
            )
    arch_kwargs = {**entry.info.defaults, **factory_kw}
    model = entry.fn(**factory_kw)
    if not isinstance(model, Classifier):
        raise TypeError(
            f"model factory '{name}' returned {type(model).__name__}, expected a Classifier"
        )
    model.arch = name
    model.arch_kwargs = arch_kwargs
    if preprocessing:
        model.set_preprocessing(**preprocessing)
    return model
