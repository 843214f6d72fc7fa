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

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from invariscope.data.batches import iter_batches
from invariscope.engine.execution import resolve_device  # noqa: F401 - re-exported
from invariscope.errors import InvariscopeError
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


def train(
    model: nn.Module,
    train_set: Dataset,
    *,
    test_set: Dataset | None = None,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: Mapping[str, tuple[float, float]] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` with Adam and cross-entropy; return test accuracy and history.

    Everything random (initial shuffling, augmentation magnitudes) comes from
    generators seeded with ``seed``; the model's own initialisation is the caller's
    (``create_model`` runs under a fixed seed). With the same seed, data and device,
    two runs give identical weights on the CPU.

    Args:
        model: a classifier taking ``[B, C, H, W]`` images in ``[0, 1]``.
        train_set, test_set: datasets yielding ``(image, label)``.
        augment: ``{transform_name: (low, high)}``; see :func:`augment_batch`.
        progress: show a tqdm progress bar on stderr.
    """
    if epochs < 1:
        raise InvariscopeError(f"--epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise InvariscopeError(f"--batch-size must be at least 1, got {batch_size}")
    if len(train_set) == 0:
        raise InvariscopeError("the training set is empty; check --data")
    from tqdm.auto import tqdm

    dev = resolve_device(device)
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
                y = y.to(dev)
                logits = model(x)
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
    model.eval()
    config = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "augment": {k: list(v) for k, v in (augment or {}).items()},
    }
    return TrainResult(history[-1]["test_accuracy"], pd.DataFrame(history), config)


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
            f"the built-in models take square images; dataset images are {h}x{w}"
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
