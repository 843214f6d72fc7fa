"""The engine itself: stages, job parts, blobs, gradient mode, execution choices, OOM retry,
the import rule, and ``invariscope render``."""

from __future__ import annotations

import ast
import io
import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Tiny
from torch import nn

import invariscope.engine.runner as runner
from invariscope.engine import Analysis, Part, PartOutput, run
from invariscope.engine.execution import Execution, Forward, tune
from invariscope.errors import InvariscopeError
from invariscope.runs.store import RunStore, part_id

SRC = Path(__file__).resolve().parents[1] / "src" / "invariscope"


@pytest.fixture(scope="module")
def test_set():
    from invariscope.data import create_dataset

    return create_dataset("digits", "test")


class TwoStage(Analysis):
    """Stage 0: per-batch pixel sums (batch parts). Stage 1: one job that reads them all,
    fits a least-squares line of sum against label with autograd, and stores its weights."""

    name = "two_stage_test"
    grad = True
    classifier = False
    models = ()
    part_tables = ("sums", "fit")
    aggregate_tables = ("total",)

    def config(self):
        return {"what": "sums"}

    def plan(self, ctx):
        parts = [
            Part(part_id("sums", b), stage=0, batch=b) for b in range(len(ctx.batches["data"]))
        ]
        return parts + [Part("fit", stage=1)]

    def compute(self, part, ctx, batch):
        if part.stage == 0:
            return {
                "sums": pd.DataFrame(
                    {
                        "index": batch.index.numpy(),
                        "label": batch.y.cpu().numpy(),
                        "pixel_sum": batch.x.sum(dim=(1, 2, 3)).cpu().numpy().astype(np.float64),
                        "grad_enabled": torch.is_grad_enabled(),
                    }
                )
            }
        sums = ctx.results.read_table("sums")
        x = torch.tensor(sums["label"].to_numpy(), dtype=torch.float64)
        y = torch.tensor(sums["pixel_sum"].to_numpy(), dtype=torch.float64)
        w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = ((w[0] + w[1] * x - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        w = w.detach()
        buffer = io.BytesIO()
        torch.save(w, buffer)
        table = pd.DataFrame({"n": [len(sums)], "a": [float(w[0])], "b": [float(w[1])]})
        return PartOutput({"fit": table}, {"weights": buffer.getvalue()})

    def aggregate(self, ctx):
        sums = ctx.results.read_table("sums")
        return {"total": pd.DataFrame({"pixel_sum": [sums["pixel_sum"].sum()]})}

    def summary(self, aggregates, ctx):
        return {"total": float(aggregates["total"]["pixel_sum"].iloc[0])}


def _least_squares(sums: pd.DataFrame):
    """Closed-form least squares of pixel sum on label: ``(a, b)``."""
    return np.polyfit(sums["label"].to_numpy(float), sums["pixel_sum"].to_numpy(), 1)[::-1]


def run_indices(dataset, n):
    from invariscope.engine.selection import select_indices

    return list(select_indices(dataset, images=n, classes=None, seed=0))


def test_stages_jobs_blobs_and_gradient_mode(tmp_path, test_set):
    res = run(TwoStage(), None, test_set, images=50, batch_size=16, out=tmp_path / "run")
    sums = res.table("sums")
    assert len(sums) == 50 and sums["grad_enabled"].all()  # grad=True: autograd on
    fit = res.table("fit")
    assert sorted(sums["index"]) == sorted(res.config and run_indices(test_set, 50))
    np.testing.assert_allclose(
        sums["pixel_sum"], test_set.images[sums["index"]].double().sum(dim=(1, 2, 3)), rtol=1e-6
    )
    a, b = _least_squares(sums)  # the job fitted what stage 0 stored
    assert fit["a"].iloc[0] == pytest.approx(a, abs=1e-5)
    assert fit["b"].iloc[0] == pytest.approx(b, abs=1e-5)
    store = RunStore.open(tmp_path / "run")
    weights = torch.load(io.BytesIO(store.read_blob("fit", "weights")))
    assert weights.tolist() == [fit["a"].iloc[0], fit["b"].iloc[0]]
    with pytest.raises(InvariscopeError, match="unknown blob"):
        store.read_blob("fit", "nothing")
    # in memory: the same tables and blob
    memory = run(TwoStage(), None, test_set, images=50, batch_size=16)
    pd.testing.assert_frame_equal(memory.table("fit"), fit, check_exact=True)
    assert memory._store.read_blob("fit", "weights") == store.read_blob("fit", "weights")
    assert res.summary["total"] == pytest.approx(float(sums["pixel_sum"].sum()))


def test_stages_across_ranks_without_process_group(tmp_path, test_set):
    """Two ranks meeting through the run directory: stage 1 waits for all of stage 0."""
    out = tmp_path / "run"
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = run(
                TwoStage(),
                None,
                test_set,
                images=64,
                batch_size=8,
                out=out,
                rank=r,
                world_size=2,
                timeout=60,
            )
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results[0].aggregated and not results[1].aggregated
    store = RunStore.open(out)
    assert store.is_complete
    fit = store.read_table("fit")
    assert len(store.read_table("sums")) == 64 and fit["n"].iloc[0] == 64  # it saw all 64
    a, b = _least_squares(store.read_table("sums"))
    assert fit["a"].iloc[0] == pytest.approx(a, abs=1e-5)
    ranks = {json.loads((p / "_done.json").read_text())["rank"] for p in (out / "parts").iterdir()}
    assert ranks == {0, 1}


def test_models_and_datasets_are_checked(test_set):
    with pytest.raises(InvariscopeError, match=r"takes models \[\], got \['model'\]"):
        run(TwoStage(), {"model": Tiny()}, test_set)
    with pytest.raises(InvariscopeError, match="^batch_size must be an integer >= 1"):
        run(TwoStage(), None, test_set, batch_size=0)
    with pytest.raises(InvariscopeError, match="^seed must be an integer >= 0"):
        run(TwoStage(), None, test_set, seed=-1)
    with pytest.raises(InvariscopeError, match="memory format 'nhwc'"):
        run(TwoStage(), None, test_set, memory_format="nhwc")
    with pytest.raises(InvariscopeError, match="--device 'nonsense' is not a device"):
        run(TwoStage(), None, test_set, device="nonsense")


# ------------------------------------------------------------------------ execution


class ConvNet(nn.Module):
    """Convolutions big enough for channels_last to matter; fixed random weights."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_channels_last_and_amp_change_results_within_float_tolerance(test_set):
    from invariscope.measure.sweep import sweep

    args = dict(images=40, batch_size=20, forward_batch=32)
    base = sweep(
        ConvNet(),
        test_set,
        ["rotation"],
        {"rotation": (-30, 30, 15)},
        **args,
        memory_format="contiguous",
    )
    cl = sweep(
        ConvNet(),
        test_set,
        ["rotation"],
        {"rotation": (-30, 30, 15)},
        **args,
        memory_format="channels_last",
    )
    assert cl.execution.channels_last and not base.execution.channels_last
    a, b = base.table("records"), cl.table("records")
    np.testing.assert_allclose(a["p_true"], b["p_true"], rtol=1e-5, atol=1e-6)
    assert (a["pred"] == b["pred"]).mean() > 0.97
    amp = sweep(ConvNet(), test_set, ["rotation"], {"rotation": (-30, 30, 15)}, **args, amp=True)
    assert amp.execution.amp
    np.testing.assert_allclose(amp.table("records")["p_true"], a["p_true"], atol=0.02)
    # the model is left as it was given: contiguous weights
    model = ConvNet()
    sweep(
        model,
        test_set,
        ["rotation"],
        {"rotation": (-30, 30, 15)},
        **args,
        memory_format="channels_last",
    )
    assert model.c2.weight.is_contiguous()


def test_tuning_picks_from_timed_candidates_and_is_recorded_and_reused(
    tmp_path, test_set, monkeypatch
):
    from invariscope.measure.sweep import sweep

    calls = {"n": 0}
    real_tune = runner.tune

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_tune(*args, **kwargs)

    monkeypatch.setattr(runner, "tune", counting)
    monkeypatch.setattr(runner, "MIN_TUNING_FLOPS", {"cpu": 0.0})  # tune even this small run
    out = tmp_path / "run"
    first = sweep(
        ConvNet(),
        test_set,
        ["rotation"],
        {"rotation": (-30, 30, 30)},
        images=30,
        batch_size=10,
        out=out,
        figures=False,
    )
    assert calls["n"] == 1 and first.execution.tuned
    meta = json.loads((out / "meta.json").read_text())["execution"]
    assert meta["forward_batch"] == first.execution.forward_batch
    assert meta["forward_batch"] <= 30  # capped by what one part can forward (10 x 3)
    timed = {int(k.split("@")[1]) for k in meta["ms_per_image"]}
    assert meta["forward_batch"] in timed
    # resuming (here: a complete run) reuses the recorded choice without timing again
    again = sweep(
        ConvNet(),
        test_set,
        ["rotation"],
        {"rotation": (-30, 30, 30)},
        images=30,
        batch_size=10,
        out=out,
        figures=False,
    )
    assert calls["n"] == 1 and again.execution == first.execution


def test_small_runs_are_not_tuned(test_set, monkeypatch):
    from invariscope.measure.sweep import sweep

    monkeypatch.setattr(runner, "tune", lambda *a, **k: pytest.fail("tuned a tiny run"))
    res = sweep(Tiny(), test_set, ["rotation"], {"rotation": (-30, 30, 30)}, images=10)
    assert res.execution == Execution(256, False, False)


def test_tune_keeps_channels_last_only_when_clearly_faster(monkeypatch):
    import invariscope.engine.execution as ex

    model = ConvNet()
    sample = torch.rand(4, 1, 16, 16)

    def cl(m):
        return not m.c2.weight.is_contiguous()  # the model was put into channels_last

    # channels_last 10% faster: a near-tie, contiguous is kept
    monkeypatch.setattr(
        ex,
        "_time_forward",
        lambda m, x, amp, repeats=2: 1e-4 * x.shape[0] * (0.9 if cl(m) else 1.0),
    )
    assert not tune(model, sample, forward_batch=8).channels_last
    monkeypatch.setattr(
        ex,
        "_time_forward",
        lambda m, x, amp, repeats=2: 1e-4 * x.shape[0] * (0.5 if cl(m) else 1.0),
    )
    chosen = tune(model, sample, forward_batch=8)
    assert chosen.channels_last and chosen.forward_batch == 8
    assert model.c2.weight.is_contiguous()  # tuning leaves the model as it was
    # forward batch: per-image time falls until 64, then rises; 64 is kept
    monkeypatch.setattr(
        ex,
        "_time_forward",
        lambda m, x, amp, repeats=2: 1e-4 * x.shape[0] * (1 + abs(np.log2(x.shape[0]) - 6)),
    )
    assert tune(model, sample, memory_format="contiguous").forward_batch == 64


class OutOfMemoryAbove(nn.Module):
    """Tiny, but raises the device's out-of-memory error for batches above ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.inner = Tiny()
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_batch_is_retried_at_half_size(test_set):
    from invariscope.measure.sweep import sweep

    args = dict(images=48, batch_size=24, memory_format="contiguous")
    reference = sweep(
        Tiny(), test_set, ["rotation"], {"rotation": (-30, 30, 30)}, forward_batch=16, **args
    )
    model = OutOfMemoryAbove(limit=20)
    res = sweep(
        model, test_set, ["rotation"], {"rotation": (-30, 30, 30)}, forward_batch=72, **args
    )
    assert res.execution.forward_batch == 72
    assert 72 in model.sizes and max(s for s in model.sizes if s <= 20) == 18  # 72 -> 36 -> 18
    a = reference.table("records")
    b = res.table("records")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    with pytest.raises(torch.OutOfMemoryError):  # at size 1 it gives up
        Forward({"model": OutOfMemoryAbove(0)}, Execution(4))(torch.rand(4, 1, 28, 28))


# ------------------------------------------------------------------------ layering


LAYERS = {
    # package -> invariscope packages it may import (besides itself and errors)
    "transforms": set(),
    "data": {"transforms"},
    "models": {"transforms", "data"},
    "runs": set(),
    "engine": {"transforms", "data", "models", "runs"},
    "measure": {"transforms", "data", "models", "engine"},
    "plots": {"runs"},
    "report": {"runs", "engine", "plots"},
}


def _imports(path: Path) -> set[str]:
    """Top-level invariscope packages imported by a module (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "invariscope" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_point_downward(package):
    allowed = LAYERS[package] | {package, "errors", "_deprecation"}  # the base utilities
    for path in sorted((SRC / package).rglob("*.py")):
        bad = _imports(path) - allowed
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_render_redraws_a_stored_run(tmp_path, capsys):
    from invariscope.cli import run as cli

    out = tmp_path / "run"
    argv = [
        "worst-case",
        "--model",
        "simple-cnn",
        "--data",
        "digits",
        "--wc-grid",
        "3x3",
        "--wc-k",
        "2",
        "--images",
        "16",
        "--no-progress",
        "--no-figures",
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    assert not (out / "figures" / "worst_case.png").exists()
    capsys.readouterr()
    assert cli(["render", str(out)]) == 0
    assert "1 figures" in capsys.readouterr().out
    assert (out / "figures" / "worst_case.png").stat().st_size > 10_000
    assert cli(["render", str(tmp_path)]) == 2
    assert "not an invariscope run directory" in capsys.readouterr().err


def test_docs_analysis_example_runs_and_is_right():
    """The example of the documentation's "Writing an analysis" page, run as printed."""
    import re

    from invariscope.data import create_dataset
    from invariscope.engine.selection import select_indices

    page = (SRC.parents[1] / "docs" / "writing-an-analysis.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "MeanPixel" in b)
    scope: dict = {}
    exec(compile(block, "writing-an-analysis.md", "exec"), scope)
    data = create_dataset("digits", "test")
    chosen = select_indices(data, images=50, classes=None, seed=0)
    expected = data.images[chosen].mean(dim=(1, 2, 3)).double().mean().item()
    assert scope["res"].table("mean")["mean"].iloc[0] == pytest.approx(expected, rel=1e-6)
    assert len(scope["res"].table("pixels")) == 50


class Agreement(Analysis):
    """Two models: per image, whether their top-1 predictions agree (as stitching will)."""

    name = "agreement_test"
    models = ("a", "b")
    classifier = False
    part_tables = ("agree",)

    def plan(self, ctx):
        return [Part(part_id("agree", b), batch=b) for b in range(len(ctx.batches["data"]))]

    def compute(self, part, ctx, batch):
        pa = ctx.forward(batch.x, model="a").argmax(1)
        pb = ctx.forward(batch.x, model="b").argmax(1)
        return {"agree": pd.DataFrame({"index": batch.index.numpy(), "same": (pa == pb).cpu()})}


def test_two_models_one_run(tmp_path, test_set):
    a, b = Tiny(), Tiny()
    with torch.no_grad():
        b.fc.bias += 100 * torch.eye(10)[3]  # b always says 3
    res = run(Agreement(), {"a": a, "b": b}, test_set, images=40, out=tmp_path / "run")
    same = res.table("agree")["same"].to_numpy()
    with torch.no_grad():
        index = torch.tensor(res.table("agree")["index"].to_numpy())
        says_3 = a(test_set.images[index]).argmax(1) == 3
    assert np.array_equal(same, says_3.numpy())
    config = RunStore.open(tmp_path / "run").config
    assert set(config["models"]) == {"a", "b"} and "model" not in config
    assert config["models"]["a"]["fingerprint"] != config["models"]["b"]["fingerprint"]
