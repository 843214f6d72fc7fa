"""Magnitude sweeps: exact identities, invariant models, resumption, reproducibility, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Tiny
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.measure import aggregate as agg
from invariscope.measure._sweep_core import uniform_per_image
from invariscope.measure.sweep import AGGREGATE_TABLES, PART_TABLES, resolve_magnitudes, sweep
from invariscope.measure.worst_case import SpatialBudget


class Constant(nn.Module):
    """Ignores its input: the same logits (favouring class 3) for every image."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(0.0, 1.0, num_classes).roll(4))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


@pytest.fixture(scope="module")
def test_set():
    from invariscope.data import create_dataset

    return create_dataset("digits", "test")


SMALL = dict(
    transforms=["rotation", "gaussian_noise"],
    magnitudes={
        "rotation": (-90, 90, 45),
        "gaussian_noise": (0.0, 0.6, 0.3),
        "translate_x": (-0.1, 0.1, 0.1),
        "translate_y": (-0.1, 0.1, 0.1),
    },
    pairs=[("translate_x", "translate_y")],
    worst_case=SpatialBudget(angles=3, shifts=3, k=3),
    images=36,
    batch_size=12,
    forward_batch=48,
)


def _run(model, data, **kw):
    args = {**SMALL, **kw}
    return sweep(model, data, args.pop("transforms"), args.pop("magnitudes"), **args)


def _all_tables(result) -> dict[str, pd.DataFrame]:
    tables = dict(result.aggregates)
    for name in PART_TABLES:
        tables[name] = result.table(name)
    return tables


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        left, right = a[name], b[name]
        if "softmax_sum" in left.columns:
            assert np.array_equal(np.stack(left["softmax_sum"]), np.stack(right["softmax_sum"]))
            left, right = left.drop(columns="softmax_sum"), right.drop(columns="softmax_sum")
        pd.testing.assert_frame_equal(left, right, check_exact=True, obj=name)


# ------------------------------------------------------------------------ measures


def test_model_ignoring_input_gives_flat_curves_and_no_thresholds(test_set):
    res = sweep(
        Constant(),
        test_set,
        ["rotation", "zoom", "gaussian_noise"],
        {"zoom": (0.5, 2.0, 0.5)},
        images=60,
        batch_size=30,
    )
    for name in ("class_accuracy", "softmax_curves"):
        table = res.aggregates[name]
        value = "accuracy" if name == "class_accuracy" else "mean_softmax"
        keys = ["transform", "label"] + (["series"] if name == "softmax_curves" else [])
        spread = table.groupby(keys)[value].agg(lambda s: s.max() - s.min())
        assert spread.max() < 1e-6, name
    th = res.aggregates["thresholds"]
    assert th["threshold_low"].isna().all() and th["threshold_high"].isna().all()
    breaking = res.table("breaking")
    assert breaking["break_low"].isna().all() and breaking["break_high"].isna().all()
    # the favourite class 3 is right for its images only; the others are overtaken at once
    per = th[th["transform"] == "rotation"].set_index("label")
    assert per.loc[3, "identity_accuracy"] == 1.0 and math.isnan(per.loc[3, "overtaken_high"])
    assert per.loc[5, "identity_accuracy"] == 0.0 and per.loc[5, "overtaken_high"] == 0.0
    assert per.loc[5, "overtaken_by_high"] == 3
    # others = max over the remaining 7 classes of the constant softmax
    p = torch.softmax(Constant().logits.detach(), 0).numpy()
    curves = res.aggregates["softmax_curves"]
    others = curves[(curves["series"] == "others")]["mean_softmax"]
    assert np.allclose(others, np.sort(p)[-4], atol=1e-6)
    wc = sweep(
        Constant(), test_set, [], worst_case=SpatialBudget(angles=3, shifts=3, k=2), images=20
    ).aggregates["worst_case_summary"]
    overall = wc[wc["label"] == -1]["accuracy"]
    assert overall.nunique() == 1


