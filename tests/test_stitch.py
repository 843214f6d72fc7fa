"""Stitching layers (Lenc & Vedaldi 2018) and the streamed CKA matrix on the engine."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import one_line_error

import invariscope.cli.stitch  # noqa: F401 - registers the command
from invariscope.cli import run as cli
from invariscope.errors import InvariscopeError
from invariscope.measure.stitch import StitchAnalysis, StitchingLayer, stitch
from invariscope.runs.store import RunStore

SELF_IMAGES = 200


@pytest.fixture(scope="module")
def data():
    from invariscope.data import create_dataset

    return create_dataset("digits", "train"), create_dataset("digits", "test")


@pytest.fixture(scope="module")
def cnn(data):
    """simple-cnn trained for one epoch on digits (a few seconds)."""
    from invariscope.train import model_for_dataset, train

    train_set, test_set = data
    model = model_for_dataset("simple-cnn", train_set, seed=0)
    train(model, train_set, epochs=1, seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def vgg(data):
    from invariscope.train import model_for_dataset

    return model_for_dataset("small-vgg", data[0], seed=0, width=8).eval()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ the stitching map


def test_stitching_layer_shapes_resampling_and_kinds():
    up = StitchingLayer((64, 2, 2), (8, 14, 14))
    assert up.resample and up(torch.rand(3, 64, 2, 2)).shape == (3, 8, 14, 14)
    down = StitchingLayer((8, 14, 14), (64, 4, 4), kernel_size=3)
    assert down.resample and down.map.kernel_size == (3, 3)
    assert down(torch.rand(2, 8, 14, 14)).shape == (2, 64, 4, 4)
    same = StitchingLayer((64, 10, 10), (64, 10, 10))
    assert not same.resample and same.map.kernel_size == (1, 1)
    assert isinstance(StitchingLayer((10,), (32,)).map, torch.nn.Linear)
    with pytest.raises(InvariscopeError, match="both must be feature maps"):
        StitchingLayer((64, 2, 2), (10,))


# ---------------------------------------------------------------- self-stitching


@pytest.mark.parametrize("layer", ["relu1", "pool2"])
def test_self_stitching_recovers_the_network_accuracy(cnn, data, layer):
    """E starts from random weights (as in the paper), not the identity; after training
    the stitched network classifies (almost) as well as the network itself."""
    train_set, test_set = data
    before = _state(cnn)
    flags = [p.requires_grad for p in cnn.parameters()]
    result = stitch(
        cnn,
        cnn,
        test_set,
        train_set,
        layers_a=[layer],
        layers_b=[layer],
        train_steps=200,
        train_batch=32,
        images=SELF_IMAGES,
        progress=False,
    )
    own = result.tables["models"].set_index("model")
    assert (own["n"] == SELF_IMAGES).all()
    assert own.loc["model", "error"] == own.loc["model_b", "error"] < 0.3
    row = result.stitch_error.iloc[0]
    assert (row["layer_a"], row["layer_b"], row["n"]) == (layer, layer, SELF_IMAGES)
    assert row["error"] <= own.loc["model", "error"] + 0.05, (row["error"], own)
    assert row["error_low"] <= row["error"] <= row["error_high"]
    # the CKA of a layer with itself in the same network
    assert result.cka["cka"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    # A and B are left as they were
    after = _state(cnn)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in cnn.parameters()] == flags
    assert not cnn.training


def test_untrained_stitching_layer_is_much_worse(cnn, data):
    """One step from random weights: far from the network's own error (so the previous
    test is not trivially true)."""
    train_set, test_set = data
    result = stitch(
        cnn, cnn, test_set, train_set, layers_a=["relu1"], layers_b=["relu1"],
        train_steps=1, cka=False, images=100, progress=False,
    )  # fmt: skip
    own = result.tables["models"].set_index("model").loc["model", "error"]
    assert result.stitch_error["error"].iloc[0] > own + 0.2
    assert result.cka is None and "cka" not in result.tables


# ---------------------------------------------------------------- two architectures


def test_two_architectures_full_matrix_with_resampling(cnn, vgg, data):
    train_set, test_set = data
    layers_a = ["pool1", "relu2", "fc"]  # 64x10x10, 64x2x2, [10]
    layers_b = ["pool1", "pool3", "fc"]  # 8x14x14, 32x3x3, [10]
    result = stitch(
        cnn, vgg, test_set, train_set, layers_a=layers_a, layers_b=layers_b,
        train_steps=3, train_batch=16, images=40, batch_size=16, progress=False,
    )  # fmt: skip
    s = result.stitch_error
    assert list(s.columns) == [
        "layer_a", "layer_b", "order_a", "order_b", "error", "error_low", "error_high", "n",
    ]  # fmt: skip
    pairs = set(zip(s["layer_a"], s["layer_b"], strict=True))
    maps = {(a, b) for a in layers_a[:2] for b in layers_b[:2]}
    assert pairs == maps | {("fc", "fc")}  # 4-D x 4-D full, vector x vector, no mixed pairs
    assert np.isfinite(s["error"]).all() and (s["n"] == 40).all()
    assert ((s["error"] >= 0) & (s["error"] <= 1)).all()
    c = result.cka
    assert len(c) == len(layers_a) * len(layers_b)
    assert list(c.columns) == [
        "layer_a", "layer_b", "order_a", "order_b", "cka", "constant_a", "constant_b",
    ]  # fmt: skip
    assert np.isfinite(c["cka"]).all() and (c["cka"] > -0.2).all() and (c["cka"] < 1.0).all()
    layers = result.tables["layers"]
    assert list(layers.columns) == ["model", "layer", "order"]
    assert list(layers[layers["model"] == "model_b"]["layer"]) == layers_b
    models = result.tables["models"]
    assert list(models.columns) == ["model", "label", "error", "error_low", "error_high", "n"]


def test_default_layers_are_every_4d_layer(cnn, data):
    train_set, test_set = data
    result = stitch(
        cnn, cnn, test_set, train_set, train_steps=1, train_batch=8, images=8, batch_size=8,
        cka=False, progress=False,
    )  # fmt: skip
    names = ["net.conv1", "net.pool1", "net.relu1", "net.conv2", "net.pool2", "net.relu2"]
    layers = result.tables["layers"]
    assert list(layers[layers["model"] == "model"]["layer"]) == names
    assert len(result.stitch_error) == 36


# ---------------------------------------------------------------- stored = in memory


def test_in_memory_equals_stored_and_blobs_load(cnn, vgg, data, tmp_path):
    train_set, test_set = data
    kwargs = dict(
        layers_a=["pool1", "relu2"], layers_b=["pool2", "relu3_2"], train_steps=4, train_batch=8,
        images=22, batch_size=8, seed=3, progress=False,
    )  # fmt: skip
    memory = stitch(cnn, vgg, test_set, train_set, **kwargs)
    stored = stitch(cnn, vgg, test_set, train_set, out=tmp_path / "run", **kwargs)
    assert memory.run_dir is None and stored.run_dir == tmp_path / "run"
    assert (
        sorted(memory.tables)
        == sorted(stored.tables)
        == ["cka", "layers", "models", "stitch_error"]
    )
    run = RunStore.open(tmp_path / "run")
    for name, table in memory.tables.items():
        pd.testing.assert_frame_equal(table, stored.tables[name], check_exact=True)
        pd.testing.assert_frame_equal(table, run.read_aggregate(name), check_exact=True)
    # 22 images in batches of 8: the last batch (6) still counts for CKA; every batch
    # holds HSIC rows of 2 x 2 pairs + 2 + 2 self pairs
    hsic = run.read_table("hsic")
    assert list(hsic.columns) == ["kind", "layer_a", "layer_b", "value", "n"]
    assert len(hsic) == 3 * 8 and sorted(set(hsic["n"])) == [6, 8]
    base = run.read_table("base")
    assert list(base.columns) == ["model", "n", "correct"] and base["n"].sum() == 2 * 22
    parts = run.read_table("stitch")
    assert list(parts.columns) == [
        "layer_a", "layer_b", "order_a", "order_b", "steps", "final_loss", "n", "correct", "error",
    ]  # fmt: skip
    assert (parts["steps"] == 4).all() and np.isfinite(parts["final_loss"]).all()
    # the stored E reproduces the stored error
    pid = next(p for p in sorted(run.completed_parts()) if p.startswith("stitch"))
    state = torch.load(io.BytesIO(run.read_blob(pid, "E")), weights_only=True)
    assert state["map.weight"].shape == (16, 64, 1, 1)  # pool1 (64 ch) -> pool2 (16 ch)
    # resuming the complete run recomputes nothing
    again = stitch(cnn, vgg, test_set, train_set, out=tmp_path / "run", **kwargs)
    pd.testing.assert_frame_equal(again.stitch_error, stored.stitch_error, check_exact=True)


def test_short_last_batch_is_skipped_for_cka(cnn, data):
    train_set, test_set = data
    result = stitch(
        cnn, cnn, test_set, train_set, layers_a=["relu2"], layers_b=["relu2"], train_steps=1,
        images=10, batch_size=4, progress=False,
    )  # fmt: skip
    # batches of 4, 4, 2: the 2-image batch has no HSIC but counts for the errors
    assert result.tables["models"]["n"].tolist() == [10, 10]
    assert result.cka["cka"].iloc[0] == pytest.approx(1.0, abs=1e-6)


def test_streamed_cka_on_class_sorted_data_matches_the_full_batch(cnn, data):
    """Issue 21: the selected digits are sorted by class; cut into consecutive batches of
    64, a batch holds one or two classes and the per-batch unbiased HSIC measures
    within-class similarity (pool1-relu2: 0.944 streamed vs 0.903 in one batch). The CKA
    batches are seeded random samples, so 6 batches of 64 agree with one of 384."""
    from invariscope.engine.selection import select_indices

    train_set, test_set = data
    labels = test_set.labels.numpy()
    chosen = select_indices(test_set, images=None, classes=None, seed=0)
    assert len(chosen) == 360
    share = max(np.bincount(labels[chosen[s : s + 64]]).max() / 64 for s in range(0, 320, 64))
    assert share > 0.5  # the data are class-structured: the test would fail without mixing
    layers = ["pool1", "relu2"]
    kwargs = dict(layers_a=layers, layers_b=layers, train_steps=1, images=384, progress=False)
    streamed = stitch(cnn, cnn, test_set, train_set, batch_size=64, **kwargs).cka
    full = stitch(cnn, cnn, test_set, train_set, batch_size=384, **kwargs).cka
    assert streamed[["layer_a", "layer_b"]].equals(full[["layer_a", "layer_b"]])
    off = streamed["layer_a"] != streamed["layer_b"]
    assert off.sum() == 2 and (full.loc[off, "cka"] < 0.99).all()
    assert np.abs(streamed["cka"] - full["cka"]).max() < 0.01


def test_mixed_batches_are_a_seeded_permutation_of_the_selection():
    from invariscope.engine.selection import mix_indices

    idx = np.arange(100, dtype=np.int64) * 3
    a, b, c = mix_indices(idx, 0), mix_indices(idx, 0), mix_indices(idx, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, idx)
    assert np.array_equal(np.sort(a), idx) and np.array_equal(np.sort(c), idx)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(layers_a=["wobble"]), "unknown layer 'wobble'"),
        (dict(layers_b=["net.nope"]), "unknown layer"),
        (dict(train_steps=0), "train_steps"),
        (dict(kernel_size=2), "must be odd"),
        (dict(lr=0.0), "lr"),
        (dict(train_batch=0), "train_batch"),
        (dict(layers_a=[]), "empty"),
        (dict(batch_size=2, images=8), ">= 4 images"),
    ],
)
def test_bad_input_is_one_line(cnn, data, kwargs, words):
    train_set, test_set = data
    args = dict(train_steps=1, images=8, progress=False) | kwargs
    with pytest.raises(InvariscopeError) as info:
        stitch(cnn, cnn, test_set, train_set, **args)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_batch_size_two_is_fine_without_cka(cnn, data):
    train_set, test_set = data
    result = stitch(
        cnn, cnn, test_set, train_set, layers_a=["relu2"], layers_b=["relu2"], train_steps=1,
        images=6, batch_size=2, cka=False, progress=False,
    )  # fmt: skip
    assert result.stitch_error["n"].iloc[0] == 6


def test_model_b_of_other_classes_is_refused(cnn, data):
    from invariscope.models import create_model

    train_set, test_set = data
    other = create_model("simple-cnn", num_classes=5)
    with pytest.raises(InvariscopeError, match="model B"):
        stitch(cnn, other, test_set, train_set, train_steps=1, images=8, progress=False)
    with pytest.raises(InvariscopeError, match="needs a training split"):
        StitchAnalysis(None)


# ---------------------------------------------------------------- command line


def test_cli_stitches_two_checkpoints(cnn, vgg, tmp_path, capsys):
    from invariscope.models import save_checkpoint

    save_checkpoint(cnn, tmp_path / "cnn.pt")
    save_checkpoint(vgg, tmp_path / "vgg.pt")
    out = tmp_path / "run"
    argv = [
        "stitch", "--model-a", str(tmp_path / "cnn.pt"), "--model-b", str(tmp_path / "vgg.pt"),
        "--data", "digits", "--layers-a", "pool1,relu2", "--layers-b", "pool1,pool3",
        "--train-steps", "3", "--train-batch", "8", "--images", "24", "--batch-size", "8",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert "A (cnn.pt): top-1 error" in text and "B (vgg.pt)" in text
    assert "stitched top-1 error" in text and "linear CKA" in text
    models = RunStore.open(out).read_aggregate("models")
    assert models["label"].tolist() == ["cnn.pt", "vgg.pt"]
    assert (out / "figures" / "stitch_cka.png").is_file()


def test_cli_model_b_defaults_to_model_a(cnn, tmp_path, capsys):
    from invariscope.models import save_checkpoint

    save_checkpoint(cnn, tmp_path / "cnn.pt")
    argv = [
        "stitch", "--model", str(tmp_path / "cnn.pt"), "--data", "digits",
        "--layers-a", "relu2", "--layers-b", "relu2", "--train-steps", "2", "--images", "8",
        "--batch-size", "8", "--no-progress", "--no-figures", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert cli(argv) == 0
    cka = RunStore.open(tmp_path / "run").read_aggregate("cka")
    assert cka["cka"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    capsys.readouterr()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--layers-a", "wobble"], "unknown layer"),
        (["--train-steps", "0"], "train-steps"),
        (["--batch-size", "2", "--images", "8"], "batch"),
        (["--kernel-size", "2"], "odd"),
    ],
)
def test_cli_bad_input(args, words, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["stitch", "--model", "simple-cnn", "--data", "digits", *args, "--out", str(out)]
    assert cli(argv) == 2
    assert words in one_line_error(capsys)
    assert not out.exists()
