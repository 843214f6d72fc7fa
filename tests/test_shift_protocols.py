"""Small-shift protocols (invariscope.transforms.shift): inpainting, embedding, the five
shift protocols, ImageNet-P sequences, 2-D offsets for consistency, and bad input.
Expected values are computed by hand or from an independent construction (torch.roll,
slicing, F.interpolate), never from the code under test."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import invariscope.transforms.shift as shift_module
from invariscope.errors import InvariscopeError
from invariscope.transforms import get_transform, translate_x
from invariscope.transforms.shift import (
    DIRECTIONS,
    FILLS,
    PROTOCOLS,
    ShiftProtocol,
    embed,
    inpaint,
    parse_protocol,
)

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)


def _small(images, h, w):
    return F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def test_module_doctests():
    result = doctest.testmod(shift_module)
    assert result.failed == 0 and result.attempted > 0


def test_names():
    assert PROTOCOLS == ("embed", "crop", "scale", "circular", "subpixel")
    assert DIRECTIONS == ("vertical", "horizontal", "diagonal")
    assert FILLS == ("black", "mean", "inpaint")


# ---------------------------------------------------------------------- inpainting
def test_inpaint_fills_every_pixel_and_keeps_known_pixels_bit_exact():
    x = _rand(2, 3, 12, 10, seed=1)
    mask = _rand(2, 1, 12, 10, seed=2) < 0.2
    mask[:, :, 0, 0] = True  # at least one known pixel per image
    holes = torch.where(mask, x, torch.full_like(x, float("nan")))  # unknown values are ignored
    out = inpaint(holes, mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all())  # every pixel filled (no NaN survives)
    m = mask.expand_as(x)
    assert torch.equal(out[m], x[m])
    # filled values are weighted averages of known ones: inside their per-channel range
    for b in range(2):
        for c in range(3):
            known = x[b, c][mask[b, 0]]
            assert float(out[b, c].min()) >= float(known.min()) - 1e-6
            assert float(out[b, c].max()) <= float(known.max()) + 1e-6


def test_inpaint_constant_image_with_holes_is_the_constant():
    x = torch.full((1, 3, 9, 13), 0.37)
    mask = torch.ones(1, 1, 9, 13, dtype=torch.bool)
    mask[:, :, 2:7, 3:11] = False
    mask[:, :, :, 0] = False
    out = inpaint(torch.where(mask, x, torch.zeros_like(x)), mask)
    assert torch.allclose(out, x, atol=1e-6, rtol=0)


def test_inpaint_one_known_pixel_fills_everything_with_it():
    x = torch.zeros(1, 1, 9, 11, dtype=torch.float64)
    x[0, 0, 3, 5] = 0.6
    mask = torch.zeros(1, 1, 9, 11, dtype=torch.bool)
    mask[0, 0, 3, 5] = True
    out = inpaint(x, mask)
    assert torch.allclose(out, torch.full_like(x, 0.6), atol=1e-12, rtol=0)


def test_inpaint_values_by_hand_binomial_kernel():
    # one row [a, ?, ?, b], kernel 5 = [1, 4, 6, 4, 1] / 16 (zero padding): pixel 1 sees a
    # at distance 1 (weight 4) and b at distance 2 (weight 1): (4a + b) / 5; pixel 2 the mirror.
    a, b = 0.2, 0.7
    x = torch.tensor([[[[a, 0.0, 0.0, b]]]], dtype=torch.float64)
    mask = torch.tensor([[[[True, False, False, True]]]])
    out = inpaint(x, mask)
    expected = [a, (4 * a + b) / 5, (a + 4 * b) / 5, b]  # 0.2, 0.3, 0.6, 0.7
    assert out.flatten().tolist() == pytest.approx(expected, abs=1e-12)
    # kernel 3 = [1, 2, 1] / 4: each hole sees only its known neighbour first
    out3 = inpaint(x, mask, kernel_size=3)
    assert out3.flatten().tolist() == pytest.approx([a, a, b, b], abs=1e-12)


def test_inpaint_broadcasts_one_mask_and_refuses_empty_masks():
    x = _rand(3, 2, 6, 6, seed=3)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2:4, 2:4] = True
    out = inpaint(x, mask)
    assert torch.equal(out[..., 2:4, 2:4], x[..., 2:4, 2:4])
    per_image = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    per_image[1] = False
    with pytest.raises(InvariscopeError, match="image 1 has no known pixel"):
        inpaint(x[:2], per_image)
    with pytest.raises(InvariscopeError, match="bool"):
        inpaint(x, mask.float())
    with pytest.raises(InvariscopeError, match="odd"):
        inpaint(x, mask, kernel_size=4)


# ---------------------------------------------------------------------- embed
def test_embed_black_places_the_resized_image_and_zeros_elsewhere():
    x = _rand(2, 3, 16, 16, seed=4)
    top, left = torch.tensor([2, 5]), torch.tensor([6, 0])
    out = embed(x, top, left, factor=0.5, fill="black")
    small = _small(x, 8, 8)
    inside = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    for b in range(2):
        t, lft = int(top[b]), int(left[b])
        assert torch.equal(out[b, :, t : t + 8, lft : lft + 8], small[b])
        inside[b, :, t : t + 8, lft : lft + 8] = True
    assert torch.equal(out[~inside.expand_as(out)], torch.zeros(int((~inside).sum()) * 3))


def test_embed_mean_fills_with_the_small_images_mean_colour():
    x = _rand(2, 3, 16, 12, seed=5)
    out = embed(x, 3, 1, size=(8, 6), fill="mean")
    small = _small(x, 8, 6)
    assert torch.equal(out[:, :, 3:11, 1:7], small)
    mean = small.mean(dim=(-2, -1))  # [2, 3]
    outside = out.clone()
    outside[:, :, 3:11, 1:7] = float("nan")
    for b in range(2):
        for c in range(3):
            vals = outside[b, c][~torch.isnan(outside[b, c])]
            assert vals.numel() == 16 * 12 - 8 * 6
            assert torch.allclose(vals, mean[b, c].expand_as(vals), atol=1e-7, rtol=0)


def test_embed_inpaint_keeps_the_block_and_fills_with_its_colours():
    x = _rand(1, 3, 16, 16, seed=6)
    out = embed(x, 4, 4)  # default: factor 0.5, inpaint
    small = _small(x, 8, 8)
    assert torch.equal(out[:, :, 4:12, 4:12], small)
    for c in range(3):
        assert float(out[0, c].min()) >= float(small[0, c].min()) - 1e-6
        assert float(out[0, c].max()) <= float(small[0, c].max()) + 1e-6
    # the border next to the block continues it: pixel above the top-left corner is
    # close to the block's top row (not black)
    assert float(out[0, :, 3, 4:12].mean()) > 0.2


def test_embed_refuses_positions_outside_the_canvas():
    x = _rand(1, 1, 16, 16)
    with pytest.raises(InvariscopeError, match="top in 0..8"):
        embed(x, 9, 0, fill="black")
    with pytest.raises(InvariscopeError, match="left in 0..8"):
        embed(x, 0, -1, fill="black")
    with pytest.raises(InvariscopeError, match="whole pixels"):
        embed(x, 0.5, 0, fill="black")
    with pytest.raises(InvariscopeError, match="fill 'white'"):
        embed(x, 0, 0, fill="white")


# ---------------------------------------------------------------------- embed protocol
def test_embed_frames_are_exact_one_pixel_vertical_shifts():
    x = _rand(2, 3, 16, 16, seed=7)
    p = ShiftProtocol("embed", steps=5, fill="black")
    frames = [p.frame(x, t) for t in range(5)]
    # sweep centred: first top = (16 - 8 - 4) // 2 = 2, left centred = (16 - 8) // 2 = 4
    assert torch.equal(frames[0][:, :, 2:10, 4:12], _small(x, 8, 8))
    assert torch.equal(frames[4][:, :, 6:14, 4:12], _small(x, 8, 8))
    for t in range(4):
        assert torch.equal(torch.roll(frames[t], 1, dims=-2), frames[t + 1])
        assert not torch.equal(frames[t], frames[t + 1])


def test_embed_diagonal_frames_shift_both_axes():
    x = _rand(1, 1, 16, 16, seed=8)
    p = ShiftProtocol("embed", steps=3, direction="diagonal", fill="black")
    f0, f1 = p.frame(x, 0), p.frame(x, 1)
    assert torch.equal(torch.roll(f0, (1, 1), dims=(-2, -1)), f1)
    # first top-left = ((16 - 8 - 2) // 2, same) = (3, 3)
    assert torch.equal(f0[:, :, 3:11, 3:11], _small(x, 8, 8))


def test_embed_at_offsets_from_the_top_left_free_position():
    x = _rand(2, 1, 16, 16, seed=9)
    p = ShiftProtocol("embed", fill="black", steps=4)
    out = p.at(x, torch.tensor([0.0, 8.0]), torch.tensor([8.0, 0.0]))
    small = _small(x, 8, 8)
    assert torch.equal(out[0, :, 0:8, 8:16], small[0])
    assert torch.equal(out[1, :, 8:16, 0:8], small[1])
    assert float(out[0, :, 8:, :].abs().sum()) == 0.0
    assert p.max_offset(16, 16) == 8
    with pytest.raises(InvariscopeError, match="0..8"):
        p.at(x, 9, 0)


# ---------------------------------------------------------------------- crop
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_crop_frames_are_one_pixel_shifts(direction):
    x = _rand(2, 3, 12, 12, seed=10)
    p = ShiftProtocol("crop", steps=5, direction=direction)
    frames = [p.frame(x, t) for t in range(5)]
    big = _small(x, 16, 16)  # enlarged by the margin steps - 1 = 4 on both axes
    dy, dx = {"vertical": (1, 0), "horizontal": (0, 1), "diagonal": (1, 1)}[direction]
    for t in range(5):
        assert frames[t].shape == x.shape
        oy = t if dy else 2
        ox = t if dx else 2
        assert torch.equal(frames[t], big[..., oy : oy + 12, ox : ox + 12])
    for t in range(4):
        a, b = frames[t], frames[t + 1]
        # b is a moved up/left by one pixel: b[i] == a[i + 1] on the overlap
        assert torch.equal(b[..., : 12 - dy, : 12 - dx], a[..., dy:, dx:])
        assert not torch.equal(a, b)


def test_crop_at_takes_per_image_windows_and_keeps_non_square_sizes():
    x = _rand(2, 1, 12, 12, seed=11)
    p = ShiftProtocol("crop", steps=5)
    out = p.at(x, torch.tensor([0, 4]), torch.tensor([3, 1]))
    big = _small(x, 16, 16)
    assert torch.equal(out[0], big[0, :, 0:12, 3:15])
    assert torch.equal(out[1], big[1, :, 4:16, 1:13])
    assert p.max_offset(12, 12) == 4
    with pytest.raises(InvariscopeError, match="0..4"):
        p.at(x, 5, 0)
    wide = _rand(1, 3, 12, 20, seed=12)
    assert p.frame(wide, 3).shape == wide.shape
    assert p.at(wide, 4, 4).shape == wide.shape


# ---------------------------------------------------------------------- circular
def test_circular_frames_are_torch_roll():
    x = _rand(2, 3, 7, 9, seed=13)
    for t in range(4):
        v = ShiftProtocol("circular", steps=4).frame(x, t)
        h = ShiftProtocol("circular", steps=4, direction="horizontal").frame(x, t)
        d = ShiftProtocol("circular", steps=4, direction="diagonal").frame(x, t)
        assert torch.equal(v, torch.roll(x, t, dims=-2))
        assert torch.equal(h, torch.roll(x, t, dims=-1))
        assert torch.equal(d, torch.roll(torch.roll(x, t, dims=-2), t, dims=-1))


def test_circular_at_rolls_each_image_by_its_own_offset():
    x = _rand(2, 3, 7, 9, seed=14)
    p = ShiftProtocol("circular")
    out = p.at(x, torch.tensor([1.0, -3.0]), torch.tensor([5.0, 0.0]))
    assert torch.equal(out[0], torch.roll(x[0], (1, 5), dims=(-2, -1)))
    assert torch.equal(out[1], torch.roll(x[1], (-3, 0), dims=(-2, -1)))
    assert p.max_offset(7, 9) == 6


# ---------------------------------------------------------------------- subpixel
def test_subpixel_four_quarter_steps_make_one_pixel():
    x = _rand(2, 3, 12, 12, seed=15)
    p = ShiftProtocol("subpixel", steps=5)
    assert torch.allclose(p.frame(x, 0), x, atol=1e-6, rtol=0)
    f4 = p.frame(x, 4)  # 4 * 0.25 = 1 px down
    assert torch.allclose(f4[..., 1:, :], x[..., :-1, :], atol=1e-5, rtol=0)
    assert float(f4[..., 0, :].abs().max()) < 1e-6  # zeros enter at the top
    h4 = ShiftProtocol("subpixel", steps=5, direction="horizontal").frame(x, 4)
    assert torch.allclose(h4[..., :, 1:], x[..., :, :-1], atol=1e-5, rtol=0)
    # half a pixel right: bilinear average of the two neighbours
    half = p.at(x, 0.0, torch.tensor([0.5, 0.5]))
    expected = (x[..., :, 1:] + x[..., :, :-1]) / 2
    assert torch.allclose(half[..., :, 1:], expected, atol=1e-5, rtol=0)
    assert p.max_offset(12, 12) == 1  # ceil(4 * 0.25)
    assert ShiftProtocol("subpixel").max_offset(32, 32) == 4  # ceil(15 * 0.25)


# ---------------------------------------------------------------------- scale
def test_scale_frames_grow_one_pixel_per_step():
    x = torch.ones(1, 1, 20, 20)
    p = ShiftProtocol("scale", steps=6, fill="black")
    for t in range(6):
        f = p.frame(x, t)
        rows = (f[0, 0] > 0).any(1).nonzero().flatten()
        cols = (f[0, 0] > 0).any(0).nonzero().flatten()
        size = 10 + t - 3  # 0.5 * 20 = 10, T // 2 = 3: sizes 7..12
        top = (20 - size) // 2
        assert (int(rows[0]), int(rows[-1]) + 1) == (top, top + size)
        assert (int(cols[0]), int(cols[-1]) + 1) == (top, top + size)
        assert torch.allclose(f[0, 0, top : top + size, top : top + size], torch.ones(size, size))
    with pytest.raises(InvariscopeError, match="2x2"):
        ShiftProtocol("scale", steps=20, fill="black").frame(x, 0)


# ---------------------------------------------------------------------- sequences
def test_sequence_rotation_matches_the_registered_transform():
    x = _rand(2, 3, 16, 16, seed=16)
    p = parse_protocol("sequence:rotation", steps=5)
    rotation = get_transform("rotation")
    for t in range(5):
        assert torch.equal(p.frame(x, t), rotation(x, t * 1.0))
    assert p.reference == "adjacent" and p.unit == "degrees"
    assert not p.supports_2d


def test_sequence_translate_default_step_is_one_pixel():
    x = _rand(1, 1, 8, 10, seed=17)
    p = parse_protocol("sequence:translate_x", steps=4)
    assert p.positions(8, 10).tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert torch.equal(p.frame(x, 3), translate_x(x, 0.3))
    # one pixel right: columns move by exactly one
    assert torch.allclose(p.frame(x, 1)[..., 1:], x[..., :-1], atol=1e-5, rtol=0)


def test_sequence_gaussian_noise_frames_are_fresh_but_reproducible():
    x = torch.full((2, 3, 8, 8), 0.5)
    p = parse_protocol("sequence:gaussian_noise", steps=3)
    f = [p.frame(x, t) for t in range(3)]
    assert not torch.equal(f[0], f[1]) and not torch.equal(f[1], f[2])
    assert torch.equal(f[1], p.frame(x, 1))
    assert p.reference == "first" and p.unit == "frame"
    assert p.positions(8, 8).tolist() == [0.0, 1.0, 2.0]
    # noise std ~ step 0.05 (clamping is negligible at 0.5)
    assert float((f[2] - x).std()) == pytest.approx(0.05, rel=0.2)
    # the noise of an image depends on its own seed, not on its position in the batch
    both = p.frame(x, 2, seed=torch.tensor([7, 8]))
    one = p.frame(x[1:], 2, seed=torch.tensor([8]))
    assert torch.equal(both[1:], one)
    # images of a batch get different noise
    assert not torch.equal(f[0][0], f[0][1])


def test_sequence_positions_and_domain_errors():
    assert parse_protocol("sequence:zoom", steps=3).positions(8, 8).tolist() == [1.0, 1.01, 1.02]
    assert parse_protocol("sequence:contrast", steps=3).positions(8, 8).tolist() == [
        1.0,
        0.99,
        0.98,
    ]
    assert parse_protocol("sequence:gaussian_blur", steps=3, step=0.5).positions(8, 8).tolist() == [
        0.0,
        0.5,
        1.0,
    ]
    # grayscale: 0.05 per frame, frame 21 would be 1.05 > 1
    assert len(parse_protocol("sequence:grayscale", steps=21).positions(8, 8)) == 21
    with pytest.raises(InvariscopeError, match=r"grayscale.*frames <= 21"):
        parse_protocol("sequence:grayscale", steps=22)
    with pytest.raises(InvariscopeError, match="contrast"):
        parse_protocol("sequence:contrast", steps=102)  # 1 - 1.01 < 0
    with pytest.raises(InvariscopeError, match="gaussian_blur"):
        parse_protocol("sequence:gaussian_blur", step=-0.1)


# ---------------------------------------------------------------------- positions
def test_positions_by_hand():
    assert ShiftProtocol("embed", steps=4).positions(32, 32).tolist() == [0, 1, 2, 3]
    assert ShiftProtocol("crop", steps=3).positions(32, 32).tolist() == [0, 1, 2]
    assert ShiftProtocol("circular", steps=3).positions(8, 8).tolist() == [0, 1, 2]
    assert ShiftProtocol("subpixel", steps=4).positions(8, 8).tolist() == [0, 0.25, 0.5, 0.75]
    assert ShiftProtocol("subpixel", steps=3, step=0.5).positions(8, 8).tolist() == [0, 0.5, 1]
    assert ShiftProtocol("scale", steps=5).positions(32, 32).tolist() == [-2, -1, 0, 1, 2]
    assert ShiftProtocol("scale", steps=4).positions(32, 32).tolist() == [-2, -1, 0, 1]
    assert ShiftProtocol("embed").positions(64, 64).dtype == np.float64
    assert ShiftProtocol("embed").unit == "px"
    assert {n for n in PROTOCOLS if ShiftProtocol(n).supports_2d} == {
        "embed",
        "crop",
        "circular",
        "subpixel",
    }


# ---------------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "name",
    [*PROTOCOLS, "sequence:rotation", "sequence:grayscale", "sequence:gaussian_noise"],
)
def test_every_protocol_keeps_shape_dtype_device(name, channels, dtype, device):
    x = _rand(2, channels, 20, 18, seed=18, dtype=dtype).to(device)
    p = parse_protocol(name, steps=4)
    for t in (0, 3):
        f = p.frame(x, t)
        assert f.shape == x.shape and f.dtype == dtype and f.device == x.device
        assert bool(torch.isfinite(f).all())
        assert torch.equal(f, p.frame(x, t))  # deterministic
    if p.supports_2d:
        off = torch.tensor([0.0, 2.0])
        assert p.at(x, off, off.flip(0)).shape == x.shape


# ---------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_one_line_errors():
    x = _rand(1, 1, 16, 16)
    with pytest.raises(InvariscopeError, match="frames <= 9") as err:
        ShiftProtocol("embed", steps=10).frame(x, 0)  # 8 free pixels around 8x8
    assert "\n" not in str(err.value)
    ShiftProtocol("embed", steps=9).check(16, 16)  # the largest that fits
    with pytest.raises(InvariscopeError, match="did you mean 'embed'"):
        parse_protocol("embedd")
    with pytest.raises(InvariscopeError, match="direction 'up'"):
        parse_protocol("crop", direction="up")
    with pytest.raises(InvariscopeError, match="fill 'white'"):
        parse_protocol("embed", fill="white")
    with pytest.raises(InvariscopeError, match="hflip makes no sequence"):
        parse_protocol("sequence:hflip")
    for name in ("vflip", "rot90", "affine"):
        with pytest.raises(InvariscopeError, match="makes no sequence"):
            parse_protocol(f"sequence:{name}")
    with pytest.raises(
        InvariscopeError, match=r"unknown sequence transform 'nonexistent'.*rotation"
    ):
        parse_protocol("sequence:nonexistent")
    with pytest.raises(InvariscopeError, match="frames must be an int >= 2"):
        parse_protocol("crop", steps=1)
    with pytest.raises(InvariscopeError, match="takes no step"):
        parse_protocol("embed", step=0.5)
    with pytest.raises(InvariscopeError, match="unknown option 'stpes'"):
        parse_protocol("crop", stpes=3)
    with pytest.raises(InvariscopeError, match="no 2-D offsets"):
        parse_protocol("scale").at(x, 0, 0)
    with pytest.raises(InvariscopeError, match="no 2-D offsets"):
        parse_protocol("sequence:rotation").max_offset(16, 16)
    with pytest.raises(InvariscopeError, match="frames 0..3"):
        parse_protocol("circular", steps=4).frame(x, 4)
    with pytest.raises(InvariscopeError, match="subpixel"):
        parse_protocol("subpixel", steps=100).frame(x, 0)  # 99 * 0.25 px > 16
    with pytest.raises(InvariscopeError, match="step must be > 0"):
        parse_protocol("subpixel", step=-0.25)
    with pytest.raises(InvariscopeError, match="whole pixels"):
        parse_protocol("circular").at(x, 0.5, 0)
    # options left at None take the defaults (a CLI passes unset options through)
    assert parse_protocol("embed", steps=None, step=None) == ShiftProtocol("embed")
