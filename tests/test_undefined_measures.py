"""Measures undefined for the data are NaN with one warning, never a silent 0."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from invariscope.data.base import TensorImageDataset
from invariscope.measure.shift import TOP_K, flip_rate_ratios, shift_stability
from invariscope.models.classifier import Classifier


def _model(classes: int) -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    net.append(nn.Linear(4, classes))
    return Classifier(net, input_size=(1, 16, 16), mean=0.5, std=0.5, num_classes=classes)


def _data(classes: int, n: int = 12) -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(
        torch.rand(n, 1, 16, 16, generator=g),
        torch.arange(n) % classes,
        classes=[f"c{k}" for k in range(classes)],
        name=f"noise{classes}",
        split="test",
    )


def _run(classes: int):
    return shift_stability(
        _model(classes),
        _data(classes),
        "circular",
        frames=4,
        layers=(),
        consistency_pairs=1,
        progress=False,
    )


def test_top5_measures_are_nan_with_one_warning_for_two_classes(caplog):
    with caplog.at_level(logging.WARNING, logger="invariscope.measure.shift"):
        res = _run(2)
    warned = [r.getMessage() for r in caplog.records if "undefined" in r.getMessage()]
    assert len(warned) == 1 and "2 classes" in warned[0] and "\n" not in warned[0]
    row = res.summary.iloc[0]
    for column in ("jagged", "jagged_low", "jagged_high", "t5d", "mean_jaggedness"):
        assert math.isnan(row[column]), column
    # the measures that stay defined are still numbers
    assert 0.0 <= row["p_top1_change"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
    assert not math.isnan(row["mad"])


def test_top5_measures_stay_defined_above_top_k_classes(caplog):
    with caplog.at_level(logging.WARNING, logger="invariscope.measure.shift"):
        res = _run(TOP_K + 1)
    assert not [r for r in caplog.records if "undefined" in r.getMessage()]
    row = res.summary.iloc[0]
    assert 0.0 <= row["jagged"] <= 1.0 and row["t5d"] >= 0.0


def test_flip_rate_against_a_baseline_that_never_flips_is_nan_with_a_warning(caplog):
    summary = pd.DataFrame(
        {"model": ["model", "baseline"], "protocol": ["crop", "crop"], "fp": [0.2, 0.0]}
    )
    with caplog.at_level(logging.WARNING, logger="invariscope.measure.shift"):
        table = flip_rate_ratios(summary)
    assert np.isnan(table["fr"]).all()
    assert len([r for r in caplog.records if "FR on crop is undefined" in r.getMessage()]) == 1