def test_identity_accuracy_equals_evaluate_and_drops_under_180_rotation(trained_digits):
    from invariscope.train import evaluate

    model, _, test_set, _ = trained_digits
    res = sweep(model, test_set, ["rotation"], {"rotation": (-180, 180, 45)})
    acc = res.aggregates["accuracy"].set_index("magnitude")["accuracy"]
    plain = evaluate(model, test_set)
    assert acc[0.0] == plain
    assert res.aggregates["accuracy"]["n"].eq(len(test_set)).all()
    assert acc[180.0] < 0.6 * plain and acc[-180.0] < 0.6 * plain
    th = res.aggregates["thresholds"].set_index("label")
    assert th.loc[-1, "threshold_low"] < 0 < th.loc[-1, "threshold_high"]
    # consistency of the two routes to the mean probability of the true class
    sums = agg.combine_softmax_sums(res.table("softmax_sums"))
    per = res.aggregates["class_accuracy"].set_index(["label", "magnitude"])
    for row in sums.itertuples(index=False):
        mean_true = row.softmax_sum[row.label] / row.count
        assert mean_true == pytest.approx(
            per.loc[(row.label, row.magnitude), "mean_p_true"], abs=1e-5
        )
        assert row.count == per.loc[(row.label, row.magnitude), "n"]
    # the 2-D grid at (m, 0) is the 1-D translation at m: one fused warp, same images
    two = sweep(
        model,
        test_set,
        ["translate_x"],
        {"translate_x": (-0.2, 0.2, 0.1), "translate_y": (-0.1, 0.1, 0.1)},
        pairs=[("translate_x", "translate_y")],
        images=60,
    )
    grid = two.aggregates["accuracy_2d"]
    line = grid[grid["magnitude_b"] == 0.0].set_index("magnitude_a")["accuracy"]
    one = two.aggregates["accuracy"].set_index("magnitude")["accuracy"]
    pd.testing.assert_series_equal(line, one, check_names=False, atol=1.5 / 60)
    assert grid.set_index(["magnitude_a", "magnitude_b"]).loc[(0.0, 0.0), "accuracy"] == one[0.0]


def test_records_match_direct_computation(test_set):
    from invariscope.transforms import gaussian_noise, rotation

    model = Tiny().eval()
    res = sweep(
        model,
        test_set,
        ["rotation", "gaussian_noise"],
        {"rotation": [-30.0, 10.0], "gaussian_noise": [0.5]},
        images=[5, 17, 200],
        batch_size=2,
        seed=2,
    )
    rec = res.table("records")
    assert sorted(rec["magnitude"][rec["transform"] == "rotation"].unique()) == [-30.0, 0.0, 10.0]
    assert set(rec["index"]) == {5, 17, 200}
    with torch.no_grad():
        for index in (5, 200):
            x, label = test_set[index]
            for name, fn, m, opts in (
                ("rotation", rotation, 10.0, {}),
                (
                    "gaussian_noise",
                    gaussian_noise,
                    0.5,
                    {"seed": torch.tensor([(index + 2 * 0x9E3779B1) % 2**32])},
                ),
            ):
                probs = torch.softmax(model(fn(x[None], m, **opts)), 1)[0]
                row = rec[
                    (rec["transform"] == name) & (rec["index"] == index) & (rec["magnitude"] == m)
                ].iloc[0]
                assert row["label"] == label
                assert row["p_true"] == pytest.approx(float(probs[label]), abs=1e-5)
                top = probs.topk(5)
                assert [row[f"top{i}_class"] for i in range(1, 6)] == top.indices.tolist()
                assert row["pred"] == row["top1_class"]
                assert bool(row["correct"]) == (row["pred"] == label)
    probs = rec[[f"top{i}_prob" for i in range(1, 6)]].to_numpy()
    assert (np.diff(probs, axis=1) <= 0).all()


