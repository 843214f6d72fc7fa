"""Specific checks of invariscope.transforms: signs by hand, the warp core and affine_grid,
exact equivalences (torch.roll / rot90 / flip), photometric values by hand, seeded noise,
composition, sweeps and errors. The shared contract is in test_transforms_contract.py."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from invariscope.errors import InvariscopeError
from invariscope.transforms import (
    Compose,
    Domain,
    GaussianNoise,
    Rotation,
    TransformSpec,
    apply,
    brightness,
    compose,
    compose_matrix,
    contrast,
    gaussian_blur,
    gaussian_noise,
    get_transform,
    grayscale,
    grid,
    grid_steps,
    hflip,
    list_transforms,
    parse_range,
    pixel_to_theta,
    register,
    rot90,
    rotation,
    scale_x,
    scale_y,
    shear_x,
    shear_y,
    standard_normal,
    theta_to_pixel,
    translate_x,
    translate_y,
    vflip,
    warp_affine,
    zoom,
)

BUNNE_AND_EXTRAS = {
    "rotation", "translate_x", "translate_y", "scale_x", "scale_y", "zoom", "brightness",
    "contrast", "grayscale", "gaussian_blur", "gaussian_noise", "hflip", "vflip", "rot90",
    "shear_x", "shear_y", "affine",
}  # fmt: skip


def dot(H: int, W: int, row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, 1, H, W)
    x[0, 0, row, col] = 1.0
    return x


def peak(img: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the brightest pixel of a [1, 1, H, W] image."""
    return divmod(int(img[0, 0].argmax()), img.shape[-1])


