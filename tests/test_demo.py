"""The demo: trains once, then reuses the cached model; every stage reports."""

from __future__ import annotations

import pytest
import torch

from invariscope.cli import run


def test_demo_trains_then_reuses_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INVARISCOPE_CACHE", str(tmp_path / "cache"))
    argv = ["demo", "--out", str(tmp_path / "out"), "--epochs", "1", "--no-progress"]
    analyses = "sweep,worst_case,shift,stitch,lee,stn_benchmark,alignment,equivariance,itn"
    assert run([*argv, "--stages", analyses]) == 0  # the real stage: its own test below
    first = capsys.readouterr().out
    stages = ["[sweep]", "[worst_case]", "[shift]", "[stitch]", "[lee]", "[stn_benchmark]"]
    stages += ["[alignment]", "[equivariance]", "[itn]", "[report]"]
    for stage in stages:
        assert stage in first
    assert "trained for 1 epochs" in first
    cached = list((tmp_path / "cache" / "models").glob("simple-cnn_digits_*.pt"))
    assert len(cached) == 2  # the demo model and the seed-1 network the stitch stage compares
    assert run([*argv, "--stages", "sweep,shift"]) == 0  # the cached models, two stages
    second = capsys.readouterr().out
    assert "reused from cache" in second

    # the same model gives the same test accuracy and the same sweep summary
    def stage_lines(text: str, stage: str) -> list[str]:
        return [line.split(") ", 1)[-1] for line in text.splitlines() if line.startswith(stage)]

    acc = [
        stage_lines(text, "[train]")[0].rsplit("test accuracy ", 1)[1] for text in (first, second)
    ]
    assert acc[0] == acc[1]
    sweep_lines = [stage_lines(text, "[sweep]") for text in (first, second)]
    assert sweep_lines[0] == sweep_lines[1]
    # the BlurPool version is cached too: the same shift summary
    assert stage_lines(first, "[shift]") == stage_lines(second, "[shift]")
    assert len(list((tmp_path / "cache" / "models").glob("simple-cnn-blurpool_*.pt"))) == 1
    assert (
        tmp_path / "out" / "sweep" / "screening" / "figures" / "accuracy.png"
    ).stat().st_size > 10_000
    # another epoch count is another cache entry, not a wrong reuse
    argv = ["demo", "--out", str(tmp_path / "out2"), "--epochs", "2", "--no-progress"]
    assert run([*argv, "--stages", "worst_case"]) == 0
    third = capsys.readouterr().out
    assert "trained for 2 epochs" in third and "[worst_case]" in third and "[sweep]" not in third
    assert len(list((tmp_path / "cache" / "models").glob("simple-cnn_digits_*.pt"))) == 3
    assert run([*argv, "--stages", "nonsense"]) == 2
    assert "unknown demo stage 'nonsense'" in capsys.readouterr().err


def test_demo_real_stage_runs_a_pretrained_model_on_photos(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from invariscope.demo import DemoContext, demo_stages, real_model_stage

    assert [name for name, _ in demo_stages()][-1] == "real"
    ctx = DemoContext(None, None, None, tmp_path, torch.device("cpu"), 0.0)
    ctx.notes["photo_images"] = 6
    line = real_model_stage(ctx)
    assert "6 crops of 7 photos" in line and "1-px crop shifts change the top-1 with P = " in line
    assert (tmp_path / "real" / "photos.png").stat().st_size > 10_000
    for run_name in ("sweep", "shift", "lee"):
        assert (tmp_path / "real" / run_name / "config.json").is_file()