def test_results_do_not_depend_on_batching(test_set):
    model = Tiny().eval()
    a = _run(model, test_set, batch_size=12, forward_batch=48)
    b = _run(model, test_set, batch_size=7, forward_batch=7)
    ra = a.table("records").sort_values(["transform", "magnitude", "index"]).reset_index(drop=True)
    rb = b.table("records").sort_values(["transform", "magnitude", "index"]).reset_index(drop=True)
    assert (ra["pred"] == rb["pred"]).mean() > 0.99
    np.testing.assert_allclose(ra["p_true"], rb["p_true"], atol=1e-4)
    wa = a.table("worst_case").sort_values("index").reset_index(drop=True)
    wb = b.table("worst_case").sort_values("index").reset_index(drop=True)
    np.testing.assert_allclose(wa["worst_p_true"], wb["worst_p_true"], atol=1e-4)


def test_same_seed_same_results_and_seed_matters(test_set):
    model = Tiny().eval()
    first, second = _run(model, test_set, seed=3), _run(model, test_set, seed=3)
    _assert_same(_all_tables(first), _all_tables(second))
    other = _run(model, test_set, seed=4)
    rec3, rec4 = first.table("records"), other.table("records")
    noisy = (rec3["transform"] == "gaussian_noise") & (rec3["magnitude"] > 0)
    assert set(rec3["index"]) != set(rec4["index"])  # another image subset ...
    same = _run(model, test_set, seed=4, images=list(rec3["index"].unique()))
    rec4 = same.table("records")
    assert not np.allclose(rec3.loc[noisy, "p_true"], rec4.loc[noisy, "p_true"])  # ... and noise
    assert np.array_equal(rec3.loc[~noisy, "p_true"], rec4.loc[~noisy, "p_true"])


def test_worst_case_properties(test_set):
    model = Tiny().eval()
    budget = SpatialBudget(max_angle=20, max_shift=2, angles=5, shifts=3, k=4)
    res = sweep(
        model, test_set, ["rotation"], {"rotation": (-20, 20, 10)}, worst_case=budget, images=40
    )
    wc = res.table("worst_case")
    assert (wc["worst_of_k_correct"] <= wc["random_correct"]).all()
    assert (wc["grid_correct"] <= wc["natural_correct"]).all()  # the grid holds the identity
    assert wc["worst_angle"].abs().max() <= 20 and wc["worst_tx_px"].abs().max() <= 2
    rec = res.table("records")
    ident = rec[rec["magnitude"] == 0.0].set_index("index").loc[wc["index"]]
    assert np.array_equal(ident["correct"].to_numpy(), wc["natural_correct"].to_numpy())
    assert (wc["worst_p_true"].to_numpy() <= ident["p_true"].to_numpy() + 1e-6).all()
    summary = res.aggregates["worst_case_summary"]
    overall = summary[summary["label"] == -1].set_index("setting")["accuracy"]
    assert (
        overall["natural"] == res.aggregates["accuracy"].set_index("magnitude").loc[0.0, "accuracy"]
    )
    assert overall["grid"] <= overall["worst_of_k"] + 1.0  # present and in range
    assert 0.0 <= overall["grid"] <= overall["natural"]
    # random draws depend on (seed, index) only, uniform in [0, 1)
    u = uniform_per_image(0, np.array([3, 9, 3]), 6)
    assert np.array_equal(u[0], u[2]) and not np.array_equal(u[0], u[1])
    assert np.array_equal(uniform_per_image(0, np.array([9]), 6)[0], u[1])
    big = uniform_per_image(1, np.arange(2000), 3)
    assert 0.0 <= big.min() and big.max() < 1.0 and abs(big.mean() - 0.5) < 0.02


def test_resolve_magnitudes_adds_identity_and_checks_domain():
    assert resolve_magnitudes("zoom", [2.0, 0.5]).tolist() == [0.5, 1.0, 2.0]
    assert resolve_magnitudes("rotation", (10, 30, 10)).tolist() == [0.0, 10.0, 20.0, 30.0]
    with pytest.raises(InvariscopeError, match="zoom"):
        resolve_magnitudes("zoom", (-1.0, 2.0, 0.5))
    with pytest.raises(InvariscopeError, match="unknown transform"):
        resolve_magnitudes("spin", None)


