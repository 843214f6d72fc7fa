"""Build networks from architecture specs and read weights files.

An architecture spec (``arch``) is one of

* a registry name (``simple-cnn``),
* ``package.module:factory`` -- a function (or class) called with the architecture's
  keyword arguments, returning a :class:`Classifier` or a plain ``nn.Module``,
* ``torchvision:<name>`` / ``timm:<name>`` -- built with ``weights=None`` /
  ``pretrained=False``; never downloads. torchvision and timm are imported only here,
  lazily, and are optional extras.

Plain networks are wrapped in a :class:`Classifier`. Preprocessing not given is taken
from the network (a 3-tuple ``input_size`` attribute; timm's ``pretrained_cfg``) or
else defaults by channel count: ImageNet (mean 0.485, 0.456, 0.406, std 0.229, 0.224,
0.225, 3x224x224) for 3 channels, MNIST (0.1307, 0.3081, 1x28x28) for 1 channel; other
channel counts must give ``input_size`` and get mean 0, std 1. The channel count is
that of the first ``Conv2d`` (3 when there is none).

Weights files may be a ``state_dict``, a checkpoint dict holding one under
``state_dict`` / ``model`` / ``model_state_dict`` (``module.`` and ``_orig_mod.``
prefixes stripped), an invariscope checkpoint, or a TorchScript file. They are read
with ``torch.load(weights_only=True)``: a file holding arbitrary pickled Python objects
is refused rather than executed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from invariscope.errors import InvariscopeError, hint, unknown_name
from invariscope.models.classifier import Classifier
from invariscope.models.registry import _MODELS, create_model

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "CHECKPOINT_FORMAT",
    "arch_kind",
    "import_optional",
    "build_net",
    "as_classifier",
    "is_torchscript",
    "read_weights",
    "load_state",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
#: Value of the ``format`` key of an invariscope checkpoint.
CHECKPOINT_FORMAT = "invariscope-checkpoint"

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_EXTRAS = {"torchvision": "torchvision", "timm": "timm"}
_PREFIXES = ("module.", "_orig_mod.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def arch_kind(arch: str) -> str | None:
    """``"torchvision"``, ``"timm"``, ``"factory"``, ``"registry"`` or None (unknown)."""
    prefix, sep, _ = arch.partition(":")
    if sep and prefix in _EXTRAS:
        return prefix
    if _FACTORY_RE.match(arch):
        return "factory"
    if arch in _MODELS:
        return "registry"
    return None


def _torchvision_mismatch(exc: BaseException, arch: str | None) -> str:
    """The fix for a torchvision build that does not match the installed torch (its C++
    operators, ``torchvision::nms`` first, fail to register): which release and index to
    install, or the built-in zoo twin of the model."""
    from importlib import metadata

    try:
        installed = f"torchvision {metadata.version('torchvision')}"
    except metadata.PackageNotFoundError:
        installed = "torchvision"
    version = torch.__version__
    base, _, local = version.partition("+")
    major, minor = (base.split(".") + ["0", "0"])[:2]
    if major == "2" and minor.isdigit():  # torch 2.M pairs with torchvision 0.(M + 15)
        release, pin = f"torchvision 0.{int(minor) + 15}", f"torchvision==0.{int(minor) + 15}.*"
    else:
        release, pin = "the torchvision release", "torchvision"
    command = f"pip install '{pin}'" + (
        f" --index-url https://download.pytorch.org/whl/{local}" if local else ""
    )
    name = (arch or "").partition(":")[2]
    zoo = (
        f"use the built-in zoo name '{name}' (--model {name}), which mirrors torchvision's "
        "module tree"
        if name in _MODELS
        else "use a built-in zoo model (see 'invariscope models'), which mirrors "
        "torchvision's module tree"
    )
    return (
        f"{installed} is installed but does not match torch {version} ({_first_line(exc)}): "
        "it is a build for another torch, e.g. a CUDA wheel against a CPU torch; install "
        f"{release}, the one made for torch {base}, from the same index as torch ({command}), "
        f"or {zoo}"
    )


def import_optional(module: str, extra: str, arch: str | None = None):
    """Import ``module`` of an optional extra, explaining what to do when it fails.

    Raises:
        InvariscopeError: the package is not installed (names the pip extra), or it is
            installed but its import fails (a broken install: the original error is
            quoted and chained, not swallowed; a torchvision built for another torch is
            named as such, with the release and index that match).
    """
    top = module.partition(".")[0]
    install = f"pip install -c constraints.txt 'invariscope[{extra}]'"
    try:
        importlib.import_module(top)  # first, so that a missing package reads as such
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == top:
            raise InvariscopeError(
                f"{top} is not installed, it is needed for {top}: models; install it with: "
                f"{install}"
            ) from None
        raise InvariscopeError(
            f"{top} is installed but importing {module} failed ({_first_line(exc)}); "
            f"repair the installation: {install}"
        ) from exc
    except Exception as exc:
        text = str(exc)
        if top == "torchvision" and ("torchvision::" in text or "does not exist" in text):
            raise InvariscopeError(_torchvision_mismatch(exc, arch)) from exc
        raise InvariscopeError(
            f"{top} is installed but importing {module} failed ({_first_line(exc)}); "
            f"it may not match torch {torch.__version__}: install the {top} release made for "
            f"torch {torch.__version__} from the same index as torch ({install})"
        ) from exc


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _import_factory(arch: str):
    module, _, attr = arch.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise InvariscopeError(
                f"cannot import module '{module}' for model '{arch}' (no module named "
                f"'{exc.name}'); put its directory on PYTHONPATH"
            ) from None
        raise InvariscopeError(
            f"importing module '{module}' for model '{arch}' failed ({_first_line(exc)}); "
            "install what it needs"
        ) from exc
    except Exception as exc:
        raise InvariscopeError(
            f"importing module '{module}' for model '{arch}' failed ({_first_line(exc)})"
        ) from exc
    owner = obj
    for part in attr.split("."):
        if not hasattr(obj, part):
            known = [n for n in dir(owner) if not n.startswith("_") and callable(getattr(owner, n))]
            raise unknown_name(f"factory in module '{module}'", attr, known)
        owner, obj = obj, getattr(obj, part)
    if not callable(obj):
        raise InvariscopeError(f"'{arch}' is a {type(obj).__name__}, not a callable factory")
    return obj


def _call(fn: Any, kwargs: Mapping[str, Any], arch: str):
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise InvariscopeError(f"model '{arch}' cannot take {dict(kwargs)}: {exc}") from None
    except ValueError:  # no signature available (builtins): just call it
        pass
    return _guarded(arch, lambda: fn(**kwargs), kwargs)


def _guarded(arch: str, build, kwargs: Mapping[str, Any]):
    """``build()``, with any error but an InvariscopeError as one line naming ``arch``."""
    try:
        return build()
    except InvariscopeError:
        raise
    except Exception as exc:
        what = f"factory {arch}" if arch_kind(arch) == "factory" else f"building model '{arch}'"
        args = f" {dict(kwargs)}" if kwargs else ""
        raise InvariscopeError(
            f"{what} failed: {_first_line(exc)}; fix the factory or its arguments{args} "
            "(call it in Python to see the traceback)"
        ) from exc


def build_net(arch: str, arch_kwargs: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network named by ``arch`` with ``arch_kwargs``, without any weights.

    Returns:
        ``(module, hints)``: ``module`` is a :class:`Classifier` (registry names, and
        factories that return one) or a plain network; ``hints`` holds the preprocessing
        the source declares (``input_size``, ``mean``, ``std``), possibly empty.

    Raises:
        InvariscopeError: unknown architecture, missing or broken optional package,
            unimportable factory.
    """
    kind = arch_kind(arch)
    kwargs = dict(arch_kwargs)
    if kind == "registry":
        return create_model(arch, **kwargs), {}
    if kind == "factory":
        return _call(_import_factory(arch), kwargs, arch), {}
    if kind == "torchvision":
        name = arch.partition(":")[2]
        tvm = import_optional("torchvision.models", "torchvision", arch)
        if hasattr(tvm, "list_models") and hasattr(tvm, "get_model_builder"):  # >= 0.14
            known = list(tvm.list_models())
            builder = tvm.get_model_builder(name) if name in known else None
        elif hasattr(tvm, "list_models") and hasattr(tvm, "get_model"):
            known = list(tvm.list_models())
            get_model = tvm.get_model
            builder = (lambda **kw: get_model(name, **kw)) if name in known else None
        else:
            known = [
                n
                for n in dir(tvm)
                if n[:1].islower()
                and not n.startswith(("get_", "list_"))
                and callable(getattr(tvm, n))
                and not isinstance(getattr(tvm, n), type)
            ]
            builder = getattr(tvm, name) if name in known else None
        if builder is None:
            raise unknown_name("torchvision model", name, known)
        net = _call(builder, {"weights": None, **kwargs}, arch)
        return net, {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if kind == "timm":
        name = arch.partition(":")[2]
        timm = import_optional("timm", "timm", arch)
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InvariscopeError(
                f"unknown timm model '{name}'{hint}; list them with "
                "python -c 'import timm; print(timm.list_models())'"
            )
        net = _guarded(arch, lambda: timm.create_model(name, pretrained=False, **kwargs), kwargs)
        cfg = getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None) or {}
        hints = {k: cfg[k] for k in ("input_size", "mean", "std") if cfg.get(k) is not None}
        if kwargs.get("in_chans", 3) != 3:  # timm's configs describe the RGB model
            return net, {}
        return net, {
            "input_size": (3, 224, 224),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            **hints,
        }
    raise unknown_name("model", arch, _MODELS)


