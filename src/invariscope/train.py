"""Seeded training and evaluation of classifiers, with augmentation from the transform registry.

Augmentation draws one magnitude per image, uniformly from a ``(low, high)`` range, from a
seeded :class:`torch.Generator`, and applies the registered transformation: the same pure
functions that sweeps measure with, so "trained with rotation=-30:30" means exactly the
rotation that ``invariscope sweep --transforms rotation`` applies.

Example:
    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> model = create_model("simple-cnn")
    >>> result = train(model, create_dataset("digits", "train"), epochs=1, progress=False)
    >>> 0.0 <= result.test_accuracy <= 1.0 or result.test_accuracy != result.test_accuracy
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from invariscope._deprecation import renamed_arguments
from invariscope.data.batches import iter_batches
from invariscope.engine.execution import (  # noqa: F401 - re-exported
    deterministic_training,
    resolve_device,
)
from invariscope.errors import InvariscopeError, hint
from invariscope.transforms import get_transform

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``test_accuracy`` is the top-1 accuracy on ``test_set`` after the last epoch (NaN
    without a test set); ``history`` has one row per epoch with columns ``epoch, loss,
    train_accuracy, test_accuracy, seconds``.
    """

    test_accuracy: float
    history: pd.DataFrame = field(repr=False)
    config: dict = field(default_factory=dict)


