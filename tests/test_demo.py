"""The demo: trains once, then reuses the cached model; every stage reports its duration
and a finding. Runs every stage small (``DemoContext.notes``: at most 12 images, 3
optimiser steps), so it stays far from any timeout."""

from __future__ import annotations

import re

import pytest
import torch

import invariscope.demo
from invariscope.cli import run
from invariscope.demo import OPT_IN_STAGES, DemoContext, demo_stages, format_seconds

#: Every stage small: what a DemoContext reads from its notes.
SMALL = {
    "max_images": 12,
    "max_train_steps": 3,
    "finetune_epochs": 1,
    "stn_data": "rotated-digits",
}
LINE = re.compile(r"^\[(?P<name>\w+) (?P<time>\d+ s|\d+ min \d+ s)\] (?P<text>.+)$")


@pytest.fixture
def small(monkeypatch, tmp_path):
    """The CLI's ``run_demo`` with every stage small, and a fresh model cache."""
    monkeypatch.setenv("INVARISCOPE_CACHE", str(tmp_path / "cache"))
    real = invariscope.demo.run_demo

    def small_run(*args, **kwargs):
        return real(*args, notes=SMALL, **kwargs)

    monkeypatch.setattr(invariscope.demo, "run_demo", small_run)


def _stages(text: str) -> dict[str, str]:
    """``name -> summary`` of every ``[name N s]`` line, with the lines that follow it up
    to the next stage's."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            name = m["name"]
            out[name] = m["text"]
        elif name is not None and not line.startswith("left out"):
            out[name] += "\n" + line
    return out


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 41.2, 119.6, 432)] == [
        "0 s",
        "41 s",
        "2 min 0 s",
        "7 min 12 s",
    ]


def test_demo_trains_then_reuses_the_cache(tmp_path, small, capsys):
    argv = ["demo", "--out", str(tmp_path / "out"), "--epochs", "1", "--no-progress"]
    default = [n for n, _ in demo_stages() if n not in OPT_IN_STAGES and n != "real"]
    assert "stn_benchmark" in OPT_IN_STAGES and "stn_benchmark" not in default
    assert run([*argv, "--stages", ",".join(default)]) == 0  # real: its own test below
    first = capsys.readouterr().out
    lines = _stages(first)
    assert set(lines) == {"train", *default, "report", "total"}
    assert "trained for 1 epochs" in lines["train"]
    # each stage states its finding with intervals
    assert re.search(r"P\(top-1 change\) \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", first)
    shift = lines["shift"].splitlines()
    assert [line.split(":", 1)[0] for line in shift[1:]] == ["crop", "subpixel"]
    assert all(line.split(": ", 1)[1].startswith("frame accuracy ") for line in shift[1:])
    assert lines["total"].startswith("outputs in")
    cached = list((tmp_path / "cache" / "models").glob("simple-cnn_digits_*.pt"))
    assert len(cached) == 2  # the demo model and the seed-1 network the stitch stage compares
    index = tmp_path / "out" / "report" / "index.html"
    assert index.is_file() and f"open {index}" in lines["report"]
    assert (tmp_path / "out" / "sweep" / "screening" / "figures" / "accuracy.png").is_file()
    assert (tmp_path / "out" / "shift" / "figures" / "shift_stability.png").is_file()

    # the cached models, two stages and the opt-in one named explicitly
    assert run([*argv, "--stages", "sweep,shift,stn_benchmark"]) == 0
    second = capsys.readouterr().out
    again = _stages(second)
    assert set(again) == {"train", "sweep", "shift", "stn_benchmark", "report", "total"}
    assert "reused from cache" in again["train"]
    assert again["train"].rsplit("test accuracy ", 1)[1] == lines["train"].rsplit(" ", 1)[1]
    # the same model gives the same sweep summary; the BlurPool version is cached too
    assert again["sweep"] == lines["sweep"] and again["shift"] == lines["shift"]
    assert len(list((tmp_path / "cache" / "models").glob("simple-cnn-blurpool_*.pt"))) == 1
    assert "n = 1 seed (no interval): pose SD C0" in again["stn_benchmark"]

    # another epoch count is another cache entry, not a wrong reuse
    argv = ["demo", "--out", str(tmp_path / "out2"), "--epochs", "2", "--no-progress"]
    assert run([*argv, "--stages", "equivariance"]) == 0
    third = _stages(capsys.readouterr().out)
    assert "trained for 2 epochs" in third["train"]
    assert set(third) == {"train", "equivariance", "report", "total"}
    assert len(list((tmp_path / "cache" / "models").glob("simple-cnn_digits_*.pt"))) == 3
    assert run([*argv, "--stages", "nonsense"]) == 2
    assert "unknown demo stage 'nonsense'" in capsys.readouterr().err


def test_the_default_demo_leaves_the_opt_in_stages_out(tmp_path, monkeypatch):
    """Without --stages every stage but the opt-in ones runs; --full adds them."""
    ran = []
    fake = [(name, lambda ctx, name=name: ran.append(name) or "ok") for name in ("a", "b", "c")]
    monkeypatch.setattr(invariscope.demo, "demo_stages", lambda: fake)
    monkeypatch.setattr(invariscope.demo, "OPT_IN_STAGES", frozenset({"b"}))
    monkeypatch.setattr(
        invariscope.demo, "train_or_load", lambda *a, **k: (None, [0], [0], 1.0, True)
    )
    echoed = []
    invariscope.demo.run_demo(tmp_path, echo=echoed.append)
    assert ran == ["a", "c"]
    assert "left out (run them with --full or --stages): b" in echoed
    ran.clear()
    invariscope.demo.run_demo(tmp_path, full=True, echo=echoed.append)
    assert ran == ["a", "b", "c"]
    ran.clear()
    invariscope.demo.run_demo(tmp_path, stages=["b"], echo=echoed.append)
    assert ran == ["b"]


def test_near_chance_and_compare_follow_the_intervals():
    from types import SimpleNamespace

    from invariscope.demo import compare, near_chance

    row = SimpleNamespace(accuracy=0.15, accuracy_low=0.13, accuracy_high=0.18)
    assert near_chance(row, 10)  # 0.18 < 2 / 10
    assert not near_chance(SimpleNamespace(accuracy_high=0.21), 10)
    a = SimpleNamespace(p_low=0.20, p_high=0.26)
    b = SimpleNamespace(p_low=0.10, p_high=0.19)
    assert compare(a, b, "p") == "lower" and compare(b, a, "p") == "higher"
    c = SimpleNamespace(p_low=0.18, p_high=0.22)
    assert compare(a, c, "p").startswith("no clear difference")


def test_demo_real_stage_runs_a_pretrained_model_on_photos(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from invariscope.demo import real_model_stage

    assert [name for name, _ in demo_stages()][-1] == "real"
    ctx = DemoContext(None, None, None, tmp_path, torch.device("cpu"), 0.0)
    ctx.notes["photo_images"] = 6
    line = real_model_stage(ctx)
    assert "6 crops of 7 photos" in line and "1-px crop shifts change the top-1 with P = " in line
    assert (tmp_path / "real" / "photos.png").stat().st_size > 10_000
    for run_name in ("sweep", "shift", "lee"):
        assert (tmp_path / "real" / run_name / "config.json").is_file()
