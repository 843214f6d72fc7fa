"""Anti-aliasing remedies: BlurPool, Azulay & Weiss's average pooling, adaptive polyphase
sampling (exact circular-shift invariance), checkpoints and the ``antialias`` command."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import one_line_error
from torch import nn

from invariscope.cli import run
from invariscope.engine import model_fingerprint
from invariscope.errors import InvariscopeError
from invariscope.models import (
    ANTIALIAS_METHODS,
    BlurPool2d,
    PolyphaseDown,
    antialias,
    capture_activations,
    create_model,
    load_checkpoint,
    save_checkpoint,
)

PASCAL = {
    1: [1],
    2: [1, 1],
    3: [1, 2, 1],
    4: [1, 3, 3, 1],
    5: [1, 4, 6, 4, 1],
    6: [1, 5, 10, 10, 5, 1],
    7: [1, 6, 15, 20, 15, 6, 1],
}


def _model(name: str, seed: int = 0):
    """A randomly initialised built-in net (1 channel, 32 px, width 8) in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name, in_channels=1, image_size=32, width=8)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so BN is really applied
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _max_shift_error(model, x, shifts) -> dict[tuple[int, int], float]:
    """Largest |logit change| under each circular shift ``(dy, dx)`` of ``x``."""
    with torch.no_grad():
        ref = model(x)
        rolled = torch.cat([torch.roll(x, shift, dims=(2, 3)) for shift in shifts])
        out = model(rolled).reshape(len(shifts), *ref.shape)  # one batch: fast
        errors = (out - ref).abs().amax(dim=(1, 2))
    return {shift: e.item() for shift, e in zip(shifts, errors, strict=True)}


# ------------------------------------------------------------------------ BlurPool2d
@pytest.mark.parametrize("size", range(1, 8))
def test_blurpool_filter_is_the_normalised_binomial(size):
    row = torch.tensor(PASCAL[size], dtype=torch.float32)
    expected = torch.outer(row, row) / (row.sum() ** 2)
    blur = BlurPool2d(size)
    assert blur.filter.shape == (size, size)
    assert torch.equal(blur.filter, expected)  # exact: entries are k / 2^n
    assert blur.filter.sum().item() == 1.0


def test_blurpool_filter_by_hand():
    assert torch.equal(BlurPool2d(3).filter * 16, torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]))
    assert BlurPool2d(4).filter[1, 2].item() == 9 / 64  # 3 * 3 / 64
    assert BlurPool2d(4).filter[0, 0].item() == 1 / 64