# ------------------------------------------------------------------------ resumption


def _stored(run_dir) -> dict[str, pd.DataFrame]:
    from invariscope.runs.store import RunStore

    run = RunStore.open(run_dir)
    assert run.is_complete
    tables = {name: run.read_aggregate(name) for name in run.aggregates()}
    assert set(AGGREGATE_TABLES) <= set(tables)
    for name in PART_TABLES:
        tables[name] = run.read_table(name)
    return tables


def _status(run_dir) -> str:
    return json.loads((run_dir / "manifest.json").read_text())["status"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, test_set):
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(Tiny().eval(), test_set, out=out, figures=False)
    return out


def test_exception_inside_a_part_resumes_to_identical_tables(tmp_path, test_set, reference_run):
    model = Tiny().eval()
    calls = {"n": 0}
    forward = model.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return forward(x)

    model.forward = flaky
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(model, test_set, out=out, figures=False)
    assert _status(out) == "running" and not (out / "aggregates").exists()
    del model.forward
    _run(model, test_set, out=out, figures=False)
    _assert_same(_stored(out), _stored(reference_run))
    assert json.loads((out / "manifest.json").read_text())["starts"] == 2


def test_sigkill_mid_part_resumes_to_identical_tables(tmp_path, test_set, reference_run):
    out = tmp_path / "run"
    weights = tmp_path / "tiny.pt"
    torch.save(Tiny().state_dict(), weights)
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_sweep import Tiny, SMALL, _run
        import invariscope.runs.store as store
        from invariscope.data import create_dataset

        model = Tiny()
        model.load_state_dict(torch.load({str(weights)!r}))
        real, count = store._atomic_parquet, [0]
        def killing(*args, **kwargs):
            count[0] += 1
            if count[0] == 8:  # in the middle of the third part
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        store._atomic_parquet = killing
        _run(model.eval(), create_dataset("digits", "test"), out={str(out)!r}, figures=False)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _status(out) == "running" and not (out / "aggregates").exists()
    done = [p for p in (out / "parts").iterdir() if (p / "_done.json").exists()]
    assert 1 <= len(done) < 12
    model = Tiny()
    model.load_state_dict(torch.load(weights))
    _run(model.eval(), test_set, out=out, figures=False)
    _assert_same(_stored(out), _stored(reference_run))


def test_complete_run_is_reused_and_other_config_refused(reference_run, test_set):
    again = _run(Tiny().eval(), test_set, out=reference_run, figures=False)
    assert _status(reference_run) == "complete"
    _assert_same(_all_tables(again), _stored(reference_run))
    with pytest.raises(InvariscopeError, match="different configuration"):
        _run(Tiny().eval(), test_set, out=reference_run, images=30, figures=False)


# ------------------------------------------------------------------------ bad input


class Shaped(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x):
        b = x.shape[0]
        self.calls += 1
        if self.kind == "late-nan" and self.calls > 1:  # fine on the pre-flight pass only
            return x.flatten(1)[:, :10] + float("nan")
        logits = x.flatten(1)[:, :10] * self.w
        if self.kind == "3d":
            return logits[:, :, None]
        if self.kind == "tuple":
            return logits, logits
        if self.kind == "five":
            return logits[:, :5]
        if self.kind == "nan":
            return logits + float("nan")
        if self.kind == "inf":
            return logits.masked_fill(torch.arange(b)[:, None] == 0, float("inf"))
        return logits


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("3d", "shape"),
        ("tuple", "returned tuple"),
        ("five", "outputs 5 classes"),
        ("nan", "NaN logits"),
        ("inf", "infinite logits"),
        ("late-nan", "NaN logits"),
    ],
)
def test_bad_model_output_leaves_nothing_complete(kind, fragment, tmp_path, test_set):
    out = tmp_path / "run"
    with pytest.raises(InvariscopeError, match=fragment) as err:
        sweep(Shaped(kind), test_set, ["rotation"], {"rotation": (-10, 10, 10)}, images=8, out=out)
    assert "\n" not in str(err.value)
    if kind == "late-nan":  # found while computing parts: the run stays incomplete
        assert _status(out) == "running" and not (out / "aggregates").exists()
    else:  # found by the pre-flight forward pass: nothing is written at all
        assert not out.exists()


