"""Linear CKA (Kornblith et al. 2019) and its streamed minibatch form (Nguyen et al. 2021)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from invariscope.errors import InvariscopeError
from invariscope.measure.cka import (
    centred_gram,
    cka_direct,
    cka_table,
    gram_linear,
    hsic_biased,
    hsic_table,
    hsic_unbiased,
    minibatch_cka,
)


def _features(n: int = 64, d: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _correlated(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two representations of the same n samples sharing a 4-dimensional latent."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x = z @ torch.randn(4, 16, generator=g, dtype=torch.float64)
    x = x + 0.5 * torch.randn(n, 16, generator=g, dtype=torch.float64)
    y = torch.tanh(z @ torch.randn(4, 24, generator=g, dtype=torch.float64))
    y = y + 0.5 * torch.randn(n, 24, generator=g, dtype=torch.float64)
    return x, y


def _streamed(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    sums = np.zeros(3)
    for s in range(0, len(x), batch):
        kx, ky = centred_gram(x[s : s + batch]), centred_gram(y[s : s + batch])
        sums += [hsic_unbiased(kx, ky), hsic_unbiased(kx, kx), hsic_unbiased(ky, ky)]
    return minibatch_cka(*sums)


def test_gram_linear_flattens_per_image_in_float64():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    kx = gram_linear(x)
    f = x.reshape(2, -1).double()
    assert kx.dtype == torch.float64 and kx.shape == (2, 2)
    assert torch.equal(kx, f @ f.T)


def test_hsic_unbiased_by_hand_on_a_4x4_example():
    kx = torch.tensor([[1, 2, 0, 1], [2, 3, 1, 0], [0, 1, 2, 2], [1, 0, 2, 5]], dtype=torch.float64)
    ky = torch.tensor([[4, 1, 1, 0], [1, 2, 0, 3], [1, 0, 1, 1], [0, 3, 1, 2]], dtype=torch.float64)
    # by hand: K~, L~ are K, L with zero diagonals, n = 4
    # tr(K~ L~) = sum_ij K~ij L~ij = 2*(2*1 + 0*1 + 1*0 + 1*0 + 0*3 + 2*1) = 8
    # 1^T K~ 1 = 2*(2+0+1+1+0+2) = 12; 1^T L~ 1 = 2*(1+1+0+0+3+1) = 12
    # K~ 1 = [3, 3, 3, 3]; L~ 1 = [2, 4, 2, 4]; 1^T K~ L~ 1 = 3 * 12 = 36
    # HSIC1 = [8 + 12*12/(3*2) - 2/2 * 36] / (4*1) = (8 + 24 - 36) / 4 = -1
    assert hsic_unbiased(kx, ky) == pytest.approx(-1.0, abs=1e-12)
    assert hsic_unbiased(ky, kx) == pytest.approx(-1.0, abs=1e-12)


def test_hsic_needs_four_images():
    kx = gram_linear(_features(3))
    with pytest.raises(InvariscopeError, match=r">= 4 images.*batch.size"):
        hsic_unbiased(kx, kx)
    with pytest.raises(InvariscopeError, match="4 images"):
        cka_direct(_features(3), _features(3, seed=1), unbiased=True)
    assert np.isfinite(hsic_unbiased(gram_linear(_features(4)), gram_linear(_features(4, 3, 1))))


def test_hsic_shapes_are_checked():
    with pytest.raises(InvariscopeError, match="square Gram"):
        hsic_unbiased(torch.zeros(4, 4), torch.zeros(5, 5))
    with pytest.raises(InvariscopeError, match="same images"):
        cka_direct(_features(8), _features(9))


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_a_layer_with_itself_is_one(unbiased):
    x = _features(64, 20)
    assert cka_direct(x, x, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    assert _streamed(x, x, 16) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(unbiased):
    x, y = _correlated(96, seed=3)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(7)).double())
    assert torch.allclose(q.T @ q, torch.eye(16, dtype=torch.float64), atol=1e-12)
    base = cka_direct(x, y, unbiased=unbiased)
    assert 0.2 < base < 0.99  # related, not identical: a test that could fail
    assert cka_direct(x @ q, y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert cka_direct(7.5 * x, 0.01 * y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    # ... but not to an arbitrary (anisotropic) linear map
    scale = torch.linspace(0.1, 10.0, 16, dtype=torch.float64)
    assert abs(cka_direct(x * scale, y, unbiased=unbiased) - base) > 1e-3


def test_one_batch_minibatch_cka_equals_the_unbiased_direct_estimate():
    x, y = _correlated(64, seed=1)
    assert _streamed(x, y, 64) == pytest.approx(cka_direct(x, y, unbiased=True), abs=1e-10)
    # and the streaming tables give the same number
    table = hsic_table({"x": x}, {"y": y})
    assert cka_table(table, ["x"], ["y"])["cka"].iloc[0] == pytest.approx(
        cka_direct(x, y, unbiased=True), abs=1e-10
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eight_batches_of_64_approach_the_full_batch_cka(seed):
    x, y = _correlated(512, seed=seed)
    full = cka_direct(x, y)  # biased, all 512 samples at once
    streamed = _streamed(x, y, 64)
    assert 0.3 < full < 0.95
    assert abs(streamed - full) < 0.03, (streamed, full)


def test_minibatch_cka_of_uncorrelated_features_is_near_zero():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 8, generator=g, dtype=torch.float64)
    y = torch.randn(512, 8, generator=g, dtype=torch.float64)
    assert abs(_streamed(x, y, 64)) < 0.05
    assert cka_direct(x, y) > abs(_streamed(x, y, 64))  # the biased estimate is pulled up


def test_constant_features_give_zero_and_are_flagged():
    x = _features(32, 6)
    constant = torch.full((32, 3, 2, 2), 123.456, dtype=torch.float32)
    assert cka_direct(x, constant) == 0.0
    assert cka_direct(constant, x, unbiased=True) == 0.0
    assert minibatch_cka(0.0, 0.0, 5.0) == 0.0
    assert minibatch_cka(1.0, 2.0, -1e-9) == 0.0
    table = cka_table(
        pd.concat(
            [
                hsic_table({"a": x[:16]}, {"c": constant[:16]}),
                hsic_table({"a": x[16:]}, {"c": constant[16:]}),
            ]
        ),
        ["a"],
        ["c"],
    )
    row = table.iloc[0]
    assert row["cka"] == 0.0 and not row["constant_a"] and row["constant_b"]
    assert not table.isna().any().any()


def test_constant_channels_are_fine():
    x = _features(32, 6)
    y = torch.cat([x[:, :3] * 2.0, torch.zeros(32, 2, dtype=torch.float64) + 4.0], dim=1)
    for unbiased in (False, True):
        value = cka_direct(x, y, unbiased=unbiased)
        assert np.isfinite(value) and 0.0 < value < 1.0
    table = cka_table(hsic_table({"x": x}, {"y": y}), ["x"], ["y"])
    assert np.isfinite(table["cka"]).all() and not table[["constant_a", "constant_b"]].any().any()


def test_biased_hsic_matches_the_centred_trace_formula():
    x, y = _correlated(10, seed=4)
    kx, ky = gram_linear(x), gram_linear(y)
    n = 10
    h = np.eye(n) - 1.0 / n
    expected = np.trace(kx.numpy() @ h @ ky.numpy() @ h) / (n - 1) ** 2
    assert hsic_biased(kx, ky) == pytest.approx(expected, rel=1e-12)


def test_hsic_table_columns_and_kinds():
    a = {"l1": _features(8, 3), "l2": _features(8, 4, seed=1)}
    b = {"m1": _features(8, 2, seed=2)}
    table = hsic_table(a, b)
    assert list(table.columns) == ["kind", "layer_a", "layer_b", "value", "n"]
    assert sorted(table["kind"]) == ["aa", "aa", "ab", "ab", "bb"]
    assert table["value"].dtype == np.float64 and (table["n"] == 8).all()
    assert set(table.loc[table["kind"] == "bb", "layer_a"]) == {""}
