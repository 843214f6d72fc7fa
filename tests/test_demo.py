"""The demo: trains once, then reuses the cached model; every stage reports its duration
and a finding. Runs every stage small (``DemoContext.notes``: at most 12 images, 3
optimiser steps), so it stays far from any timeout."""

from __future__ import annotations

import contextlib
import io
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


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """``(folder, output)`` of the CLI's demo, every default stage small (``SMALL``), with a
    fresh model cache; the module's other demo runs reuse it (each test stays short)."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INVARISCOPE_CACHE", str(root / "cache"))
        real = invariscope.demo.run_demo
        mp.setattr(invariscope.demo, "run_demo", lambda *a, **k: real(*a, notes=SMALL, **k))
        default = [n for n, _ in demo_stages() if n not in OPT_IN_STAGES and n != "real"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert run([*_argv(root / "out", 1), "--stages", ",".join(default)]) == 0
    return root, out.getvalue()


@pytest.fixture
def small(monkeypatch, first_run):
    """The CLI's ``run_demo`` with every stage small, on the first run's model cache."""
    monkeypatch.setenv("INVARISCOPE_CACHE", str(first_run[0] / "cache"))
    real = invariscope.demo.run_demo
    monkeypatch.setattr(invariscope.demo, "run_demo", lambda *a, **k: real(*a, notes=SMALL, **k))


def _argv(out, epochs: int) -> list[str]:
    return ["demo", "--out", str(out), "--epochs", str(epochs), "--no-progress"]


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


def test_demo_trains_and_every_stage_states_a_finding(first_run):
    root, first = first_run
    default = [n for n, _ in demo_stages() if n not in OPT_IN_STAGES and n != "real"]
    assert "stn_benchmark" in OPT_IN_STAGES and "stn_benchmark" not in default
    lines = _stages(first)
    assert set(lines) == {"train", *default, "report", "total"}
    assert "trained for 1 epochs" in lines["train"]
    # the shift stage: accuracy first, then P(top-1 change) with its 95% interval
    assert re.search(r"P\(top-1 change\) \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", lines["shift"])
    shift = lines["shift"].splitlines()
    assert [line.split(":", 1)[0] for line in shift[1:]] == ["crop", "subpixel"]
    assert all(line.split(": ", 1)[1].startswith("frame accuracy ") for line in shift[1:])
    assert lines["total"].startswith("outputs in")
    cached = list((root / "cache" / "models").glob("simple-cnn_digits_*.pt"))
    assert len(cached) == 2  # the demo model and the seed-1 network the stitch stage compares
    index = root / "out" / "report" / "index.html"
    assert index.is_file() and f"open {index}" in lines["report"]
    assert (root / "out" / "sweep" / "screening" / "figures" / "accuracy.png").is_file()
    assert (root / "out" / "shift" / "figures" / "shift_stability.png").is_file()


def test_demo_reuses_the_cache_and_runs_opt_in_stages_by_name(first_run, small, capsys):
    root, first = first_run
    lines = _stages(first)
    # the cached models, two stages and the opt-in one named explicitly
    assert run([*_argv(root / "again", 1), "--stages", "sweep,shift,stn_benchmark"]) == 0
    again = _stages(capsys.readouterr().out)
    assert set(again) == {"train", "sweep", "shift", "stn_benchmark", "report", "total"}
    assert "reused from cache" in again["train"]
    assert again["train"].rsplit("test accuracy ", 1)[1] == lines["train"].rsplit(" ", 1)[1]
    # the same model gives the same sweep summary; the BlurPool version is cached too
    assert again["sweep"] == lines["sweep"].replace(str(root / "out"), str(root / "again"))
    assert again["shift"] == lines["shift"]
    assert len(list((root / "cache" / "models").glob("simple-cnn-blurpool_*.pt"))) == 1
    assert "n = 1 seed (no interval): pose SD C0" in again["stn_benchmark"]

    # another epoch count is another cache entry, not a wrong reuse
    assert run([*_argv(root / "out2", 2), "--stages", "equivariance"]) == 0
    third = _stages(capsys.readouterr().out)
    assert "trained for 2 epochs" in third["train"]
    assert set(third) == {"train", "equivariance", "report", "total"}
    assert len(list((root / "cache" / "models").glob("simple-cnn_digits_*.pt"))) == 3
    assert run([*_argv(root / "out2", 2), "--stages", "nonsense"]) == 2
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