def test_bad_input_is_refused_before_writing(tmp_path, test_set):
    from invariscope.data.base import TensorImageDataset

    out = tmp_path / "run"
    cases = [
        (dict(transforms=["spin"]), "unknown transform 'spin'"),
        (dict(transforms=["zoom"], magnitudes={"zoom": (-1.0, 2.0, 0.5)}), "zoom"),
        (dict(transforms=["rotation"], magnitudes={"zoom": (0.5, 2.0, 0.5)}), "not swept"),
        (dict(transforms=[]), "nothing to sweep"),
        (dict(transforms=["rotation"], classes=["eleven"]), "unknown class"),
        (dict(transforms=["rotation"], images=0), "--images"),
        (dict(transforms=["rotation"], pairs=[("rotation", "rotation")]), "same transformation"),
        (dict(transforms=["rotation"], threshold_fraction=1.5), "(0, 1]"),
    ]
    for kwargs, fragment in cases:
        transforms = kwargs.pop("transforms")
        magnitudes = kwargs.pop("magnitudes", None)
        with pytest.raises(
            InvariscopeError, match=fragment.replace("(", r"\(").replace("]", r"\]")
        ):
            sweep(Tiny(), test_set, transforms, magnitudes, out=out, **kwargs)
        assert not out.exists(), kwargs
    wrong = Tiny(num_classes=10)
    wrong.num_classes = 7
    with pytest.raises(InvariscopeError, match="7 classes but the dataset has 10"):
        sweep(wrong, test_set, ["rotation"], out=out)
    empty = TensorImageDataset(
        torch.zeros(0, 1, 28, 28),
        torch.zeros(0, dtype=torch.int64),
        classes=[str(i) for i in range(10)],
        name="empty",
        split="test",
    )
    with pytest.raises(InvariscopeError, match="empty"):
        sweep(Tiny(), empty, ["rotation"], out=out)
    assert not out.exists()


class Unreadable(torch.utils.data.Dataset):
    classes = [str(i) for i in range(10)]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise OSError("cannot identify image file '/data/cat/broken.png'")
        return torch.zeros(1, 28, 28), i


def test_unreadable_image_is_one_line_error(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InvariscopeError, match="broken.png") as err:
        sweep(Tiny(), Unreadable(), ["rotation"], {"rotation": (-10, 10, 10)}, out=out)
    assert "\n" not in str(err.value) and "fix or remove the file" in str(err.value)
    assert _status(out) == "running" and not (out / "aggregates").exists()


def test_unreadable_file_in_image_folder(tmp_path):
    from PIL import Image

    from invariscope.data import create_dataset

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    data = create_dataset(f"folder:{tmp_path / 'imgs'}", split="test")
    (tmp_path / "imgs" / "dog" / "1.png").write_bytes(b"not a png")  # broken after listing
    with pytest.raises(InvariscopeError, match="dog/1.png") as err:
        sweep(Tiny(num_classes=2), data, ["rotation"], {"rotation": (-10, 10, 10)})
    assert "\n" not in str(err.value)
    pixels = (rng.random((30, 28)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "imgs" / "dog" / "1.png")  # readable, other size
    with pytest.raises(InvariscopeError, match="differ in size"):
        sweep(Tiny(num_classes=2), data, ["rotation"], {"rotation": (-10, 10, 10)})


def test_model_that_does_not_fit_the_data_creates_no_run_directory(tmp_path):
    from invariscope.data import create_dataset
    from invariscope.models import create_model

    shapes = create_dataset("shapes", "test", size=8)  # RGB 32x32; simple-cnn takes 1x28x28
    out = tmp_path / "run"
    with pytest.raises(InvariscopeError, match="channel"):
        sweep(create_model("simple-cnn"), shapes, ["rotation"], out=out)
    assert not out.exists()