@pytest.mark.parametrize("size", range(1, 8))
@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("hw", [(7, 9), (8, 8), (11, 6)])
def test_blurpool_keeps_a_constant_and_gives_ceil_size(size, stride, hw):
    x = torch.full((2, 3, *hw), 0.37)
    y = BlurPool2d(size, stride=stride)(x)  # reflect padding
    assert y.shape == (2, 3, -(-hw[0] // stride), -(-hw[1] // stride))
    torch.testing.assert_close(y, torch.full_like(y, 0.37), atol=1e-6, rtol=0)


def test_blurpool_impulse_response_and_plain_subsampling():
    x = torch.zeros(1, 2, 5, 5)
    x[:, :, 2, 2] = 1.0
    y = BlurPool2d(3, stride=1, padding="zeros")(x)  # the filter itself, centred
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    assert torch.equal(y[0, 1], expected)
    x = torch.rand(2, 3, 9, 8)
    assert torch.equal(BlurPool2d(1, stride=2)(x), x[..., ::2, ::2])
    # circular padding: a circular shift by the stride shifts the output by one
    blur = BlurPool2d(4, stride=2, padding="circular")
    x = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(blur(torch.roll(x, 2, 3)), torch.roll(blur(x), 1, 3))


# --------------------------------------------------------------------- PolyphaseDown
def test_polyphase_down_keeps_the_strongest_component_per_image():
    x = torch.zeros(3, 2, 4, 6)
    x[0, 1, 3, 0] = 5.0  # row 3, col 0: phase (1, 0)
    x[1, 0, 2, 5] = -4.0  # row 2, col 5: phase (0, 1)
    x[1, 1, 1, 1] = 3.0  # phase (1, 1), weaker
    # image 2 stays zero: all four phases tie -> the first, (0, 0)
    y = PolyphaseDown(2)(x)
    assert y.shape == (3, 2, 2, 3)
    assert torch.equal(y[0], x[0, :, 1::2, 0::2])
    assert torch.equal(y[1], x[1, :, 0::2, 1::2])
    assert torch.equal(y[2], x[2, :, 0::2, 0::2])
    assert y[0, 1, 1, 0] == 5.0 and y[1, 0, 1, 2] == -4.0


def test_polyphase_down_is_circularly_equivariant_and_refuses_odd_sizes():
    down = PolyphaseDown(2)
    x = torch.randn(2, 3, 8, 8)
    ref = down(x)
    for dy, dx in itertools.product(range(4), range(4)):
        y = down(torch.roll(x, (dy, dx), (2, 3)))
        for i in range(2):  # each image: its unshifted output, circularly shifted
            assert any(
                torch.equal(y[i], torch.roll(ref[i], (a, b), (1, 2)))
                for a, b in itertools.product(range(4), range(4))
            )
    with pytest.raises(InvariscopeError, match="7x8 feature map is not divisible by the stride"):
        down(torch.randn(1, 1, 7, 8))


# ----------------------------------------------------------------- aps: exactness
def _circular_baseline(model):
    base = copy.deepcopy(model)
    for m in base.modules():
        if isinstance(m, nn.Conv2d) and any(m.padding):
            m.padding_mode = "circular"
    return base


def test_aps_small_vgg_is_exactly_invariant_to_circular_shifts():
    model = _model("small-vgg")
    aps = antialias(model, "aps")
    assert aps.antialias["converted"] == {
        "max_pool": 3,
        "avg_pool": 0,
        "strided_conv": 0,
        "circular_conv": 6,
    }
    x = _images(4)
    shifts = list(itertools.product(range(8), range(8)))
    errors = _max_shift_error(aps, x, shifts)
    assert max(errors.values()) < 1e-4
    with torch.no_grad():
        ref = aps(x).argmax(1)
        for dy, dx in shifts[::9]:  # and image by image
            assert torch.equal(aps(torch.roll(x, (dy, dx), (2, 3))).argmax(1), ref)
        rolled = torch.cat([torch.roll(x, shift, dims=(2, 3)) for shift in shifts])
        assert torch.equal(aps(rolled).argmax(1), ref.repeat(len(shifts)))
    # the same net with circular padding but plain subsampling: invariant to shifts by
    # multiples of the total stride 8 only
    base = _circular_baseline(model)
    base_errors = _max_shift_error(base, x, [*shifts, (8, 0), (16, 24)])
    assert base_errors[8, 0] < 1e-4 and base_errors[16, 24] < 1e-4
    off_grid = [e for (dy, dx), e in base_errors.items() if dy % 8 or dx % 8]
    assert max(off_grid) > 1e-4
    assert sum(e > 1e-4 for e in off_grid) > len(off_grid) // 2


def test_aps_small_resnet_is_exactly_invariant_to_circular_shifts():
    model = _model("small-resnet", seed=1)
    aps = antialias(model, "aps")
    downs = [n for n, m in aps.named_modules() if isinstance(m, PolyphaseDown)]
    assert downs == [
        "net.layer2.0.conv1.1",
        "net.layer2.0.shortcut.0.1",
        "net.layer3.0.conv1.1",
        "net.layer3.0.shortcut.0.1",
    ]
    assert aps.antialias["converted"]["strided_conv"] == 4
    x = _images(6, seed=1)
    shifts = [(dy, dx) for dy in range(0, 8) for dx in (0, 1, 3, 6)]
    assert max(_max_shift_error(aps, x, shifts).values()) < 1e-4
    # calling the inner network directly keeps the shortcut paired with its main branch
    with torch.no_grad():
        inner = aps.net(aps.preprocess(torch.roll(x, (3, 5), (2, 3))))
        torch.testing.assert_close(inner, aps(x), atol=1e-4, rtol=0)
    # the shortcut must reuse the main branch's phase: chosen independently, the two
    # branches of a block can shift by different amounts and invariance is lost
    lone = copy.deepcopy(aps)
    for m in lone.modules():
        if isinstance(m, PolyphaseDown):
            m._sharing = None
    assert max(_max_shift_error(lone, x, shifts).values()) > 1e-4
    base = _circular_baseline(model)
    assert max(_max_shift_error(base, x, shifts).values()) > 1e-4


def test_aps_refuses_input_sizes_not_divisible_by_the_stride():
    aps = antialias(create_model("small-vgg", in_channels=1, image_size=36, width=4), "aps")
    aps.eval()
    with pytest.raises(InvariscopeError, match=r"net\.pool3: a 9x9 feature map is not divisible"):
        aps(_images(1, size=36))


# ------------------------------------------------------------------------- avgpool
def test_avgpool_replaces_max_pools_with_same_size_average_pools():
    model = _model("small-vgg")
    avg = antialias(model, "avgpool")
    assert avg.antialias["converted"]["max_pool"] == 3
    assert avg.antialias["layers"] == ["net.pool1", "net.pool2", "net.pool3"]
    for name in ("pool1", "pool2", "pool3"):
        pool = getattr(avg.net, name)
        assert isinstance(pool, nn.AvgPool2d)
        assert (pool.kernel_size, pool.stride, pool.padding) == (6, (2, 2), (2, 2))
        assert pool.count_include_pad is False
        assert isinstance(getattr(model.net, name), nn.MaxPool2d)  # the original is untouched
    layers = ["net.relu1_2", "net.pool1", "net.pool2", "net.pool3", "net.gap"]
    x = _images(2)
    _, before = capture_activations(model, x, layers)
    _, after = capture_activations(avg, x, layers)
    assert [after[n].shape for n in layers] == [before[n].shape for n in layers]
    assert after["net.pool1"].shape == (2, 8, 16, 16)
    # a constant map stays constant, borders included (padding is not counted)
    y = avg.net.pool1(torch.full((1, 3, 16, 16), 0.7))
    torch.testing.assert_close(y, torch.full((1, 3, 8, 8), 0.7), atol=1e-6, rtol=0)
    # the first output pixel averages the 4x4 top-left corner (the 6x6 window less 2 padding)
    x = torch.rand(1, 1, 16, 16)
    assert torch.allclose(avg.net.pool1(x)[0, 0, 0, 0], x[0, 0, :4, :4].mean())


def test_avgpool_with_an_odd_size_difference_pads_asymmetrically():
    model = _model("small-vgg")
    avg = antialias(model, "avgpool", pool_size=5)  # 5 - 2 = 3: pad 1 before, 2 after
    x = torch.rand(1, 1, 16, 16)
    y = avg.net.pool1(x)
    assert y.shape == (1, 1, 8, 8)
    assert torch.allclose(y[0, 0, 0, 0], x[0, 0, :4, :4].mean())  # rows/cols -1..3
    assert torch.allclose(y[0, 0, 1, 1], x[0, 0, 1:6, 1:6].mean())  # rows/cols 1..5
    const = avg.net.pool1(torch.full((1, 2, 16, 16), 0.3))
    torch.testing.assert_close(const, torch.full((1, 2, 8, 8), 0.3), atol=1e-6, rtol=0)
    assert avg(_images(2)).shape == (2, 10)


# ------------------------------------------------------------------------ blurpool
def test_blurpool_small_vgg_counts_shapes_and_exact_identity_at_size_1():
    model = _model("small-vgg")
    x = _images(3)
    blur = antialias(model, "blurpool")
    assert blur.antialias["converted"] == {
        "max_pool": 3,
        "avg_pool": 0,
        "strided_conv": 0,
        "circular_conv": 0,
    }
    assert isinstance(blur.net.pool2[0], nn.MaxPool2d) and blur.net.pool2[0].stride == 1
    assert isinstance(blur.net.pool2[1], BlurPool2d) and blur.net.pool2[1].stride == (2, 2)
    layers = ["net.pool1", "net.pool2", "net.pool3", "net.fc"]
    _, before = capture_activations(model, x, layers)
    logits, after = capture_activations(blur, x, layers)
    assert [after[n].shape for n in layers] == [before[n].shape for n in layers]
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, before["net.fc"], atol=1e-4)  # the blur does something
    # filter size 1: stride-1 max pool then plain subsampling = the original max pool
    with torch.no_grad():
        assert torch.equal(antialias(model, filter_size=1)(x), model(x))
        cnn = create_model("simple-cnn").eval()
        digits = torch.rand(2, 1, 28, 28)
        assert torch.equal(antialias(cnn, filter_size=1)(digits), cnn(digits))
    assert isinstance(model.net.pool1, nn.MaxPool2d) and model.net.pool1.stride == 2


def test_blurpool_small_resnet_converts_the_four_strided_convs():
    model = _model("small-resnet")
    blur = antialias(model, "blurpool", filter_size=3, padding="zeros")
    assert blur.antialias["converted"]["strided_conv"] == 4
    assert blur.antialias["converted"]["max_pool"] == 0
    assert blur.antialias["layers"] == [
        "net.layer2.0.conv1",
        "net.layer2.0.shortcut.0",
        "net.layer3.0.conv1",
        "net.layer3.0.shortcut.0",
    ]
    conv = blur.net.layer2[0].conv1[0]
    assert conv.stride == (1, 1)
    assert conv.weight is not model.net.layer2[0].conv1.weight  # a copy ...
    assert torch.equal(conv.weight, model.net.layer2[0].conv1.weight)  # ... of the weights
    x = _images(2)
    layers = ["net.layer1", "net.layer2", "net.layer3"]
    _, before = capture_activations(model, x, layers)
    _, after = capture_activations(blur, x, layers)
    assert [after[n].shape for n in layers] == [before[n].shape for n in layers]
    with torch.no_grad():  # no blur: stride-1 conv then subsampling = the strided conv
        torch.testing.assert_close(antialias(model, filter_size=1)(x), model(x))


def test_plain_networks_nested_and_shared_layers():
    pool = nn.MaxPool2d(2)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        pool,
        nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()),
        nn.Upsample(scale_factor=2),
        pool,  # the same module again
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    blur = antialias(net)
    assert type(blur) is nn.Sequential
    assert blur[1] is blur[4] and isinstance(blur[1][1], BlurPool2d)
    assert isinstance(blur[2][0][1], BlurPool2d)
    assert blur.antialias["converted"]["max_pool"] == 1  # one module, used twice
    assert blur.antialias["converted"]["strided_conv"] == 1
    assert net[2][0].stride == (2, 2) and isinstance(net[1], nn.MaxPool2d)  # untouched
    assert blur(torch.rand(2, 1, 16, 16)).shape == net(torch.rand(2, 1, 16, 16)).shape


