"""The end-to-end demo: train (or reuse) the default model, then run each capability's stage.

Each capability adds a *stage*: a function ``stage(ctx: DemoContext) -> str`` that
measures something on the demo model and returns a short summary (one or a few lines).
Stages are listed in :data:`STAGES` in the order they run; a stage whose optional
module is not there yet is skipped with a note, never silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

import invariscope

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where trained demo models are cached: ``$INVARISCOPE_CACHE`` or ``~/.cache/invariscope``."""
    root = os.environ.get("INVARISCOPE_CACHE") or Path.home() / ".cache" / "invariscope"
    return Path(root)


@dataclass
class DemoContext:
    """What every demo stage receives."""

    model: nn.Module
    train_set: Dataset
    test_set: Dataset
    out_dir: Path
    device: torch.device
    test_accuracy: float
    notes: dict = field(default_factory=dict)


def train_or_load(
    model_name: str,
    data_name: str,
    *,
    epochs: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    retrain: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, Dataset, Dataset, float, bool]:
    """Return ``(model, train_set, test_set, test_accuracy, from_cache)``.

    The cache key covers the architecture, the data fingerprint, the training settings
    and the invariscope version, so a change to any of them retrains.
    """
    from invariscope.data import create_dataset
    from invariscope.models import load_checkpoint, save_checkpoint
    from invariscope.train import evaluate, model_for_dataset, train

    train_set = create_dataset(data_name, "train", seed=seed)
    test_set = create_dataset(data_name, "test", seed=seed)
    key = json.dumps(
        {
            "model": model_name,
            "data": train_set.fingerprint,
            "epochs": epochs,
            "seed": seed,
            "version": invariscope.__version__,
        },
        sort_keys=True,
    )
    path = (
        cache_dir()
        / "models"
        / f"{model_name}_{data_name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    )
    if path.exists() and not retrain:
        try:
            model, _ = load_checkpoint(path)
            model.to(device)
            return model, train_set, test_set, evaluate(model, test_set, device=device), True
        except Exception as err:  # a corrupt cache entry is rebuilt, not fatal
            log.warning("ignoring unreadable cached model %s: %s", path, err)
    model = model_for_dataset(model_name, train_set, seed=seed)
    result = train(
        model,
        train_set,
        test_set=test_set,
        epochs=epochs,
        seed=seed,
        device=device,
        progress=progress,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        model.to("cpu"),
        path,
        train_config=dict(result.config, model=model_name, data=data_name),
        data_fingerprint=train_set.fingerprint,
    )
    model.to(device)
    return model, train_set, test_set, result.test_accuracy, False


def _sweep_stage(ctx: DemoContext) -> str:
    from invariscope.measure.sweep import demo_sweep

    return demo_sweep(ctx.model, ctx.test_set, ctx.out_dir / "sweep")


# (name, stage) in the order they run; later capabilities append theirs.
STAGES: list[tuple[str, Callable[[DemoContext], str]]] = [
    ("sweep", _sweep_stage),
]


def run_demo(
    out_dir: str | Path = "demo-output",
    *,
    model_name: str = "simple-cnn",
    data_name: str = "digits",
    epochs: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    retrain: bool = False,
    progress: bool = True,
    stages: list[str] | None = None,
    echo: Callable[[str], None] = print,
) -> DemoContext:
    """Run the demo and ``echo`` a short summary per stage; return the context."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, train_set, test_set, acc, cached = train_or_load(
        model_name,
        data_name,
        epochs=epochs,
        seed=seed,
        device=device,
        retrain=retrain,
        progress=progress,
    )
    how = "reused from cache" if cached else f"trained for {epochs} epochs"
    echo(
        f"[train] {model_name} on {data_name} ({len(train_set)} train / {len(test_set)} test "
        f"images), {how} in {time.perf_counter() - t0:.1f} s: test accuracy {acc:.4f}"
    )
    ctx = DemoContext(model, train_set, test_set, out, torch.device(device), acc)
    for name, stage in STAGES:
        if stages is not None and name not in stages:
            continue
        t1 = time.perf_counter()
        try:
            summary = stage(ctx)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("invariscope"):
                raise
            echo(f"[{name}] skipped: {err.name} is not built yet")
            continue
        echo(f"[{name}] ({time.perf_counter() - t1:.1f} s) {summary}")
    echo(f"outputs in {out}/")
    return ctx
