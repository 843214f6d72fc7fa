"""Training: seeded determinism, augmentation from the registry, the accuracy goals."""

from __future__ import annotations

import pytest
import torch

from invariscope.errors import InvariscopeError
from invariscope.train import augment_batch, evaluate, model_for_dataset, parse_augment, train


def test_parse_augment():
    assert parse_augment(["rotation=-30:30", "zoom=0.8:1.25"]) == {
        "rotation": (-30.0, 30.0),
        "zoom": (0.8, 1.25),
    }
    for bad in ["rotation", "rotation=1", "rotation=a:b", "rotation=30:-30", "zoom=0:2"]:
        with pytest.raises(InvariscopeError):
            parse_augment([bad])


def test_augment_batch_zero_width_range_is_identity(rng):
    x = torch.rand(4, 1, 16, 16, generator=rng)
    gen = torch.Generator().manual_seed(0)
    y = augment_batch(x, {"rotation": (0.0, 0.0), "brightness": (0.0, 0.0)}, gen)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_augment_batch_draws_magnitudes_inside_the_range(rng):
    # brightness on a zero image: the output equals the magnitude drawn (clamped at 0).
    x = torch.zeros(256, 1, 2, 2)
    gen = torch.Generator().manual_seed(0)
    y = augment_batch(x, {"brightness": (0.2, 0.6)}, gen)[:, 0, 0, 0]
    assert y.min() >= 0.2 and y.max() <= 0.6
    assert y.std() > 0.05  # really drawn per image, not one value for the batch


def test_same_seed_same_weights(digits_data):
    train_set, test_set = digits_data
    small = torch.utils.data.Subset(train_set, range(128))
    small.classes = train_set.classes
    weights = []
    for _ in range(2):
        model = model_for_dataset("simple-cnn", train_set, seed=3)
        train(model, small, epochs=1, seed=3, augment={"rotation": (-20, 20)}, progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    model = model_for_dataset("simple-cnn", train_set, seed=4)
    train(model, small, epochs=1, seed=4, progress=False)
    assert not torch.equal(
        weights[0], torch.cat([p.detach().flatten() for p in model.parameters()])
    )


def test_digits_reaches_90_percent_in_5_epochs(digits_data):
    train_set, test_set = digits_data
    model = model_for_dataset("simple-cnn", train_set, seed=0)
    result = train(model, train_set, test_set=test_set, epochs=5, seed=0, progress=False)
    assert result.test_accuracy >= 0.90
    assert list(result.history["epoch"]) == [1, 2, 3, 4, 5]
    assert result.test_accuracy == pytest.approx(evaluate(model, test_set))


@pytest.mark.slow
def test_glyphs_reaches_97_percent_in_5_epochs():
    from invariscope.data import create_dataset

    train_set, test_set = create_dataset("glyphs", "train"), create_dataset("glyphs", "test")
    model = model_for_dataset("simple-cnn", train_set, seed=0)
    result = train(model, train_set, test_set=test_set, epochs=5, seed=0, progress=False)
    assert result.test_accuracy >= 0.97


def test_training_rejects_bad_settings(digits_data):
    train_set, _ = digits_data
    model = model_for_dataset("simple-cnn", train_set)
    with pytest.raises(InvariscopeError, match="epochs"):
        train(model, train_set, epochs=0, progress=False)
    with pytest.raises(InvariscopeError, match="lower --lr"):
        train(model, train_set, epochs=1, lr=1e12, progress=False)
