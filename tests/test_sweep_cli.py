"""``invariscope sweep`` end to end (tables, figures), one-line errors with exit 2, the demo stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import one_line_error
from PIL import Image

from invariscope.cli import run

FIGURES = [
    "accuracy",
    "softmax_curves",
    "thresholds",
    "heatmap_translate_x_x_translate_y",
    "worst_case",
]


@pytest.fixture(scope="module")
def checkpoint(trained_digits, tmp_path_factory):
    from invariscope.models import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    save_checkpoint(trained_digits[0], path)
    return path


@pytest.fixture(scope="module")
def cli_run(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = [
        "sweep",
        "--model",
        str(checkpoint),
        "--data",
        "digits",
        "--transforms",
        "rotation,translate_x,gaussian_noise",
        "--range",
        "rotation=-180:180:30",
        "--range",
        "translate_x=-0.3:0.3:0.1",
        "--range",
        "gaussian_noise=0:0.8:0.2",
        "--range",
        "translate_y=-0.2:0.2:0.1",
        "--pair",
        "translate_x,translate_y",
        "--worst-case",
        "--wc-grid",
        "5x3",
        "--wc-k",
        "4",
        "--images",
        "80",
        "--classes",
        "0,1,6,9",
        "--no-progress",
        "--out",
        str(out),
    ]
    return out, argv


def test_cli_sweep_writes_tables_and_figures(cli_run, capsys):
    from invariscope.runs.store import RunStore

    out, argv = cli_run
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy at the identity" in printed and "worst case: natural" in printed
    store = RunStore.open(out)
    assert store.is_complete
    acc = store.read_aggregate("accuracy")
    assert set(acc["transform"]) == {"rotation", "translate_x", "gaussian_noise"}
    assert set(store.read_table("records", columns=["label"])["label"]) == {0, 1, 6, 9}
    assert store.read_table("records", columns=["index"])["index"].nunique() == 80
    th = store.read_aggregate("thresholds")
    assert set(th["label"]) == {-1, 0, 1, 6, 9}
    assert store.config["worst_case"]["angles"] == 5
    for name in FIGURES:
        png, svg = out / "figures" / f"{name}.png", out / "figures" / f"{name}.svg"
        assert png.stat().st_size > 10_000 and svg.stat().st_size > 10_000, name
        pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert pixels.std() > 10, name  # not blank
        text = svg.read_text()
        assert "<svg" in text
    text = (out / "figures" / "accuracy.svg").read_text()
    assert "rotation [degrees]" in text and "top-1 accuracy" in text and "all classes" in text
    heat = (out / "figures" / "heatmap_translate_x_x_translate_y.svg").read_text()
    assert "translate_y [fraction of height]" in heat and "mean p(true class)" in heat
    # running the same command again reuses the complete run
    assert run(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--transforms", "spin"], "unknown transform 'spin'"),
        (["--transforms", "zoom", "--range", "zoom=-1:2:0.5"], "zoom"),
        (["--transforms", "rotation", "--range", "rotation=0:x"], "must be numbers, got 'x'"),
        (["--transforms", "rotation", "--classes", "eleven"], "unknown class"),
        (["--transforms", "rotation", "--data", "no-such-data"], "unknown dataset"),
        (["--transforms", "rotation", "--model", "no-such-model"], "no-such-model"),
        (["--worst-case", "--wc-grid", "5"], "ANGLESxSHIFTS"),
        (["--pair", "translate_x"], "two transformations"),
        ([], "nothing to sweep"),
    ],
)
def test_cli_errors_exit_2_with_one_line(extra, fragment, checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "sweep",
        "--model",
        str(checkpoint),
        "--data",
        "digits",
        "--images",
        "10",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    assert run(argv) == 2
    assert fragment in one_line_error(capsys)
    assert not (out / "aggregates").exists()


def test_cli_model_with_wrong_class_count(tmp_path, capsys):
    from invariscope.models import create_model, save_checkpoint

    path = tmp_path / "five.pt"
    save_checkpoint(create_model("simple-cnn", num_classes=5), path)
    out = tmp_path / "run"
    argv = [
        "sweep",
        "--model",
        str(path),
        "--data",
        "digits",
        "--transforms",
        "rotation",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert run(argv) == 2
    assert "5 classes but the dataset has 10" in one_line_error(capsys)
    assert not (out / "aggregates").exists()


def test_demo_sweep_stage(trained_digits, tmp_path):
    from invariscope.demo import demo_sweep

    model, _, test_set, _ = trained_digits
    summary = demo_sweep(model, test_set, tmp_path / "sweep")
    assert "identity accuracy" in summary and "worst-of-10" in summary
    assert len(summary.splitlines()) <= 3
    assert (tmp_path / "sweep" / "screening" / "figures" / "accuracy.png").stat().st_size > 10_000
    heat = tmp_path / "sweep" / "spatial" / "figures" / "heatmap_translate_x_x_translate_y.png"
    assert heat.stat().st_size > 10_000
    from invariscope.runs.store import RunStore

    assert RunStore.open(tmp_path / "sweep" / "screening").is_complete