def centroid(img: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted (row, column) of a [1, 1, H, W] image."""
    H, W = img.shape[-2:]
    w = img[0, 0].double()
    rows = torch.arange(H, dtype=torch.float64)[:, None]
    cols = torch.arange(W, dtype=torch.float64)[None, :]
    return float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum())


# ---------------------------------------------------------------------- registry
def test_registry_holds_the_whole_set():
    assert set(list_transforms()) == BUNNE_AND_EXTRAS
    kinds = {name: get_transform(name).kind for name in list_transforms()}
    assert {n for n, k in kinds.items() if k == "discrete"} == {"hflip", "vflip", "rot90"}
    assert {n for n, k in kinds.items() if k == "photometric"} == {
        "brightness",
        "contrast",
        "grayscale",
        "gaussian_blur",
        "gaussian_noise",
    }


def test_spec_facts_follow_the_design_table():
    zoom_spec = get_transform("zoom")
    assert (zoom_spec.identity, zoom_spec.unit) == (1.0, "factor")
    assert zoom_spec.domain == Domain(0.0, math.inf, True, False)
    assert get_transform("brightness").domain == (-1.0, 1.0, False, False)
    assert get_transform("contrast").valid_range == "v >= 0"
    assert get_transform("grayscale").valid_range == "0 <= v <= 1"
    assert get_transform("gaussian_blur").valid_range == "sigma >= 0"
    assert get_transform("rot90").valid_range == "k in {0, 1, 2, 3}"
    assert get_transform("rotation").unit == "degrees"
    assert "counter-clockwise" in get_transform("rotation").sign


def test_unknown_name_lists_known_ones():
    with pytest.raises(
        InvariscopeError, match=r"unknown transform 'rotaton' \(did you mean 'rotation'\?\)"
    ):
        get_transform("rotaton")
    with pytest.raises(InvariscopeError, match="unknown transform"):
        apply("spin", torch.rand(1, 1, 4, 4), 1.0)


def test_apply_matches_the_function_and_checks_options():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(
        apply("rotation", x, 30.0, padding_mode="border"), rotation(x, 30.0, padding_mode="border")
    )
    with pytest.raises(
        InvariscopeError,
        match="rotation: unknown option 'clamp'; valid options: mode, padding_mode",
    ):
        apply("rotation", x, 30.0, clamp=True)
    with pytest.raises(
        InvariscopeError, match="padding_mode 'wrap' is not one of zeros, border, reflection"
    ):
        rotation(x, 30.0, padding_mode="wrap")
    with pytest.raises(InvariscopeError, match="mode 'cubic'"):
        zoom(x, 2.0, mode="cubic")


def test_duplicate_registration_is_refused():
    spec = get_transform("rotation")
    with pytest.raises(ValueError, match="already registered"):
        register(spec)
    assert isinstance(spec, TransformSpec)


def test_images_and_magnitude_shapes_are_checked():
    with pytest.raises(
        InvariscopeError,
        match=r"images must be a float tensor \[B, C, H, W\], got shape \[3, 8, 8\]",
    ):
        rotation(torch.rand(3, 8, 8), 10.0)
    with pytest.raises(InvariscopeError, match="dtype torch.uint8"):
        brightness(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 0.1)
    with pytest.raises(
        InvariscopeError, match=r"magnitude has shape \[3\] but the images have a batch of 2"
    ):
        zoom(torch.rand(2, 1, 8, 8), torch.tensor([1.0, 2.0, 3.0]))
    # a number, a 0-d tensor and a batch of one broadcast
    x = torch.rand(2, 1, 8, 8)
    y = zoom(x, 1.5)
    assert torch.equal(zoom(x, torch.tensor(1.5)), y) and torch.equal(
        zoom(x, torch.tensor([1.5])), y
    )


@pytest.mark.parametrize(
    "name, bad, fragment",
    [
        (
            "zoom",
            0.0,
            "zoom: magnitude 0 outside the valid domain s > 0 (factor; content magnified by s about the centre)",
        ),
        ("scale_x", -1.0, "scale_x: magnitude -1 outside the valid domain s > 0"),
        (
            "gaussian_blur",
            -0.5,
            "gaussian_blur: magnitude -0.5 outside the valid domain sigma >= 0",
        ),
        ("contrast", -0.1, "contrast: magnitude -0.1 outside the valid domain v >= 0"),
        ("grayscale", 1.5, "grayscale: magnitude 1.5 outside the valid domain 0 <= v <= 1"),
        ("brightness", -1.5, "brightness: magnitude -1.5 outside the valid domain -1 <= v <= 1"),
        ("rot90", 1.5, "rot90: magnitude 1.5 outside the valid domain k in {0, 1, 2, 3}"),
        ("hflip", 2.0, "hflip: magnitude 2 outside the valid domain v in {0, 1}"),
        (
            "rotation",
            math.nan,
            "rotation: magnitude nan outside the valid domain any finite angle (degrees;",
        ),
        ("gaussian_noise", -0.2, "gaussian_noise: magnitude -0.2 outside the valid domain v >= 0"),
    ],
)
def test_domain_errors_name_the_transformation_and_its_range(name, bad, fragment):
    with pytest.raises(InvariscopeError) as err:
        apply(name, torch.rand(2, 3, 8, 8), bad)
    assert fragment in str(err.value)


def test_exact_zoom_message():
    with pytest.raises(InvariscopeError) as err:
        zoom(torch.rand(1, 1, 4, 4), 0)
    assert str(err.value) == (
        "zoom: magnitude 0 outside the valid domain s > 0 (factor; content magnified by s about the centre)"
    )


def test_affine_refuses_singular_matrices():
    with pytest.raises(InvariscopeError, match="affine: matrix .* is not invertible"):
        apply("affine", torch.rand(1, 1, 4, 4), torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]]))


# ---------------------------------------------------------------------- warp core and affine_grid
def _random_matrices(B: int, H: int, W: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    angle = torch.rand(B, generator=g) * 360 - 180
    M = get_transform("rotation").matrix(angle, H, W)
    M[:, :, :2] *= 0.8 + 0.6 * torch.rand(B, 1, 1, generator=g)
    M[:, :, 2] += torch.randn(B, 2, generator=g) * 2
    return M


# reflection with align_corners=True mirrors about the edge pixels' centres instead of the
# pixel edges that warp_affine uses, so that pairing is documented as different, not tested
@pytest.mark.parametrize(
    "align_corners, padding_mode",
    [(False, "zeros"), (False, "border"), (False, "reflection"), (True, "zeros"), (True, "border")],
)
def test_pixel_to_theta_drives_affine_grid_like_warp_affine(align_corners, padding_mode):
    H, W = 13, 17
    x = torch.rand(4, 2, H, W, generator=torch.Generator().manual_seed(2))
    M = _random_matrices(4, H, W)
    theta = pixel_to_theta(M, H, W, align_corners=align_corners)
    grid_ = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
    ref = F.grid_sample(x, grid_, padding_mode=padding_mode, align_corners=align_corners)
    torch.testing.assert_close(warp_affine(x, M, padding_mode=padding_mode), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        theta_to_pixel(theta, H, W, align_corners=align_corners), M, atol=1e-4, rtol=1e-5
    )


def test_pixel_to_theta_values_by_hand_and_gradients():
    shift = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])  # one pixel right on a 4-wide image
    torch.testing.assert_close(
        pixel_to_theta(shift, 4, 4), torch.tensor([[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]]])
    )
    torch.testing.assert_close(
        pixel_to_theta(shift, 4, 4, align_corners=True),
        torch.tensor([[[1.0, 0.0, -2 / 3], [0.0, 1.0, 0.0]]]),
    )
    torch.testing.assert_close(pixel_to_theta(torch.eye(2, 3)[None], 5, 9), torch.eye(2, 3)[None])
    # an STN backpropagates through the conversion to the pixel matrix
    M = _random_matrices(1, 5, 6).double().requires_grad_()
    x = torch.rand(1, 1, 5, 6, dtype=torch.float64)

    def stn(m):
        return F.grid_sample(
            x,
            F.affine_grid(pixel_to_theta(m, 5, 6), [1, 1, 5, 6], align_corners=False),
            align_corners=False,
        )

    assert torch.autograd.gradcheck(stn, (M,), eps=1e-6, atol=1e-5)


def test_warp_affine_by_hand_and_shared_matrix():
    x = dot(3, 5, 1, 1)
    right2 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    assert peak(warp_affine(x, right2)) == (1, 3)
    batch = torch.rand(3, 2, 6, 6)
    torch.testing.assert_close(
        warp_affine(batch, right2), warp_affine(batch, right2.expand(3, 2, 3))
    )
    with pytest.raises(InvariscopeError, match=r"matrix must have shape \[B, 2, 3\], got \[3, 3\]"):
        warp_affine(batch, torch.eye(3))
    with pytest.raises(InvariscopeError, match="matrix batch 2 does not match the images' batch 3"):
        warp_affine(batch, right2.expand(2, 2, 3))


def test_padding_modes_fill_as_documented():
    x = torch.arange(1.0, 7.0).view(1, 1, 1, 6).expand(1, 1, 3, 6)  # columns 1..6
    zeros = translate_x(x, 2 / 6)  # two pixels right
    border = translate_x(x, 2 / 6, padding_mode="border")
    reflect = translate_x(x, 2 / 6, padding_mode="reflection")
    torch.testing.assert_close(zeros[0, 0, 0], torch.tensor([0.0, 0, 1, 2, 3, 4]))
    torch.testing.assert_close(border[0, 0, 0], torch.tensor([1.0, 1, 1, 2, 3, 4]))
    torch.testing.assert_close(
        reflect[0, 0, 0], torch.tensor([2.0, 1, 1, 2, 3, 4])
    )  # mirrored about the edge


# ---------------------------------------------------------------------- exact equivalences
@pytest.mark.parametrize("pixels", [1, 3, -2])
def test_integer_translation_equals_roll_away_from_borders(pixels):
    H, W = 15, 20
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(5))
    p = abs(pixels)
    inner = slice(p, -p)
    tx = translate_x(x, pixels / W)
    torch.testing.assert_close(
        tx[..., inner], torch.roll(x, pixels, dims=-1)[..., inner], atol=1e-5, rtol=0
    )
    uncovered = slice(0, p) if pixels > 0 else slice(W - p, W)
    assert float(tx[..., uncovered].abs().max()) < 1e-5  # zeros fill
    ty = translate_y(x, pixels / H)
    torch.testing.assert_close(
        ty[..., inner, :], torch.roll(x, pixels, dims=-2)[..., inner, :], atol=1e-5, rtol=0
    )


def test_rotation_by_multiples_of_90_matches_rot90_and_torch_rot90():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    for k, degrees in [(1, 90.0), (2, 180.0), (3, -90.0), (3, 270.0)]:
        expected = torch.rot90(x, k, dims=(-2, -1))
        assert torch.equal(rot90(x, k), expected)
        torch.testing.assert_close(rotation(x, degrees), expected, atol=1e-5, rtol=0)


def test_rot90_per_image_k_and_shape_rules():
    x = torch.rand(4, 1, 6, 6)
    y = rot90(x, torch.tensor([0, 1, 2, 3]))
    for i in range(4):
        assert torch.equal(y[i], torch.rot90(x[i], i, dims=(-2, -1)))
    wide = torch.rand(2, 1, 4, 7)
    assert torch.equal(rot90(wide, 2), torch.rot90(wide, 2, dims=(-2, -1)))
    with pytest.raises(InvariscopeError, match="rot90: odd k needs square images, got 4x7"):
        rot90(wide, torch.tensor([2, 1]))


def test_flips_match_torch_flip():
    x = torch.rand(3, 2, 5, 7)
    assert torch.equal(hflip(x), torch.flip(x, dims=(-1,)))
    assert torch.equal(vflip(x), torch.flip(x, dims=(-2,)))
    y = hflip(x, torch.tensor([1, 0, 1]))
    assert torch.equal(y[1], x[1]) and torch.equal(y[2], torch.flip(x[2], dims=(-1,)))
    torch.testing.assert_close(
        warp_affine(x, get_transform("hflip").matrix(1, 5, 7)), hflip(x), atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------- signs by hand
def test_translate_x_positive_moves_right_and_translate_y_positive_moves_down():
    x = dot(16, 20, 8, 5)
    assert peak(translate_x(x, 0.1)) == (8, 7)  # 0.1 * 20 = 2 pixels right
    assert peak(translate_x(x, -0.2)) == (8, 1)
    assert peak(translate_y(x, 0.25)) == (12, 5)  # 0.25 * 16 = 4 pixels down


def test_rotation_positive_is_counter_clockwise_as_displayed():
    H, W = 17, 21  # centre (row 8, column 10)
    x = dot(H, W, 8, 14)  # 4 pixels right of the centre
    assert peak(rotation(x, 90.0)) == (4, 10)  # now 4 pixels ABOVE the centre
    assert peak(rotation(x, -90.0)) == (12, 10)
    row, col = centroid(rotation(x, 30.0))  # up and still right (bilinear blur: ~0.05 px)
    assert row == pytest.approx(8 - 4 * math.sin(math.radians(30)), abs=0.05)
    assert col == pytest.approx(10 + 4 * math.cos(math.radians(30)), abs=0.05)


def test_zoom_and_scales_multiply_distances_from_the_centre():
    x = dot(17, 17, 8, 11)  # 3 pixels right of the centre (8, 8)
    assert peak(zoom(x, 2.0)) == (8, 14)  # distance doubled
    assert centroid(zoom(x, 2.0)) == pytest.approx((8.0, 14.0), abs=1e-4)
    assert centroid(zoom(dot(17, 17, 4, 8), 0.5)) == pytest.approx((6.0, 8.0), abs=1e-4)  # halved
    assert peak(scale_x(x, 2.0)) == (8, 14)
    assert peak(scale_y(x, 2.0)) == (8, 11)  # a horizontal offset is not scaled vertically
    assert peak(scale_y(dot(17, 17, 5, 8), 2.0)) == (2, 8)


def test_shear_signs():
    assert peak(shear_x(dot(17, 17, 12, 8), 0.5)) == (12, 10)  # below the centre -> right
    assert peak(shear_x(dot(17, 17, 4, 8), 0.5)) == (4, 6)  # above -> left
    assert peak(shear_y(dot(17, 17, 8, 12), 0.5)) == (10, 12)  # right of the centre -> down


def test_rotation_then_inverse_restores_a_smooth_image_in_the_centre():
    y, x = torch.meshgrid(torch.linspace(0, 1, 33), torch.linspace(0, 1, 33), indexing="ij")
    img = (
        (0.5 + 0.3 * torch.sin(3 * x + 2 * y) * torch.cos(2 * x - y))
        .view(1, 1, 33, 33)
        .repeat(2, 3, 1, 1)
    )
    for a in (37.0, 90.0, 135.0):
        back = rotation(rotation(img, a), -a)
        torch.testing.assert_close(
            back[..., 10:23, 10:23], img[..., 10:23, 10:23], atol=2e-3, rtol=0
        )
    lost = rotation(rotation(img, 45.0), -45.0)  # applied one after the other, the corners are lost
    assert float(lost[..., 0, 0].max()) < 1e-6


# ---------------------------------------------------------------------- photometric by hand
def test_brightness_and_contrast_by_hand():
    x = torch.tensor([0.2, 0.4, 0.9]).view(1, 1, 1, 3)
    torch.testing.assert_close(brightness(x, 0.3).flatten(), torch.tensor([0.5, 0.7, 1.0]))
    torch.testing.assert_close(
        brightness(x, 0.3, clamp=False).flatten(), torch.tensor([0.5, 0.7, 1.2])
    )
    torch.testing.assert_close(brightness(x, -0.3).flatten(), torch.tensor([0.0, 0.1, 0.6]))
    torch.testing.assert_close(contrast(x, 1.5).flatten(), torch.tensor([0.3, 0.6, 1.0]))
    torch.testing.assert_close(
        contrast(x, 1.5, clamp=False).flatten(), torch.tensor([0.3, 0.6, 1.35])
    )
    assert torch.equal(contrast(x, 0.0), torch.zeros_like(x))


def test_grayscale_by_hand():
    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    gray = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6  # 0.363
    torch.testing.assert_close(grayscale(x, 1.0).flatten(), torch.full((3,), gray))
    torch.testing.assert_close(
        grayscale(x, 0.5).flatten(),
        torch.tensor([0.5 * 0.2 + 0.5 * gray, 0.5 * 0.4 + 0.5 * gray, 0.5 * 0.6 + 0.5 * gray]),
    )
    one = torch.rand(2, 1, 4, 4)
    assert torch.equal(grayscale(one, 0.7), one)  # already grey
    with pytest.raises(InvariscopeError, match="grayscale: needs 1 or 3 channels"):
        grayscale(torch.rand(1, 4, 3, 3), 0.5)


def test_gaussian_blur_matches_scipy_per_image_sigma_and_zero_is_exact():
    x = torch.rand(3, 2, 20, 23, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    sigmas = torch.tensor([0.0, 1.0, 1.7], dtype=torch.float64)
    y = gaussian_blur(x, sigmas)
    assert torch.equal(y[0], x[0])  # sigma 0 returns the input exactly, even next to blurred images
    for i in (1, 2):
        ref = ndimage.gaussian_filter(
            x[i].numpy(), sigma=(0, float(sigmas[i]), float(sigmas[i])), mode="mirror", truncate=4.0
        )
        tol = (
            1e-10 if i == 2 else 1e-4
        )  # image 1 sees a wider window (sigma_max's), see the docstring
        np.testing.assert_allclose(y[i].numpy(), ref, atol=tol)
    flat = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)  # a constant image stays constant
    big = gaussian_blur(torch.rand(1, 1, 5, 5), 10.0)  # wider than the image: the window is capped
    assert big.shape == (1, 1, 5, 5) and bool(torch.isfinite(big).all())
    with pytest.raises(InvariscopeError, match="border_type 'mirror' is not one of"):
        gaussian_blur(x, 1.0, border_type="mirror")


def test_gaussian_noise_is_seeded_per_image_and_linear_in_magnitude():
    x = torch.full((3, 3, 8, 9), 0.5)
    seeds = torch.tensor([4, 5, 6])
    a = gaussian_noise(x, 0.1, seed=seeds)
    assert torch.equal(a, gaussian_noise(x, 0.1, seed=seeds))  # same seed -> identical
    assert not torch.allclose(
        a, gaussian_noise(x, 0.1, seed=seeds + 10)
    )  # other seeds -> different
    assert not torch.allclose(a[0], a[1])  # different images get different noise
    # an image's noise depends only on its seed: not on its position in the batch
    assert torch.equal(gaussian_noise(x[2:], 0.1, seed=torch.tensor([6])), a[2:])
    assert torch.equal(
        gaussian_noise(x, 0.1, seed=4), a
    )  # an int seed s gives image i the seed s + i
    # same z for every magnitude: linear before clamping
    v = torch.tensor([0.05, 0.2, 0.7])
    one = gaussian_noise(x, v, seed=seeds, clamp=False) - x
    two = gaussian_noise(x, 2 * v, seed=seeds, clamp=False) - x
    torch.testing.assert_close(two, 2 * one, atol=1e-6, rtol=0)
    clamped = gaussian_noise(x, 0.7, seed=seeds)
    assert float(clamped.min()) >= 0.0 and float(clamped.max()) <= 1.0
    # independent of dtype; the global random state is left alone
    state = torch.random.get_rng_state()
    torch.testing.assert_close(
        gaussian_noise(x.double(), 0.1, seed=seeds).float(), a, atol=1e-7, rtol=0
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(GaussianNoise(0.1, seed=seeds)(x), a)


def test_noise_field_is_standard_normal():
    z = standard_normal(0, (3, 64, 64), 2)
    assert z.shape == (2, 3, 64, 64)
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    assert torch.equal(
        standard_normal(torch.tensor([1, 1]), (3, 64, 64), 2)[0], z[1]
    )  # repeated seeds


def test_noise_seed_errors():
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(
        InvariscopeError,
        match=r"seed has shape \[3\]; pass an int or one seed per image, shape \[2\]",
    ):
        gaussian_noise(x, 0.1, seed=torch.tensor([1, 2, 3]))
    with pytest.raises(InvariscopeError, match="seed must be an integer tensor"):
        gaussian_noise(x, 0.1, seed=torch.tensor([1.0, 2.0]))
    with pytest.raises(InvariscopeError, match="seed must be an int"):
        gaussian_noise(x, 0.1, seed="a")


# ---------------------------------------------------------------------- composition
def test_compose_fuses_consecutive_warps_into_one():
    x = torch.rand(2, 3, 15, 15, generator=torch.Generator().manual_seed(9))
    fused = compose(
        x,
        [
            ("rotation", 30.0),
            ("zoom", 0.5),
            ("translate_x", 0.1),
            ("translate_x", -0.1),
            ("zoom", 2.0),
            ("rotation", -30.0),
        ],
    )
    torch.testing.assert_close(fused, x, atol=1e-5, rtol=0)  # one identity warp: nothing is lost
    broken = compose(x, [("rotation", 30.0), ("brightness", 0.0), ("rotation", -30.0)])
    assert (
        float(broken[..., 0, 0].abs().max()) < 1e-6
    )  # a photometric step splits the run: corners lost
    split = compose(x, [("rotation", 30.0), ("rotation", -30.0, {"padding_mode": "border"})])
    assert float((split - x).abs().max()) > 0.05  # different padding modes are not fused


def test_compose_matrix_order_and_exact_discrete_runs():
    M = compose_matrix([("translate_x", 0.25), ("hflip", 1)], 4, 4)
    torch.testing.assert_close(M, torch.tensor([[[-1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]]))
    x = torch.rand(2, 3, 6, 6)
    assert torch.equal(
        compose(x, [("hflip", 1), ("rot90", 1), ("hflip", 1), ("rot90", 1)]),
        torch.rot90(torch.flip(torch.rot90(torch.flip(x, (-1,)), 1, (-2, -1)), (-1,)), 1, (-2, -1)),
    )
    with pytest.raises(InvariscopeError, match="'brightness' is photometric and has no matrix"):
        compose_matrix([("rotation", 1.0), ("brightness", 0.1)], 4, 4)


def test_compose_options_module_and_errors():
    x = torch.full((2, 1, 6, 6), 0.9)
    assert float(compose(x, [("brightness", 0.5)], clamp=False).max()) == pytest.approx(1.4)
    assert float(compose(x, [("brightness", 0.5)]).max()) == 1.0
    seeds = torch.tensor([1, 2])
    assert torch.equal(
        compose(x, [("gaussian_noise", 0.1)], seed=seeds), gaussian_noise(x, 0.1, seed=seeds)
    )
    steps = [("zoom", 1.2), ("rotation", 15.0), ("contrast", 0.8)]
    assert torch.equal(
        Compose(steps, padding_mode="border")(x), compose(x, steps, padding_mode="border")
    )
    with pytest.raises(InvariscopeError, match="compose: step 0 must be"):
        compose(x, [("rotation",)])
    with pytest.raises(InvariscopeError, match="compose: unknown option 'colour'"):
        compose(x, [("rotation", 1.0)], colour=1)
    with pytest.raises(InvariscopeError, match="unknown transform"):
        Compose([("spin", 1.0)])


def test_module_repr_and_forward_override():
    m = Rotation(30.0, padding_mode="border")
    assert "magnitude=30.0" in repr(m) and "padding_mode='border'" in repr(m)
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(m(x, 45.0), rotation(x, 45.0, padding_mode="border"))


# ---------------------------------------------------------------------- sweeps
def test_magnitudes_inclusive_stop_and_identity():
    assert get_transform("rotation").magnitudes((-30, 30, 5)).tolist() == list(range(-30, 35, 5))
    values = get_transform("grayscale").magnitudes((0, 1, 0.1)).tolist()
    assert len(values) == 11 and values[3] == 0.3 and values[-1] == 1.0
    assert get_transform("zoom").magnitudes((0.3, 2.0, 0.5)).tolist() == [0.3, 0.8, 1.0, 1.3, 1.8]
    assert get_transform("rotation").magnitudes("10:20:5").tolist() == [
        10.0,
        15.0,
        20.0,
    ]  # 0 outside
    assert 0.0 in get_transform("rotation").magnitudes().tolist()
    assert get_transform("rot90").magnitudes().tolist() == [0.0, 1.0, 2.0, 3.0]
    for bad, fragment in [
        ((30, -30, 5), "start 30 is above stop -30"),
        ((0, 1, 0), "step must be > 0"),
        ((0, 2, 0.5), "zoom: magnitude 0 outside"),
    ]:
        with pytest.raises(InvariscopeError, match=fragment):
            get_transform("zoom" if "zoom" in fragment else "rotation").magnitudes(bad)
    with pytest.raises(InvariscopeError, match="affine: has no scalar sweep"):
        get_transform("affine").magnitudes()


def test_parse_range():
    assert parse_range("rotation=-30:30:5") == ("rotation", -30.0, 30.0, 5.0)
    assert parse_range(" zoom = 0.5:2 ") == ("zoom", 0.5, 2.0, 0.25)  # default step
    for text, fragment in [
        ("rotation", "expected NAME=LOW:HIGH[:STEP]"),
        ("rotation=1:2:3:4", "expected NAME=LOW:HIGH"),
        ("rotation=a:5", "'a' is not a number"),
        ("spin=-3:3", "unknown transform 'spin'"),
        ("zoom=-1:2", "zoom: magnitude -1 outside the valid domain s > 0"),
        ("rotation=30:-30", "above stop"),
        ("rotation=-30:30:0", "step must be > 0"),
        ("affine=0:1", "affine has no scalar sweep"),
    ]:
        with pytest.raises(
            InvariscopeError, match=fragment.replace("[", r"\[").replace("]", r"\]")
        ):
            parse_range(text)


def test_grid_is_tidy_and_feeds_compose():
    df = grid("rotation", [0.0, 90.0, 180.0], "zoom", "1:2:0.5")
    assert list(df.columns) == ["name_a", "a", "name_b", "b"]
    assert len(df) == 9 and set(df.name_a) == {"rotation"} and set(df.name_b) == {"zoom"}
    assert df.a.tolist() == [0.0] * 3 + [90.0] * 3 + [180.0] * 3
    assert df.b.tolist() == [1.0, 1.5, 2.0] * 3
    default = grid("translate_x", None, "translate_y", None)
    assert len(default) == len(get_transform("translate_x").magnitudes()) ** 2
    x = torch.rand(1, 3, 9, 9)
    out = compose(x.expand(len(df), -1, -1, -1), grid_steps(df))
    for i in (0, 4, 8):
        row = df.iloc[i]
        torch.testing.assert_close(
            out[i : i + 1], compose(x, [("rotation", row.a), ("zoom", row.b)]), atol=1e-5, rtol=0
        )
    with pytest.raises(InvariscopeError, match="zoom: magnitude 0 outside"):
        grid("rotation", [0.0], "zoom", [0.0, 1.0])


# ---------------------------------------------------------------------- docstring examples
@pytest.mark.parametrize(
    "module", ["", ".registry", ".warp", ".geometric", ".photometric", ".compose", ".sweep"]
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module("invariscope.transforms" + module))
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------- padding conventions (README)
def test_blur_reflect_mirrors_about_the_edge_pixel():
    # a ramp 0, 1, 2, ... along x: the padded values decide the result next to the border
    ramp = torch.arange(12.0, dtype=torch.float64).view(1, 1, 1, 12).expand(1, 1, 9, 12) / 11
    row = ramp[0, 0, 4].numpy()
    got = gaussian_blur(ramp, 1.5, clamp=False)[0, 0, 4].numpy()
    # scipy's "mirror" extends 0 1 2 ... as ... 2 1 | 0 1 2 (edge pixel not repeated) ...
    mirror = ndimage.gaussian_filter1d(row, 1.5, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(got, mirror, atol=1e-12)
    # ... not as scipy's "reflect" (... 1 0 | 0 1 2, edge pixel repeated), which differs by
    # more than 0.01 at the first pixel
    reflect = ndimage.gaussian_filter1d(row, 1.5, mode="reflect", truncate=4.0)
    assert abs(got[0] - reflect[0]) > 0.01
    # by hand at the first pixel with sigma small enough for a 3-tap kernel (radius 1):
    # mirror pads x[-1] = x[1], so out[0] = w0 x[0] + 2 w1 x[1]
    w = np.exp(-0.5 * np.arange(-1, 2) ** 2 / 0.25**2)
    w /= w.sum()
    first = gaussian_blur(ramp, 0.25, clamp=False)[0, 0, 4, 0].item()
    assert first == pytest.approx(w[1] * row[0] + 2 * w[0] * row[1], abs=1e-12)


@pytest.mark.parametrize("pixels", [1.5, -2.3, 0.4, 3.7])
def test_warp_reflection_mirrors_about_the_pixel_edge(pixels):
    W, H = 10, 7
    x = torch.rand(1, 1, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = translate_x(x, pixels / W, padding_mode="reflection")[0, 0].numpy()
    # scipy's "reflect" (pixel -1 reads pixel 0: the edge pixel is repeated), exactly
    want = ndimage.shift(x[0, 0].numpy(), (0, pixels), order=1, mode="reflect")
    np.testing.assert_allclose(got, want, atol=1e-12)
    other = ndimage.shift(x[0, 0].numpy(), (0, pixels), order=1, mode="mirror")
    assert np.abs(got - other).max() > 0.05
    got_y = translate_y(x, pixels / H, padding_mode="reflection")[0, 0].numpy()
    want_y = ndimage.shift(x[0, 0].numpy(), (pixels, 0), order=1, mode="reflect")
    np.testing.assert_allclose(got_y, want_y, atol=1e-12)


def test_warp_reflection_by_hand_at_a_half_pixel_shift():
    # columns 1..6 moved 1.5 px right: output pixel 0 reads x = -1.5, mirrored about the
    # edge at -0.5 to 0.5, halfway between pixels 0 and 1 -> (1 + 2) / 2; pixel 1 reads
    # -0.5, the edge itself -> pixel 0's value 1
    x = torch.arange(1.0, 7.0).view(1, 1, 1, 6).expand(1, 1, 3, 6)
    out = translate_x(x, 1.5 / 6, padding_mode="reflection")[0, 0, 1]
    torch.testing.assert_close(out, torch.tensor([1.5, 1.0, 1.5, 2.5, 3.5, 4.5]))


def test_grayscale_uses_bt601_weights():
    x = torch.eye(3).view(3, 3, 1, 1)  # pure red, green, blue
    grey = grayscale(x, 1.0)[:, 0, 0, 0]
    torch.testing.assert_close(grey, torch.tensor([0.299, 0.587, 0.114]))


# ------------------------------------------------------------- compose and rot90 shapes
def test_compose_refuses_odd_rot90_on_non_square_images():
    wide = torch.rand(2, 1, 48, 64)
    message = r"rot90 \(step 0\): odd k needs square images, got 48x64"
    with pytest.raises(InvariscopeError, match=message):
        compose(wide, [("rot90", 1), ("translate_x", 0.1)])  # would be fused into one warp
    with pytest.raises(InvariscopeError, match=message):
        compose(wide, [("rot90", 3)])
    with pytest.raises(InvariscopeError, match=r"rot90 \(step 1\): odd k needs square images"):
        compose(wide, [("zoom", 1.2), ("rot90", torch.tensor([2, 1])), ("rotation", 5.0)])
    with pytest.raises(InvariscopeError, match="rot90: odd k needs square images, got 48x64"):
        apply("rot90", wide, 1)
    with pytest.raises(InvariscopeError, match="odd k needs square images"):
        Compose([("rot90", 1), ("translate_x", 0.1)])(wide)
    # the message is one line
    with pytest.raises(InvariscopeError) as info:
        compose(wide, [("rot90", 1), ("translate_x", 0.1)])
    assert "\n" not in str(info.value)


def test_compose_rot90_on_square_or_with_even_k_still_works():
    square = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(11))
    fused = compose(square, [("rot90", 1), ("translate_x", 2 / 16)])
    # one exact warp: the quarter turn, then two pixels right
    expected = translate_x(torch.rot90(square, 1, dims=(-2, -1)), 2 / 16)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)
    wide = torch.rand(2, 1, 6, 10, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(
        compose(wide, [("rot90", 2), ("translate_x", 0.0)]),
        torch.rot90(wide, 2, dims=(-2, -1)),
        atol=1e-5,
        rtol=0,
    )
    assert torch.equal(compose(wide, [("rot90", 2)]), torch.rot90(wide, 2, dims=(-2, -1)))
    assert torch.equal(compose(wide, [("rot90", 0), ("hflip", 1)]), torch.flip(wide, (-1,)))
