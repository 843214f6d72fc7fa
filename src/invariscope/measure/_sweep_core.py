"""Predictions of a batch of transformed images, shared by the sweep and the worst case.

Everything here works on whole batches on the model's device; the only Python loops
run over magnitude chunks, never over images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from invariscope.engine.execution import check_logits
from invariscope.engine.random import uniform_per_image

__all__ = [
    "Predictions",
    "check_logits",
    "concat_columns",
    "predict_chunk",
    "prediction_columns",
    "uniform_per_image",
]


# ------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """Predictions of one forward chunk, on the CPU: ``n`` rows, ``k`` top classes, K classes."""

    pred: torch.Tensor  # [n] int64
    p_true: torch.Tensor  # [n] float32
    correct: torch.Tensor  # [n] bool
    top_class: torch.Tensor  # [n, k] int64
    top_prob: torch.Tensor  # [n, k] float32


def predict_chunk(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    top_k: int,
    where: str,
) -> tuple[Predictions, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions of ``images`` (``forward``: a model or an engine's ``ctx.forward``):
    ``(Predictions on the CPU, probabilities [n, K], correct [n] bool, p_true [n])``, the
    last three on the device."""
    logits = check_logits(forward(images), images.shape[0], num_classes, where)
    probs = torch.softmax(logits.float(), dim=1)
    k = min(top_k, num_classes)
    top_prob, top_class = probs.topk(k, dim=1)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    pred = top_class[:, 0]
    correct = pred == labels
    out = Predictions(
        pred=pred.cpu(),
        p_true=p_true.cpu(),
        correct=correct.cpu(),
        top_class=top_class.cpu(),
        top_prob=top_prob.cpu(),
    )
    return out, probs, correct, p_true


def prediction_columns(p: Predictions) -> dict[str, np.ndarray]:
    """Record columns ``pred, p_true, correct, top{i}_class, top{i}_prob`` from predictions."""
    cols: dict[str, np.ndarray] = {
        "pred": p.pred.numpy().astype(np.int64),
        "p_true": p.p_true.numpy().astype(np.float32),
        "correct": p.correct.numpy().astype(bool),
    }
    classes = p.top_class.numpy().astype(np.int32)
    probs = p.top_prob.numpy().astype(np.float32)
    for i in range(classes.shape[1]):
        cols[f"top{i + 1}_class"] = classes[:, i]
        cols[f"top{i + 1}_prob"] = probs[:, i]
    return cols


def concat_columns(chunks: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """One DataFrame from column dictionaries with the same keys."""
    if not chunks:
        return pd.DataFrame()
    return pd.DataFrame({key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]})