def test_fingerprint_changes_with_every_method():
    model = _model("small-vgg")
    prints = {model_fingerprint(model)}
    for method in ANTIALIAS_METHODS:
        prints.add(model_fingerprint(antialias(model, method)))
    prints.add(model_fingerprint(antialias(model, "blurpool", filter_size=3)))
    assert len(prints) == 5


# ----------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ANTIALIAS_METHODS)
def test_antialiased_checkpoint_round_trips_exactly(method, tmp_path):
    model = antialias(_model("small-resnet" if method == "aps" else "small-vgg"), method)
    with torch.no_grad():  # weights that differ from a fresh network's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(model, tmp_path / "aa.pt")
    loaded, meta = load_checkpoint(path)
    assert meta["antialias"]["method"] == method
    assert meta["antialias"]["converted"] == model.antialias["converted"]
    assert loaded.antialias["layers"] == model.antialias["layers"]
    assert loaded.arch == model.arch and loaded.arch_kwargs == model.arch_kwargs
    assert loaded.class_names == model.class_names
    x = _images(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        if method == "aps":
            shifted = loaded(torch.roll(x, (5, 3), (2, 3)))
            torch.testing.assert_close(shifted, model(x), atol=1e-4, rtol=0)
    plain = save_checkpoint(_model("small-vgg"), tmp_path / "plain.pt")
    assert load_checkpoint(plain)[1]["antialias"] is None
    assert not hasattr(load_checkpoint(plain)[0], "antialias")


# ------------------------------------------------------------------------ bad input
def test_bad_input_gives_one_line_errors():
    model = _model("small-vgg")
    cases = [
        (lambda: antialias(model, "blur"), "unknown anti-aliasing method 'blur'"),
        (lambda: antialias(model, filter_size=0), "filter_size must be an integer from 1 to 7"),
        (lambda: antialias(model, filter_size=8), "filter_size must be an integer from 1 to 7"),
        (lambda: antialias(model, padding="mirror"), "unknown padding mode 'mirror'"),
        (lambda: antialias(model, "avgpool", pool_size=1), "pool_size 1 is smaller than"),
        (lambda: antialias(antialias(model), "aps"), "already anti-aliased (blurpool)"),
        (
            lambda: antialias(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1))),
            "has no subsampling layer (strided conv or pool) to anti-alias",
        ),
        (
            lambda: antialias(_model("small-resnet"), "avgpool"),
            "no max-pool layer with stride > 1",
        ),
        (lambda: BlurPool2d(4)(torch.rand(1, 1, 2, 2)), "reflect padding of 2 needs"),
    ]
    for call, fragment in cases:
        with pytest.raises(InvariscopeError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("aa") / "cnn.pt"
    argv = ["train", "--data", "digits", "--epochs", "1", "--train-images", "384", "--no-progress"]
    assert run([*argv, "--out", str(path)]) == 0
    return path


def test_cli_converts_a_checkpoint(digits_checkpoint, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "blur.pt"
    assert run(["antialias", "--model", str(digits_checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"2 max-pool, 0 strided conv -> blurpool(4); checkpoint written to {out}"
    model, meta = load_checkpoint(out)
    source, source_meta = load_checkpoint(digits_checkpoint)
    assert meta["antialias"]["method"] == "blurpool" and model.antialias["filter_size"] == 4
    assert meta["extra"] == {"antialias_of": str(digits_checkpoint.resolve())}
    assert meta["train_config"] == source_meta["train_config"]  # the weights' own training
    assert isinstance(model.net.pool1[1], BlurPool2d)
    assert torch.equal(model.net.conv1.weight, source.net.conv1.weight)


def test_cli_converts_and_fine_tunes(digits_checkpoint, tmp_path, capsys):
    from invariscope.data import create_dataset
    from invariscope.train import evaluate

    capsys.readouterr()
    out = tmp_path / "aps.pt"
    argv = ["antialias", "--model", str(digits_checkpoint), "--method", "aps"]
    argv += ["--finetune-epochs", "1", "--data", "digits", "--train-images", "256", "--no-progress"]
    assert run([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    model, meta = load_checkpoint(out)
    source, _ = load_checkpoint(digits_checkpoint)
    test_set = create_dataset("digits", "test")
    before = evaluate(source, test_set)
    converted = evaluate(antialias(source, "aps"), test_set)
    after = evaluate(model, test_set)
    assert printed.startswith("2 max-pool, 0 strided conv, 0 circular-padded conv -> aps; ")
    assert f"test accuracy {before:.4f} -> {converted:.4f} converted -> {after:.4f}" in printed
    assert printed.endswith(f"after 1 fine-tuning epoch; checkpoint written to {out}")
    assert meta["antialias"]["method"] == "aps"
    assert meta["train_config"]["epochs"] == 1 and meta["train_config"]["data"] == "digits"
    assert meta["data_fingerprint"] == create_dataset("digits", "train", size=256).fingerprint
    assert not torch.equal(model.net.conv1.weight, source.net.conv1.weight)  # fine-tuned


def test_cli_refuses_bad_requests(digits_checkpoint, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    src = str(digits_checkpoint)
    for argv, fragment in [
        (["--out", str(junk)], "exists and is not an invariscope checkpoint"),
        (["--out", src], "is the --model file"),
        (["--finetune-epochs", "1", "--out", str(tmp_path / "a.pt")], "needs --data"),
        (["--filter-size", "9", "--out", str(tmp_path / "a.pt")], "--filter-size"),
    ]:
        capsys.readouterr()
        assert run(["antialias", "--model", src, *argv]) == 2
        assert fragment in one_line_error(capsys)
    assert junk.read_text() == "not a checkpoint"
    assert not (tmp_path / "a.pt").exists()
