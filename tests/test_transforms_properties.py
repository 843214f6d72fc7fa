"""Property-based checks of the transformation registry (hypothesis draws the magnitudes)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invariscope.transforms import apply, compose_matrix, get_transform, invert_affine

angles = st.floats(-360, 360, allow_nan=False)
shifts = st.floats(-1, 1, allow_nan=False)
factors = st.floats(0.1, 10, allow_nan=False)
sizes = st.integers(4, 64)
FAST = settings(max_examples=40, deadline=None)


def _homogeneous(m: torch.Tensor) -> torch.Tensor:
    out = torch.eye(3, dtype=m.dtype).repeat(m.shape[0], 1, 1)
    out[:, :2] = m
    return out


@FAST
@given(angles, shifts, factors, sizes, sizes)
def test_compose_matrix_is_the_matrix_product(a, t, s, h, w):
    steps = [("rotation", a), ("translate_x", t), ("zoom", s)]
    mats = [get_transform(n).matrix(torch.tensor([v], dtype=torch.float64), h, w) for n, v in steps]
    expected = _homogeneous(mats[2]) @ _homogeneous(mats[1]) @ _homogeneous(mats[0])
    got = compose_matrix([(n, torch.tensor([v], dtype=torch.float64)) for n, v in steps], h, w)
    torch.testing.assert_close(got, expected[:, :2], atol=1e-9, rtol=1e-9)


@FAST
@given(angles, factors, sizes)
def test_inverse_magnitudes_give_inverse_matrices(a, s, n):
    rot = get_transform("rotation").matrix
    zoom = get_transform("zoom").matrix
    for m, m_inv in [
        (
            rot(torch.tensor([a], dtype=torch.float64), n, n),
            rot(torch.tensor([-a], dtype=torch.float64), n, n),
        ),
        (
            zoom(torch.tensor([s], dtype=torch.float64), n, n),
            zoom(torch.tensor([1 / s], dtype=torch.float64), n, n),
        ),
    ]:
        torch.testing.assert_close(m_inv, invert_affine(m), atol=1e-9, rtol=1e-9)


@FAST
@given(angles, sizes)
def test_rotation_keeps_the_centre_and_lengths(a, n):
    m = get_transform("rotation").matrix(torch.tensor([a], dtype=torch.float64), n, n)[0]
    centre = torch.tensor([(n - 1) / 2, (n - 1) / 2, 1.0], dtype=torch.float64)
    torch.testing.assert_close(m @ centre, centre[:2], atol=1e-9, rtol=0)
    assert math.isclose(torch.linalg.det(m[:, :2]).item(), 1.0, abs_tol=1e-9)


@FAST
@given(
    st.floats(-1, 1, allow_nan=False), st.floats(0, 3, allow_nan=False), st.integers(0, 2**31 - 1)
)
def test_photometric_formulas(v, c, seed):
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(apply("brightness", x, v), (x + v).clamp(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(apply("contrast", x, c), (c * x).clamp(0, 1), atol=1e-6, rtol=0)
    g1 = apply("grayscale", x, 1.0)
    w = abs(v)  # a blend weight in [0, 1]
    torch.testing.assert_close(apply("grayscale", x, w), (1 - w) * x + w * g1, atol=1e-6, rtol=0)
    assert torch.allclose(g1[:, 0], g1[:, 1]) and torch.allclose(g1[:, 1], g1[:, 2])


@FAST
@given(st.floats(0.01, 2, allow_nan=False), st.integers(0, 2**31 - 1))
def test_noise_field_is_the_same_at_every_magnitude(v, seed):
    x = torch.rand(3, 1, 6, 6)
    seeds = torch.tensor([seed, seed + 1, seed + 2])
    z1 = (apply("gaussian_noise", x, v, seed=seeds, clamp=False) - x) / v
    z2 = (apply("gaussian_noise", x, 2 * v, seed=seeds, clamp=False) - x) / (2 * v)
    torch.testing.assert_close(z1, z2, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(z1[0], z1[1])
