"""Shared fixtures: small trained models are trained once per test session."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def digits_data():
    """The built-in ``digits`` train and test splits."""
    from invariscope.data import create_dataset

    return create_dataset("digits", "train"), create_dataset("digits", "test")


@pytest.fixture(scope="session")
def trained_digits(digits_data):
    """``(model, train_set, test_set, test_accuracy)``: simple-cnn trained 3 epochs on digits."""
    from invariscope.train import model_for_dataset, train

    train_set, test_set = digits_data
    model = model_for_dataset("simple-cnn", train_set, seed=0)
    result = train(model, train_set, test_set=test_set, epochs=3, seed=0, progress=False)
    model.eval()
    return model, train_set, test_set, result.test_accuracy


@pytest.fixture
def rng():
    """A seeded torch generator for test inputs."""
    return torch.Generator().manual_seed(1234)


class Tiny(nn.Module):
    """A small, fast, input-dependent classifier for 1x28x28 images with fixed random weights.

    Shared by the sweep tests (import it with ``from conftest import Tiny``).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 5, stride=2)
        self.fc = nn.Linear(4 * 12 * 12, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def one_line_error(capsys) -> str:
    """The CLI's stderr, checked to be ONE line ``invariscope: error: ...`` with no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("invariscope: error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err