def augment_batch(
    images: torch.Tensor,
    augment: Mapping[str, tuple[float, float]] | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Apply each ``name -> (low, high)`` augmentation with per-image uniform magnitudes.

    Magnitudes come from ``generator`` (on the CPU, so results do not depend on the
    device); gaussian noise gets a fresh per-image seed from the same generator.
    """
    if not augment:
        return images
    b = images.shape[0]
    for name, (low, high) in augment.items():
        spec = get_transform(name)
        mags = low + (high - low) * torch.rand(b, generator=generator, dtype=torch.float64)
        if spec.kind == "discrete":
            mags = mags.round()
        options = {}
        if name == "gaussian_noise":
            options["seed"] = torch.randint(0, 2**31, (b,), generator=generator)
        images = spec(images, mags.to(images.device, images.dtype), **options)
    return images


def parse_augment(items: list[str] | tuple[str, ...] | None) -> dict[str, tuple[float, float]]:
    """Parse ``["rotation=-30:30", "zoom=0.8:1.2"]`` into ``{name: (low, high)}``.

    Names must be registered transformations and both ends inside the domain.
    """
    out: dict[str, tuple[float, float]] = {}
    for item in items or ():
        name, sep, rng = item.partition("=")
        parts = rng.split(":")
        if not sep or len(parts) != 2:
            raise InvariscopeError(
                f"--augment '{item}' must look like NAME=LOW:HIGH, e.g. rotation=-30:30"
            )
        spec = get_transform(name.strip())
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise InvariscopeError(
                f"--augment '{item}': LOW and HIGH must be numbers, e.g. rotation=-30:30"
            ) from None
        if not low <= high:
            raise InvariscopeError(f"--augment '{item}': LOW must not exceed HIGH")
        spec.check(torch.tensor([low, high], dtype=torch.float64))
        out[spec.name] = (low, high)
    return out


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device="cpu") -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode, no augmentation)."""
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y, _ in iter_batches(dataset, batch_size):
            logits = model(x.to(dev))
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return correct / total


def check_train_settings(
    *, epochs: int = 5, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.0
) -> None:
    """Refuse training settings that cannot work, with one line naming the option.

    ``epochs`` and ``batch_size`` must be integers >= 1, ``lr`` a finite number > 0 and
    ``weight_decay`` a finite number >= 0 (NaN and infinities are refused).
    """
    batch_name = hint("train_batch", "--train-batch")
    for name, value in (("--epochs", epochs), (batch_name, batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InvariscopeError(f"{name} must be an integer of at least 1, got {value!r}")
    for name, value, low in (("--lr", lr, "> 0"), ("weight_decay", weight_decay, ">= 0")):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (value > 0 if name == "--lr" else value >= 0)
        if not ok:
            raise InvariscopeError(
                f"{name} must be a finite number {low} (e.g. 1e-3), got {value!r}"
            )


def check_classes(dataset: Dataset) -> None:
    """Refuse training data with fewer than 2 classes (a classifier needs 2 to learn)."""
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) < 2:
        names = ", ".join(map(str, classes)) or "none"
        raise InvariscopeError(
            f"the training data has {len(classes)} class ({names}); a classifier needs at "
            "least 2 classes: give each class its own folder (DATA/<class>/*.png)"
        )


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (only if it changes anything)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def checkpoint_name(model_name: str, data_name: str, key: str | None = None) -> str:
    """A safe file name ``<model>_<data>[_<hash16>].pt`` for a model trained on data.

    Both names keep only ``[A-Za-z0-9_-]`` (other runs become ``_``) and at most 40
    characters, so a ``--data`` such as ``folder:../../x`` or a long path cannot leave
    the target folder or exceed the file-name limit. With ``key`` the name ends in the
    first 16 hex digits of its SHA-256 (the readable part may then collide, the hash not).

    >>> checkpoint_name("simple-cnn", "folder:../../x", key="k")
    'simple-cnn_folder_x_8254c329a92850f6.pt'
    """

    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40].strip("_") or "x"

    stem = f"{safe(model_name)}_{safe(data_name)}"
    if key is not None:
        stem += "_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return stem + ".pt"


@renamed_arguments(batch_size="train_batch")
def train(
    model: nn.Module,
    train_set: Dataset,
    *,
    test_set: Dataset | None = None,
    epochs: int = 5,
    train_batch: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: Mapping[str, tuple[float, float]] | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> TrainResult:
    """Train ``model`` with Adam and cross-entropy; return test accuracy and history.

    Reproducibility: the data order comes from a generator seeded with ``seed``, the
    augmentation magnitudes from one seeded with ``seed + 1``, and any randomness of
    the model itself (dropout) from the global RNG seeded with ``seed + 2`` inside a
    :func:`torch.random.fork_rng` block (the caller's RNG state is restored); the
    model's initialisation is the caller's (:func:`model_for_dataset` seeds it).
    Kernels run in PyTorch's deterministic mode (:func:`deterministic_training`). So
    the same model, data, settings, seed, device, PyTorch build and **number of CPU
    threads** give bit-identical weights, however busy the machine is. The thread
    count matters on the CPU: reductions (convolution and linear-layer gradients) are
    split across threads, and another split rounds differently, so 1, 2 and 4 threads
    give three slightly different models. PyTorch's default thread count follows the
    CPUs the process may use (``OMP_NUM_THREADS``, ``taskset``, a container's CPU
    limit), so pass ``threads`` to reproduce a model on another machine or under
    another launcher; the count used is stored in ``config["threads"]``.

    Args:
        model: a classifier taking ``[B, C, H, W]`` images in ``[0, 1]``.
        train_set, test_set: datasets yielding ``(image, label)``.
        train_batch: training images per optimiser step (``--train-batch``; the old
            name ``batch_size`` still works, with a DeprecationWarning).
        augment: ``{transform_name: (low, high)}``; see :func:`augment_batch`.
        progress: show a tqdm progress bar on stderr.
        threads: intra-op CPU threads for this call (``torch.set_num_threads``, restored
            after); None keeps the current count.
    """
    check_train_settings(epochs=epochs, batch_size=train_batch, lr=lr, weight_decay=weight_decay)
    if len(train_set) == 0:
        raise InvariscopeError("the training set is empty; check --data")
    check_classes(train_set)
    outputs = getattr(model, "num_classes", None)
    if isinstance(outputs, int) and outputs < 2:
        raise InvariscopeError(
            f"the model has {outputs} output; a classifier needs at least 2 classes"
        )
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1
    ):
        raise InvariscopeError(f"--threads must be an integer of at least 1, got {threads!r}")
    dev = resolve_device(device)
    fork = [dev.index or 0] if dev.type == "cuda" else []
    saved_threads = torch.get_num_threads()
    with (
        torch.random.fork_rng(devices=fork),
        deterministic_training(),
        _num_threads(threads or saved_threads),
    ):
        # the model's own randomness (dropout) comes from ``seed`` too, not from whatever
        # state the caller's global RNG is in; fork_rng restores that state afterwards
        torch.manual_seed(seed + 2)
        history = _train_loop(
            model, train_set, test_set, epochs, train_batch, lr, weight_decay, seed, dev,
            augment, progress,
        )  # fmt: skip
    model.eval()
    config = {
        "epochs": epochs,
        "batch_size": train_batch,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "augment": {k: list(v) for k, v in (augment or {}).items()},
        "threads": int(threads or saved_threads),
    }
    return TrainResult(history[-1]["test_accuracy"], pd.DataFrame(history), config)


def _train_loop(
    model, train_set, test_set, epochs, batch_size, lr, weight_decay, seed, dev, augment, progress
) -> list[dict]:
    from tqdm.auto import tqdm

    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    shuffle_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator().manual_seed(seed + 1)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    history = []
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    bar = tqdm(
        total=epochs * steps_per_epoch,
        disable=None if progress else True,
        unit="batch",
        leave=False,
    )
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            t0 = time.perf_counter()
            loss_sum = correct = seen = 0.0
            for x, y, _ in iter_batches(train_set, batch_size, shuffle=True, generator=shuffle_gen):
                x = augment_batch(x, augment, augment_gen).to(dev)
                low, high = int(y.min()), int(y.max())  # on the CPU still: no device sync
                y = y.to(dev)
                logits = model(x)
                if low < 0 or high >= logits.shape[1]:
                    raise InvariscopeError(
                        f"the data has label {high if low >= 0 else low} but the model has "
                        f"{logits.shape[1]} outputs (labels 0..{logits.shape[1] - 1}); give "
                        "the model one output per class"
                    )
                loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise InvariscopeError(
                        f"training diverged (loss {loss.item()}) in epoch {epoch}; lower --lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}")
            test_acc = evaluate(model, test_set, device=dev) if test_set is not None else math.nan
            history.append(
                {
                    "epoch": epoch,
                    "loss": loss_sum / seen,
                    "train_accuracy": correct / seen,
                    "test_accuracy": test_acc,
                    "seconds": time.perf_counter() - t0,
                }
            )
            log.info("epoch %d: %s", epoch, history[-1])
    finally:
        bar.close()
    return history


def model_for_dataset(name: str, dataset: Dataset, *, seed: int = 0, **kwargs) -> nn.Module:
    """Create the registered model ``name`` shaped for ``dataset``.

    The number of input channels, the image size and the class names are read off the
    dataset and passed to the factory where it accepts them (explicit ``kwargs`` win).
    The initial weights come from a generator seeded with ``seed``, not from whatever
    state the global RNG is in.
    """
    from invariscope.models import create_model, model_info

    image, _ = dataset[0][:2]
    c, h, w = image.shape
    if h != w:
        raise InvariscopeError(
            f"the built-in models take square images; dataset images are {h}x{w}: "
            + hint("load a folder with image_size=N", "pass --image-size N")
            + " (shorter side resized to N, centre crop)"
        )
    classes = list(getattr(dataset, "classes", []))
    info = model_info(name)
    accepted = set(info.defaults)
    derived = {"in_channels": c, "image_size": h, "num_classes": len(classes)}
    args = {k: v for k, v in derived.items() if k in accepted and v}
    args.update(kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name, **args)
    if classes and len(classes) == getattr(model, "num_classes", len(classes)):
        model.class_names = classes
    return model
