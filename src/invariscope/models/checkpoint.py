"""The invariscope checkpoint: one file that rebuilds a Classifier exactly.

Contents (a dict of tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``; format version 1):

=====================  ====================================================================
``format``             ``"invariscope-checkpoint"``
``format_version``     ``1``
``arch``               registry name, ``module:factory``, ``torchvision:<n>`` or ``timm:<n>``
``arch_kwargs``        keyword arguments that rebuild the network from ``arch``
``state_dict``         the Classifier's ``state_dict`` (``net.*`` plus ``mean``, ``std``)
``preprocessing``      ``{"input_size": [C, H, W], "mean": [...], "std": [...], "resize": b}``
``class_names``        list of str, one per output
``train_config``       the training configuration (plain values) or None
``data_fingerprint``   the training data's fingerprint (str) or None
``extra``              anything else the caller stores (plain values) or None
``antialias``          optional: the model's ``antialias`` record (method, filter_size,
                       pool_size, padding, ...; see :func:`~invariscope.models.antialias`)
                       or None; loading re-applies the conversion before the weights
``invariscope_version``, ``torch_version``: the versions that wrote the file
=====================  ====================================================================

Writing is atomic: a temporary file in the same directory, ``fsync``, then
``os.replace``; on any error the temporary file is removed and an existing checkpoint
at ``path`` is left untouched.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import torch

from invariscope import __version__
from invariscope.errors import InvariscopeError
from invariscope.models.adapters import (
    CHECKPOINT_FORMAT,
    as_classifier,
    build_net,
    is_torchscript,
    load_state,
    torch_load,
)
from invariscope.models.antialias import antialias
from invariscope.models.classifier import Classifier

__all__ = ["FORMAT_VERSION", "is_checkpoint", "save_checkpoint", "load_checkpoint"]

FORMAT_VERSION = 1
_REQUIRED = {
    "arch": str,
    "arch_kwargs": dict,
    "state_dict": dict,
    "preprocessing": dict,
    "class_names": list,
}


def _plain(obj: Any, where: str) -> Any:
    """``obj`` as tensors and plain values (Paths -> str, numpy scalars -> Python)."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return obj
    for kind in (bool, int, float, str):  # subclasses (e.g. torch's version string)
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, numbers.Number) and hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise InvariscopeError(
                    f"{where} has a key of type {type(k).__name__}; use str keys"
                )
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise InvariscopeError(
        f"{where} holds a {type(obj).__name__}, which a checkpoint cannot store; convert it "
        "to str, numbers, lists or dicts"
    )


