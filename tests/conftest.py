"""Shared fixtures: small trained models are trained once per test session."""

from __future__ import annotations

import pytest
import torch


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
