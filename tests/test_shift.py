"""Small-shift stability (Azulay & Weiss 2019; Zhang 2019; Hendrycks & Dietterich 2019).

The measures are checked against values worked out by hand on a tiny sequence of
predictions (and T5D against an independent implementation of Hendrycks's formula on full
rankings); the analysis against properties that must hold exactly: a network without
subsampling and with circular padding is exactly shift-equivariant, so it has zero
nonshiftability and 100% consistency under circular shifts; adaptive polyphase sampling
guarantees 100% consistency under circular shifts, the max-pooling original does not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from invariscope.data import create_dataset
from invariscope.errors import InvariscopeError
from invariscope.measure.shift import (
    ShiftAnalysis,
    consistency,
    jaggedness,
    mean_absolute_difference,
    nonshiftability,
    pcorrect_rows,
    sequence_measures,
    shift_stability,
    top1_changes,
    top5_distance,
)
from invariscope.models import Classifier, antialias, create_model

# one image of class 2, four frames; the top-5 of each frame in rank order
TOP5 = np.array([[[2, 1, 3, 4, 5], [1, 2, 3, 4, 5], [1, 3, 4, 5, 6], [2, 1, 3, 4, 5]]])
PRED = TOP5[..., 0]
P_TRUE = np.array([[0.9, 0.4, 0.05, 0.8]])
LABELS = np.array([2])


def test_jaggedness_counts_top5_entries_and_exits():
    # in top-5: T, T, F, T -> leaves once, enters once
    assert jaggedness((TOP5 == 2).any(axis=2)).tolist() == [2]
    assert jaggedness(np.ones((3, 7), dtype=bool)).tolist() == [0, 0, 0]


def test_top1_changes_adjacent_and_against_first():
    assert top1_changes(PRED, "adjacent").tolist() == [2]  # 2->1, 1->1, 1->2
    assert top1_changes(PRED, "first").tolist() == [2]  # 1 != 2, 1 != 2, 2 == 2
    assert top1_changes(np.array([[0, 1, 0, 1]]), "adjacent").tolist() == [3]
    assert top1_changes(np.array([[0, 1, 0, 1]]), "first").tolist() == [2]


def test_mad_by_hand():
    # |0.4-0.9| + |0.05-0.4| + |0.8-0.05| = 0.5 + 0.35 + 0.75 = 1.6, over 3 pairs
    assert mean_absolute_difference(P_TRUE)[0] == pytest.approx(1.6 / 3)


def test_t5d_by_hand():
    # adjacent: (f0,f1) 1+1 = 2; (f1,f2) class 2 drops out: 0+4+1+1+1 = 7;
    # (f2,f3) every class one rank lower, class 6 out: 1+1+1+1+1 = 5  -> 14/3
    assert top5_distance(TOP5, "adjacent")[0] == pytest.approx(14 / 3)
    # against the first frame: 2, (f0,f2) 5+1+1+1+1 = 9, (f0,f3) identical 0 -> 11/3
    assert top5_distance(TOP5, "first")[0] == pytest.approx(11 / 3)


def _hendrycks_t5d(logits: np.ndarray, noise: bool) -> float:
    """Their ``ranking_dist`` with ``dist(sigma, 'top5')``, on full rankings of one video."""
    k = logits.shape[1]
    cum = np.cumsum(np.asarray([0] + [1] * 5 + [0] * (k - 1 - 5)))
    ranks = [np.argsort(np.argsort(-f, kind="stable"), kind="stable") + 1 for f in logits]
    out = []
    perm1 = ranks[0]
    for perm2 in ranks[1:]:
        sigma = perm2[np.argsort(perm1)]
        out.append(np.sum(np.abs(cum[:5] - cum[sigma - 1][:5])))
        if not noise:
            perm1 = perm2
    return float(np.mean(out))


@pytest.mark.parametrize("reference", ["adjacent", "first"])
def test_t5d_matches_the_imagenet_p_formula_on_full_rankings(reference):
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=(6, 12))
        logits[1:] = logits[:1] + 0.6 * rng.normal(size=(5, 12))  # related frames
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5][None]
        ours = top5_distance(top5, reference)[0]
        assert ours == pytest.approx(_hendrycks_t5d(logits, reference == "first"))


def test_sequence_measures_table():
    row = sequence_measures(PRED, P_TRUE, TOP5, LABELS, "adjacent").iloc[0]
    assert row["jaggedness"] == 2 and bool(row["jagged"])
    assert row["changes"] == 2 and row["fp"] == pytest.approx(2 / 3)
    assert row["t5d"] == pytest.approx(14 / 3) and row["mad"] == pytest.approx(1.6 / 3)
    assert row["accuracy"] == pytest.approx(0.5)  # frames 0 and 3 predict class 2
    with pytest.raises(InvariscopeError, match="at least 2 frames"):
        sequence_measures(PRED[:, :1], P_TRUE[:, :1], TOP5[:, :1], LABELS)


def test_consistency_and_nonshiftability_by_hand():
    assert consistency([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    sums = np.array([[1.0, 5.0, 0.0], [1.0, 9.0, 0.01], [1.0, 7.0, 0.0]])
    # map 2's peak (0.01) is below 10% of the largest (9): ignored; map 0 never changes,
    # map 1 departs from its mean 7 by 2 > 20% of 7 at two frames -> (0 + 2) / 2
    assert nonshiftability(sums, sums) == (1.0, 2)
    assert nonshiftability(sums, sums, change=0.3) == (0.0, 2)  # 2 < 0.3 * 7
    assert np.isnan(nonshiftability(np.zeros((3, 2)), np.zeros((3, 2)))[0])


def test_pcorrect_rows_sorted_by_sum():
    frames = pd.DataFrame(
        {
            "model": "model",
            "protocol": "embed",
            "index": np.repeat([7, 8, 9], 2),
            "label": 0,
            "frame": np.tile([0, 1], 3),
            "position": np.tile([0.0, 1.0], 3),
            "p_true": [0.1, 0.2, 0.9, 0.9, 0.5, 0.4],
        }
    )
    rows = pcorrect_rows(frames).groupby("index")["row"].first().to_dict()
    assert rows == {8: 0, 9: 1, 7: 2}


# ------------------------------------------------------------------ on the engine


def _circular_cnn(channels: int = 3, classes: int = 10) -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )
    return Classifier(net, input_size=(channels, 32, 32), mean=0.5, std=0.5, num_classes=classes)


@pytest.fixture(scope="module")
def shapes():
    return create_dataset("shapes", "test")


def test_no_subsampling_and_circular_padding_is_exactly_shiftable(shapes):
    r = shift_stability(
        _circular_cnn(),
        shapes,
        "circular",
        frames=8,
        direction="diagonal",
        images=24,
        consistency_pairs=4,
        consistency_range=16,
        progress=False,
    )
    s = r.summary.iloc[0]
    assert s["consistency"] == 1.0 and s["p_top1_change"] == 0.0 and s["jagged"] == 0.0
    ns = r.tables["nonshiftability"]
    # by default the activation layers (no negative output): the ReLUs and the pool
    assert set(ns["layer"]) == {"net.1", "net.3", "net.4"}
    assert (ns["nonshiftability"] == 0).all()  # every map's global sum is invariant
    assert (ns["n_maps"] > 0).all()


def _small_vgg_circular(shapes):
    """A random small-vgg with circular padding whose BatchNorm statistics are set on 256
    test images (cumulative averages), so that, untrained, it still predicts varied
    classes (with default statistics it predicts one class for everything)."""
    torch.manual_seed(1)
    m = create_model("small-vgg", num_classes=10, width=8)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            mod.padding_mode = "circular"
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(torch.stack([shapes[i][0] for i in range(256)]))
    m.eval()
    assert len(m(torch.stack([shapes[i][0] for i in range(64)])).argmax(1).unique()) > 2
    return m


def test_aps_is_exactly_consistent_under_circular_shifts_and_max_pooling_is_not(shapes):
    base = _small_vgg_circular(shapes)
    aps = antialias(base, "aps")
    r = shift_stability(
        aps,
        shapes,
        "circular",
        baseline=base,
        frames=8,
        direction="diagonal",
        images=64,
        consistency_pairs=8,
        consistency_range=8,
        layers=(),
        progress=False,
    )
    s = r.summary.set_index("model")
    assert s.loc["model", "consistency"] == 1.0  # what APS guarantees
    assert s.loc["model", "p_top1_change"] == 0.0
    assert s.loc["baseline", "consistency"] < 1.0
    mfr = r.tables["mfr"].set_index("protocol")
    assert mfr.loc["circular", "fr"] == 0.0


def test_nonshiftability_grows_with_subsampling(shapes):
    """Max pooling without a low-pass filter breaks the global sums of deep layers."""
    r = shift_stability(
        _small_vgg_circular(shapes),
        shapes,
        "circular",
        frames=8,
        images=16,
        consistency_pairs=0,
        progress=False,
    )
    mean = r.tables["nonshiftability_mean"].set_index("layer")["mean"]
    assert mean["net.relu1_1"] == 0.0  # before any subsampling: exactly shiftable
    assert mean["net.relu3_2"] > 0.0  # after two 2x2 max pools


def test_tables_have_one_row_per_image_frame_and_layer(shapes):
    r = shift_stability(
        create_model("small-vgg", num_classes=10, width=8),
        shapes,
        ["embed", "sequence:rotation"],
        frames=5,
        images=10,
        batch_size=4,
        consistency_pairs=3,
        fill="black",
        progress=False,
    )
    t = r.tables
    assert len(t["pcorrect"]) == 2 * 10 * 5
    s = t["shift_summary"].set_index("protocol")
    assert s.loc["embed", "n_images"] == 10
    assert np.isfinite(s.loc["embed", "consistency"])
    assert t["protocols"].set_index("protocol").loc["sequence:rotation", "unit"] != "px"
    # layer sums for figure 4 come from the first batch only, and 4-D layers only
    assert set(t["layer_sums"]["index"]) <= set(t["pcorrect"]["index"])
    assert "net.fc" not in set(t["nonshiftability"]["layer"])


def test_bad_input_is_one_line():
    with pytest.raises(InvariscopeError, match="protocol listed twice"):
        ShiftAnalysis(["embed", "embed"], protocol_options={"steps": 4})
    with pytest.raises(InvariscopeError, match="consistency pairs"):
        ShiftAnalysis("embed", protocol_options={"steps": 4}, consistency_pairs=-1)
    with pytest.raises(InvariscopeError, match="map threshold"):
        ShiftAnalysis("embed", protocol_options={"steps": 4}, map_threshold=1.5)
    with pytest.raises(InvariscopeError, match="unknown layer"):
        shift_stability(
            create_model("simple-cnn"),
            create_dataset("digits", "test"),
            "circular",
            frames=3,
            images=4,
            layers=["net.nope"],
            progress=False,
        )


def test_command_with_a_baseline_writes_the_run_figures_and_report(tmp_path, capsys):
    from invariscope.cli import run
    from invariscope.models import save_checkpoint
    from invariscope.report import build_report
    from invariscope.runs import RunStore

    torch.manual_seed(0)
    base = create_model("simple-cnn")
    save_checkpoint(base, tmp_path / "base.pt")
    save_checkpoint(antialias(base, "blurpool"), tmp_path / "blur.pt")
    out = tmp_path / "run"
    argv = ["shift", "--model", str(tmp_path / "blur.pt"), "--baseline", str(tmp_path / "base.pt")]
    argv += ["--data", "digits", "--protocol", "crop,sequence:gaussian_noise", "--frames", "4"]
    argv += ["--images", "12", "--consistency-pairs", "2", "--no-progress", "--out", str(out)]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "blur.pt" in printed and "base.pt" in printed and "sequence:gaussian_noise" in printed
    store = RunStore.open(out)
    assert store.is_complete
    labels = store.read_aggregate("models").set_index("model")["label"].to_dict()
    assert labels == {"model": "blur.pt", "baseline": "base.pt"}
    protocols = store.read_aggregate("protocols").set_index("protocol")
    assert protocols.loc["sequence:gaussian_noise", "reference"] == "first"
    mfr = store.read_aggregate("mfr")
    assert list(mfr["protocol"]) == ["crop", "sequence:gaussian_noise", "mean"]
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == [
        "shift_flip_rate.png",
        "shift_layer_sums.png",
        "shift_nonshiftability.png",
        "shift_pcorrect.png",
        "shift_stability.png",
    ]
    html = build_report([out], tmp_path / "report").read_text()
    assert "Small-shift stability" in html and "shift_summary" in html
