"""Contract tests shared by EVERY registered transformation (parametrised over the registry).

A new transformation is tested here automatically as soon as it is registered: identity,
domain errors, module == function, batching, gradients, and for geometric / discrete
ones the matrix (function == warp by its matrix, inverse restores, composition ==
product of matrices). Images are tiny (<= 33 px) to keep the file fast.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.transforms import (
    affine,
    compose,
    compose_matrix,
    get_transform,
    invert_affine,
    list_transforms,
    rotation,
    warp_affine,
)

ALL = list_transforms()
WITH_MATRIX = [n for n in ALL if get_transform(n).matrix_fn is not None]
PHOTOMETRIC = [n for n in ALL if get_transform(n).kind == "photometric"]


def smooth(B: int, C: int, H: int, W: int, *, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Smooth images in [0.2, 0.8]: two low-frequency plane waves per image and channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(H, dtype=torch.float64).view(H, 1) / H
    x = torch.arange(W, dtype=torch.float64).view(1, W) / W
    out = torch.full((B, C, H, W), 0.5, dtype=torch.float64)
    for _ in range(2):
        fx, fy = (torch.rand(2, B, C, 1, 1, generator=g, dtype=torch.float64) * 1.2 - 0.6).unbind(0)
        phase = torch.rand(B, C, 1, 1, generator=g, dtype=torch.float64) * 2 * math.pi
        out = out + 0.15 * torch.sin(2 * math.pi * (fx * x + fy * y) + phase)
    return out.to(dtype)


def example_matrix(H: int, W: int, dtype=torch.float32) -> torch.Tensor:
    """An invertible forward pixel matrix: rotation 20 deg, shear 0.1, scale 1.1, shift (1.3, -0.7)."""
    a = math.radians(20.0)
    rot = torch.tensor(
        [[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]], dtype=torch.float64
    )
    lin = 1.1 * rot @ torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=torch.float64)
    t = c - lin @ c + torch.tensor([1.3, -0.7], dtype=torch.float64)
    return torch.cat([lin, t[:, None]], 1).to(dtype)


def example(name: str, B: int, H: int, W: int, dtype=torch.float32) -> torch.Tensor:
    """A moderate non-identity magnitude: the sweep value closest to the identity."""
    spec = get_transform(name)
    if spec.magnitude_shape:
        return example_matrix(H, W, dtype).expand(B, 2, 3).clone()
    values = spec.magnitudes()
    values = values[values != spec.identity]
    best = values[(values - spec.identity).abs().argmin()]
    return torch.full((B,), float(best), dtype=dtype)


def off_grid(name: str, B: int, H: int, W: int, dtype=torch.float64) -> torch.Tensor:
    """A magnitude away from the identity and from integer-pixel coincidences (for gradcheck)."""
    spec = get_transform(name)
    m = example(name, B, H, W, dtype)
    if spec.integer:
        return m
    ident = spec.identity_magnitude(B, dtype=dtype)
    steps = torch.linspace(1.37, 1.61, B, dtype=dtype).view(-1, *[1] * len(spec.magnitude_shape))
    return ident + steps * (m - ident)


def per_image_options(name: str, B: int) -> tuple[dict, list[dict]]:
    """Options for a batch, and the same options for each image alone (seeded noise)."""
    if "seed" in get_transform(name).options:
        seeds = torch.arange(10, 10 + B)
        return {"seed": seeds}, [{"seed": seeds[i : i + 1]} for i in range(B)]
    return {}, [{} for _ in range(B)]


# ---------------------------------------------------------------------- registry entries
@pytest.mark.parametrize("name", ALL)
def test_spec_is_complete_and_consistent(name):
    spec = get_transform(name)
    assert spec.name == name
    assert spec.kind in ("geometric", "photometric", "discrete")
    assert spec.description and spec.unit and spec.sign
    assert issubclass(spec.module, nn.Module)
    assert (spec.matrix_fn is None) == (spec.kind == "photometric")
    spec.check(spec.identity_magnitude(1))  # the identity lies in the domain
    if spec.default_range is not None:
        values = spec.magnitudes()
        assert values.dim() == 1 and len(values) >= 2
        assert bool((values[1:] > values[:-1]).all())
        assert float(spec.identity) in values.tolist()
    if spec.kind == "photometric":
        assert spec.matrix(spec.identity, 8, 8) is None


@pytest.mark.parametrize("name", ALL)
def test_identity_magnitude_returns_input(name):
    spec = get_transform(name)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = spec(x, spec.identity_magnitude(3))
    if spec.kind == "geometric":
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    else:
        assert torch.equal(y, x)


@pytest.mark.parametrize("name", ALL)
def test_batched_equals_one_image_at_a_time(name):
    spec = get_transform(name)
    B, H, W = 3, 16, 16
    x = smooth(B, 3, H, W)
    m = example(name, B, H, W)
    m[0] = spec.identity_magnitude(1)[0]
    if not spec.magnitude_shape and not spec.integer:
        m[2] = spec.identity + 2 * (m[2] - spec.identity)  # three different magnitudes
    options, singles = per_image_options(name, B)
    y = spec(x, m, **options)
    assert y.shape == x.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
    for i in range(B):
        torch.testing.assert_close(
            y[i : i + 1], spec(x[i : i + 1], m[i : i + 1], **singles[i]), atol=1e-4, rtol=0
        )
    assert not torch.allclose(y[1], x[1], atol=1e-3), "the example magnitude changes the image"


@pytest.mark.parametrize("name", ALL)
def test_module_and_function_agree_with_defaults(name):
    spec = get_transform(name)
    x = smooth(2, 3, 16, 16)
    m = example(name, 2, 16, 16)
    expected = spec.fn(x, m)
    assert torch.equal(spec.module(m)(x), expected)
    assert torch.equal(spec.module()(x, m), expected)
    assert torch.equal(spec(x, m), expected)
    if spec.default_magnitude is None:
        with pytest.raises(InvariscopeError, match="no magnitude"):
            spec.module()(x)
    else:
        assert torch.equal(spec.module()(x), spec.fn(x))


def _out_of_domain(name: str) -> list:
    spec = get_transform(name)
    if spec.magnitude_shape:
        return [torch.zeros(2, 3), torch.full((2, 3), math.nan)]
    lo, hi, lo_open, hi_open = spec.domain
    bad = [math.nan, math.inf]
    if math.isfinite(lo):
        bad.append(lo if lo_open else lo - 0.5)
    if math.isfinite(hi):
        bad.append(hi if hi_open else hi + 0.5)
    if spec.integer:
        bad.append(lo + 0.5)
    return bad


@pytest.mark.parametrize("name", ALL)
def test_out_of_domain_magnitude_raises_naming_transformation_and_range(name):
    spec = get_transform(name)
    x = torch.rand(2, 3, 8, 8)
    for bad in _out_of_domain(name):
        good = example(name, 2, 8, 8)
        m = good.clone()
        m[1] = torch.as_tensor(bad)  # one bad image in an otherwise valid batch
        for call in (
            spec.fn,
            lambda img, mag: spec.module(mag)(img),
            lambda _, mag: spec.check(mag),
        ):
            with pytest.raises(InvariscopeError) as err:
                call(x, m)
            message = str(err.value)
            assert message.startswith(f"{name}: ") and "\n" not in message
            assert spec.valid_range in message or "not invertible" in message


@pytest.mark.parametrize("name", ALL)
def test_gradcheck_float64(name):
    spec = get_transform(name)
    B, H, W = 2, 6, 6
    x = (
        0.15
        + 0.7
        * torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ).requires_grad_()
    m = off_grid(name, B, H, W)
    options = per_image_options(name, B)[0]
    assert torch.autograd.gradcheck(lambda img: spec(img, m, **options), (x,), eps=1e-6, atol=1e-5)
    (spec(x, m, **options) ** 2).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    if spec.differentiable:
        mg = m.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda mag: spec(x.detach(), mag, **options), (mg,), eps=1e-6, atol=1e-5
        )


# ---------------------------------------------------------------------- geometric contract
@pytest.mark.parametrize("name", WITH_MATRIX)
def test_matrix_of_identity_is_identity(name):
    spec = get_transform(name)
    M = spec.matrix(spec.identity_magnitude(2, dtype=torch.float64), 15, 20)
    eye = torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3)
    torch.testing.assert_close(M, eye, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", WITH_MATRIX)
def test_function_is_the_warp_by_its_matrix(name):
    spec = get_transform(name)
    H = W = 17
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(4))
    m = example(name, 2, H, W)
    torch.testing.assert_close(spec(x, m), warp_affine(x, spec.matrix(m, H, W)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", WITH_MATRIX)
def test_inverse_matrix_restores_central_region(name):
    spec = get_transform(name)
    H = W = 33
    x = smooth(2, 3, H, W)
    m = example(name, 2, H, W)
    back = affine(spec(x, m), invert_affine(spec.matrix(m, H, W)))
    c = slice(11, 22)
    torch.testing.assert_close(back[..., c, c], x[..., c, c], atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", WITH_MATRIX)
def test_composition_is_the_product_of_matrices(name):
    spec = get_transform(name)
    H, W = 17, 17
    m = example(name, 2, H, W, dtype=torch.float64)
    steps = [(name, m), ("rotation", torch.tensor([20.0, -35.0], dtype=torch.float64))]
    M = compose_matrix(steps, H, W)
    # the composed map sends each point where the two maps, one after the other, send it
    pts = torch.tensor(
        [[0.0, 0.0, 1.0], [16.0, 3.0, 1.0], [5.5, 12.25, 1.0]], dtype=torch.float64
    ).T
    first = spec.matrix(m, H, W) @ pts
    second = get_transform("rotation").matrix(steps[1][1], H, W)
    expected = second @ torch.cat([first, torch.ones_like(first[:, :1])], 1)
    torch.testing.assert_close(M @ pts, expected, atol=1e-10, rtol=0)
    # compose warps once by that product, and matches applying the steps one after the other
    x = smooth(2, 3, H, W)
    fused = compose(x, [(name, m.float()), ("rotation", steps[1][1].float())])
    torch.testing.assert_close(fused, warp_affine(x, M.float()), atol=1e-5, rtol=0)
    sequential = rotation(spec(x, m.float()), steps[1][1].float())
    c = slice(6, 11)
    torch.testing.assert_close(fused[..., c, c], sequential[..., c, c], atol=5e-3, rtol=0)