def _guess_channels(net: nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
        if getattr(m, "original_name", None) == "Conv2d":  # TorchScript
            c = getattr(m, "in_channels", None)
            if c is not None:
                return int(c)
    return 3


def _infer_classes(net: nn.Module, input_size: Sequence[int], arch: str | None) -> int:
    param = next(iter(net.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, *input_size, dtype=dtype))
    except Exception as exc:
        raise InvariscopeError(
            f"model '{arch}' fails on one image of size {list(input_size)} "
            f"({_first_line(exc)}); pass its input size ("
            + hint("input_size=(C, H, W)", "--input-size C,H,W")
            + ")"
        ) from exc
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvariscopeError(
            f"model '{arch}' returns {got} for one image of size {list(input_size)}; "
            "a classifier must return logits [B, K] (check input_size)"
        )
    return int(out.shape[1])


def as_classifier(
    module: nn.Module,
    *,
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None = None,
    hints: Mapping[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    resize: bool | None = None,
    validate: bool = True,
) -> Classifier:
    """A :class:`Classifier` from ``module`` with the given or default preprocessing.

    A Classifier is updated in place (``arch``/``arch_kwargs`` replaced when ``arch`` is
    given); a plain network is wrapped (see the module docstring for the defaults).
    With ``validate`` a plain network is run once on a zero image to check that it
    returns ``[1, K]`` logits (and to find ``K`` when neither ``class_names`` nor
    ``num_classes`` is given).
    """
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise InvariscopeError(
            f"{len(class_names)} class names given for num_classes={num_classes}"
        )
    if isinstance(module, Classifier):
        if arch is not None:
            module.arch = arch
            module.arch_kwargs = dict(arch_kwargs or {})
        if num_classes is not None and num_classes != module.num_classes:
            raise InvariscopeError(
                f"model '{module.arch}' has {module.num_classes} outputs, not num_classes={num_classes}"
            )
        return module.set_preprocessing(
            input_size=input_size, mean=mean, std=std, resize=resize, class_names=class_names
        )
    if not isinstance(module, nn.Module):
        raise InvariscopeError(
            f"model '{arch}' built a {type(module).__name__}, not a torch.nn.Module"
        )
    hints = dict(hints or {})
    declared = getattr(module, "input_size", None)
    if input_size is None:
        if isinstance(declared, Sequence) and len(declared) == 3:
            input_size = tuple(declared)
        else:
            input_size = hints.get("input_size")
    channels = int(input_size[0]) if input_size is not None else _guess_channels(module)
    if channels == 3:
        defaults = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    elif channels == 1:
        defaults = {"input_size": (1, 28, 28), "mean": MNIST_MEAN, "std": MNIST_STD}
    else:
        defaults = {"input_size": None, "mean": 0.0, "std": 1.0}
    if input_size is None:
        input_size = defaults["input_size"]
        if input_size is None:
            raise InvariscopeError(
                f"cannot tell the input size of model '{arch}' ({channels} channels); "
                "pass " + hint("input_size=(C, H, W)", "--input-size C,H,W")
            )
    if mean is None:
        mean = hints.get("mean", defaults["mean"]) if channels == 3 else defaults["mean"]
    if std is None:
        std = hints.get("std", defaults["std"]) if channels == 3 else defaults["std"]
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    if validate or num_classes is None:
        found = _infer_classes(module, input_size, arch)
        if num_classes is not None and found != num_classes:
            raise InvariscopeError(
                f"model '{arch}' has {found} outputs, not {num_classes}; pass the matching "
                "num_classes / class names"
            )
        num_classes = found
    return Classifier(
        module,
        input_size=input_size,
        mean=mean,
        std=std,
        class_names=class_names,
        num_classes=num_classes,
        resize=bool(resize),
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
    )


def is_torchscript(path: str | Path) -> bool:
    """True if ``path`` is a TorchScript archive (``torch.jit.save``)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") for n in zf.namelist())
    except OSError:
        return False


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING"}
_STRING_OPS |= {"BINSTRING", "SHORT_BINSTRING"}


def _refused_code(what: str, path: Path, name: str) -> str:
    return (
        f"{what} {path} refused: the file holds Python objects other than tensors and plain "
        f"values, i.e. pickled code (GLOBAL {name}), which invariscope does not run; if it is "
        "a whole pickled model you trust, save model.state_dict() or a TorchScript file instead"
    )


def _pickled_global(path: Path) -> str | None:
    """The first global (``module.name``) that a pickle file would import, not a torch one.

    Scans the opcodes without executing anything: the pickle inside a zip written by
    ``torch.save``, or the (up to 8) pickles at the start of a plain file.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                streams = [io.BytesIO(zf.read(names[0]))] if names else []
        else:
            streams = [open(path, "rb")]  # noqa: SIM115 - closed below
    except (OSError, zipfile.BadZipFile):
        return None
    found = None
    for stream in streams:
        with stream:
            for _ in range(8):  # the legacy format is several pickles in a row
                strings: list[str] = []
                try:
                    for op, arg, _pos in pickletools.genops(stream):
                        name = None
                        if op.name in ("GLOBAL", "INST"):
                            name = str(arg).replace(" ", ".")
                        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                            name = f"{strings[-2]}.{strings[-1]}"
                        elif op.name in _STRING_OPS:
                            strings.append(arg if isinstance(arg, str) else repr(arg))
                        if name and not name.startswith(_SAFE_GLOBAL_PREFIXES):
                            found = name
                            break
                except Exception:  # not (or no longer) a pickle: stop scanning
                    break
                if found:
                    break
    return found


def torch_load(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with one-line errors."""
    if not path.exists():
        raise InvariscopeError(f"{what} not found: {path}")
    if path.is_dir():
        raise InvariscopeError(f"{what} {path} is a directory, not a file")
    try:
        with warnings.catch_warnings():  # the refusal below says it better, on one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        name = found.group(1) if found else _pickled_global(path)
        if name is None:
            raise InvariscopeError(
                f"cannot read {what} {path} (not a pickle written by torch.save)"
            ) from exc
        raise InvariscopeError(_refused_code(what, path, name)) from exc
    except Exception as exc:
        raise InvariscopeError(
            f"cannot read {what} {path} ({_first_line(exc)}); it is not a complete file "
            "written by torch.save"
        ) from exc


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a weights file into ``(state_dict, checkpoint_meta or None)``.

    ``checkpoint_meta`` is the invariscope checkpoint's metadata (preprocessing, class
    names, ...) when the file is one, else None. Tensors end up on the CPU.

    Raises:
        InvariscopeError: missing, unreadable, unsafe or unrecognised file.
    """
    path = Path(path)
    if path.is_file() and is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise InvariscopeError(
                f"cannot read TorchScript weights file {path} ({_first_line(exc)})"
            ) from exc
        return dict(scripted.state_dict()), None
    obj = torch_load(path, "weights file")
    meta = None
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj.get("state_dict")
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise InvariscopeError(
            f"no state_dict found in weights file {path}; save model.state_dict() "
            "(or a dict with it under 'state_dict' or 'model')"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InvariscopeError(
            f"no state_dict found in weights file {path}: key '{bad[0]}' holds a "
            f"{type(obj[bad[0]]).__name__} (top-level keys: {', '.join(map(str, list(obj)[:8]))}); "
            "save model.state_dict() (or a dict with it under 'state_dict' or 'model')"
        )
    return _strip({str(k): v for k, v in obj.items()}), meta


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_state(model: Classifier, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` (keys relative to it) or its ``net`` (relative to that).

    The target is the one whose keys ``state`` matches best. A mismatch is one line:
    counts and examples of missing, unexpected and wrongly shaped entries.
    """
    targets = [(model.net, "the network"), (model, "the Classifier")]
    best = max(targets, key=lambda t: len(set(state) & set(t[0].state_dict())))
    target, what = best
    expected = target.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape ({_examples(shapes)})")
    if problems:
        raise InvariscopeError(
            f"weights in {source} do not fit model '{model.arch}': {'; '.join(problems)}; "
            "check the architecture and its arguments (e.g. num_classes)"
        )
    try:
        target.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise InvariscopeError(
            f"weights in {source} do not fit model '{model.arch}' ({_first_line(exc)})"
        ) from exc