def save_checkpoint(
    model: Classifier,
    path: str | os.PathLike[str],
    *,
    train_config: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its metadata to ``path`` atomically; returns the path.

    Parent directories are created. ``train_config`` and ``extra`` may hold str,
    numbers, bools, None, lists, tuples, dicts and tensors (``Path`` and numpy scalars
    are converted).

    Raises:
        InvariscopeError: ``model`` is not a Classifier or has no ``arch`` (it cannot
            be rebuilt: build it with ``create_model`` / ``load_model``), or the
            metadata holds values a checkpoint cannot store. Nothing is written then.
    """
    if not isinstance(model, Classifier):
        raise InvariscopeError(
            f"save_checkpoint needs a Classifier, got {type(model).__name__}; wrap the network "
            "or build it with create_model / load_model"
        )
    if not model.arch:
        raise InvariscopeError(
            "the model has no arch, so a checkpoint could not rebuild it; build it with "
            "create_model / load_model (TorchScript models cannot be checkpointed)"
        )
    if data_fingerprint is not None and not isinstance(data_fingerprint, str):
        raise InvariscopeError(
            f"data_fingerprint must be a str, got {type(data_fingerprint).__name__}"
        )
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "invariscope_version": __version__,
        "torch_version": str(torch.__version__),
        "arch": model.arch,
        "arch_kwargs": _plain(dict(model.arch_kwargs), "arch_kwargs"),
        "preprocessing": {
            "input_size": list(model.input_size),
            "mean": model.mean.tolist(),
            "std": model.std.tolist(),
            "resize": bool(model.resize),
        },
        "class_names": model.class_names,
        "train_config": _plain(train_config, "train_config"),
        "data_fingerprint": data_fingerprint,
        "extra": _plain(extra, "extra"),
        "antialias": _plain(getattr(model, "antialias", None), "antialias"),
        "state_dict": OrderedDict((k, v.detach().to("cpu")) for k, v in model.state_dict().items()),
    }
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InvariscopeError(
            f"cannot write checkpoint {path} ({exc.strerror or exc}); choose another path"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, permissions: nothing was written
            raise InvariscopeError(
                f"cannot write checkpoint {path} ({exc.strerror or exc}); nothing was written"
            ) from exc
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a readable file holding an invariscope checkpoint (any version)."""
    path = Path(path)
    if not path.is_file() or is_torchscript(path):
        return False
    try:
        obj = torch_load(path, "checkpoint file")
    except InvariscopeError:
        return False
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def _corrupt(path: Path, why: str) -> InvariscopeError:
    return InvariscopeError(f"{path} is not a valid invariscope checkpoint ({why})")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw checkpoint dict at ``path``, checked for format and required keys."""
    path = Path(path)
    if path.is_file() and is_torchscript(path):
        raise InvariscopeError(
            f"{path} is a TorchScript file, not an invariscope checkpoint; load it with "
            "load_model(path) or pass it as --weights"
        )
    obj = torch_load(path, "checkpoint file")
    if not isinstance(obj, Mapping) or obj.get("format") != CHECKPOINT_FORMAT:
        hint = (
            "it looks like a plain state_dict or training checkpoint; load it with "
            "load_model(ARCH, weights=FILE) / --weights FILE"
            if isinstance(obj, Mapping)
            else f"it holds a {type(obj).__name__}"
        )
        raise InvariscopeError(f"{path} is not an invariscope checkpoint: {hint}")
    version = obj.get("format_version")
    if not isinstance(version, int):
        raise _corrupt(path, "no format_version")
    if version > FORMAT_VERSION:
        raise InvariscopeError(
            f"{path} has checkpoint format version {version}, this invariscope reads up to "
            f"{FORMAT_VERSION}; upgrade invariscope"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(obj.get(key), kind):
            raise _corrupt(path, f"'{key}' missing or not a {kind.__name__}")
    pre = obj["preprocessing"]
    for key in ("input_size", "mean", "std"):
        if not isinstance(pre.get(key), list | tuple):
            raise _corrupt(path, f"preprocessing '{key}' missing")
    return dict(obj)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the Classifier saved at ``path``.

    Returns:
        ``(model, meta)``: the model in eval mode on the CPU, with the saved weights,
        preprocessing and class names (anti-aliased again when the checkpoint says so);
        ``meta`` is the checkpoint without its ``state_dict`` (``arch``,
        ``arch_kwargs``, ``preprocessing``, ``class_names``, ``train_config``,
        ``data_fingerprint``, ``extra``, ``antialias``, versions).

    Raises:
        InvariscopeError: missing, corrupt or foreign file, an architecture that cannot
            be built here (unknown name, missing package), or weights that do not fit.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    pre = ckpt["preprocessing"]
    module, _ = build_net(ckpt["arch"], ckpt["arch_kwargs"])
    model = as_classifier(
        module,
        arch=ckpt["arch"],
        arch_kwargs=ckpt["arch_kwargs"],
        input_size=pre["input_size"],
        mean=pre["mean"],
        std=pre["std"],
        resize=bool(pre.get("resize", False)),
        class_names=ckpt["class_names"],
        validate=False,
    )
    spec = ckpt.get("antialias")
    if spec is not None:  # rebuild the anti-aliased layers, then load their weights
        if not isinstance(spec, Mapping) or not isinstance(spec.get("method"), str):
            raise _corrupt(path, "'antialias' is not a dict with a 'method'")
        options = {k: spec[k] for k in ("filter_size", "pool_size", "padding") if k in spec}
        model = antialias(model, spec["method"], **options)
    load_state(model, ckpt["state_dict"], str(path))
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    meta.setdefault("antialias", None)
    return model.eval(), meta
