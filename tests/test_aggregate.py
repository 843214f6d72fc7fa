"""Aggregates of sweep records checked against values computed by hand on tiny tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from invariscope.errors import InvariscopeError
from invariscope.measure import aggregate as agg

MAGS = [-2.0, -1.0, 0.0, 1.0, 2.0]


def _records(preds: dict[int, list[int]], labels: dict[int, int], name="rot", mags=MAGS):
    """Records of one transformation: ``preds[index]`` lists the prediction per magnitude."""
    rows = []
    for index, row in preds.items():
        for m, p in zip(mags, row, strict=True):
            label = labels[index]
            rows.append(
                {
                    "transform": name,
                    "magnitude": m,
                    "index": index,
                    "label": label,
                    "pred": p,
                    "correct": p == label,
                    "p_true": 0.9 if p == label else 0.1,
                }
            )
    return pd.DataFrame(rows)


# Class 0: images 0, 1, 2, 3; class 1: images 4, 5.
LABELS = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
PREDS = {
    #    -2 -1  0  1  2
    0: [1, 0, 0, 0, 1],
    1: [1, 1, 0, 0, 0],
    2: [0, 0, 0, 1, 1],
    3: [0, 0, 1, 1, 1],  # wrong at the identity
    4: [1, 1, 1, 1, 1],
    5: [0, 0, 1, 0, 1],
}


def test_accuracy_curves_by_hand():
    rec = _records(PREDS, LABELS)
    per_class = agg.class_accuracy_curve(rec).set_index(["label", "magnitude"])
    # class 0 correct counts per magnitude: -2: imgs 2,3 -> 2; -1: 0,2,3 -> 3; 0: 0,1,2 -> 3;
    # 1: 0,1 -> 2; 2: 1 -> 1 (of 4)
    assert per_class.loc[0, "accuracy"].tolist() == [0.5, 0.75, 0.75, 0.5, 0.25]
    # class 1: -2: img 4 -> 1; -1: 4 -> 1; 0: 4,5 -> 2; 1: 4 -> 1; 2: 4,5 -> 2 (of 2)
    assert per_class.loc[1, "accuracy"].tolist() == [0.5, 0.5, 1.0, 0.5, 1.0]
    assert per_class.loc[(1, 0.0), "mean_p_true"] == pytest.approx(0.9)
    assert per_class.loc[(0, 2.0), "mean_p_true"] == pytest.approx((0.9 + 3 * 0.1) / 4)
    overall = agg.accuracy_curve(rec).set_index("magnitude")
    assert overall["accuracy"].tolist() == pytest.approx([3 / 6, 4 / 6, 5 / 6, 3 / 6, 3 / 6])
    assert overall["n"].tolist() == [6] * 5


def test_counts_add_up_across_parts():
    rec = _records(PREDS, LABELS)
    a, b = rec[rec["index"] < 3], rec[rec["index"] >= 3]
    merged = agg.class_counts(pd.concat([agg.class_counts(a), agg.class_counts(b)]))
    direct = agg.class_counts(rec)
    pd.testing.assert_frame_equal(merged, direct)


def test_thresholds_both_sides_by_hand():
    rec = _records(PREDS, LABELS)
    th = agg.thresholds(agg.class_accuracy_curve(rec), identities={"rot": 0.0}, fraction=0.5)
    th = th.set_index("label")
    # class 0: identity acc 0.75 -> limit 0.375; high side: 0.5 (no), 0.25 (yes) -> 2;
    # low side: 0.75 (no), 0.5 (no) -> never.
    assert th.loc[0, "identity_accuracy"] == 0.75
    assert th.loc[0, "threshold_high"] == 2.0
    assert math.isnan(th.loc[0, "threshold_low"])
    # class 1: identity 1.0 -> limit 0.5; 0.5 is not below 0.5 -> none on either side
    assert math.isnan(th.loc[1, "threshold_low"]) and math.isnan(th.loc[1, "threshold_high"])
    # with fraction 0.9 (limit 0.9) class 1 breaks at the nearest magnitudes on both sides
    th9 = agg.thresholds(rec, identities={"rot": 0.0}, fraction=0.9).set_index("label")
    assert th9.loc[1, "threshold_low"] == -1.0 and th9.loc[1, "threshold_high"] == 1.0
    # overall (label -1): identity 5/6, limit 5/12; curve 3/6, 4/6, 5/6, 3/6, 3/6 -> none
    assert th.loc[agg.ALL_CLASSES, "identity_accuracy"] == pytest.approx(5 / 6)
    assert math.isnan(th.loc[agg.ALL_CLASSES, "threshold_high"])
    # fraction 0.7 -> limit 7/12 = 0.583: 3/6 below on both sides, nearest first
    th7 = agg.thresholds(rec, identities={"rot": 0.0}, fraction=0.7).set_index("label")
    assert th7.loc[agg.ALL_CLASSES, "threshold_low"] == -2.0
    assert th7.loc[agg.ALL_CLASSES, "threshold_high"] == 1.0


def test_threshold_with_multiplicative_identity():
    # scale-like transformation, identity 1: the low side is below 1
    mags = [0.5, 0.75, 1.0, 1.5, 2.0]
    rec = _records({0: [1, 0, 0, 0, 1], 1: [0, 1, 0, 0, 0]}, {0: 0, 1: 0}, name="zoom", mags=mags)
    th = agg.thresholds(rec, identities={"zoom": 1.0}).set_index("label")
    # accuracy: 0.5, 0.5, 1, 1, 0.5 -> below 0.5? no (0.5 is not < 0.5)
    assert math.isnan(th.loc[0, "threshold_low"]) and math.isnan(th.loc[0, "threshold_high"])
    th = agg.thresholds(rec, identities={"zoom": 1.0}, fraction=0.6).set_index("label")
    assert th.loc[0, "threshold_low"] == 0.75 and th.loc[0, "threshold_high"] == 2.0


def test_threshold_needs_identity_in_range():
    rec = _records({0: [0, 0, 0, 0, 0]}, {0: 0}, mags=[1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(InvariscopeError, match="identity"):
        agg.thresholds(rec, identities={"rot": 0.0})


def test_breaking_magnitudes_by_hand():
    br = agg.breaking_magnitudes(_records(PREDS, LABELS), identities={"rot": 0.0})
    br = br.set_index("index")
    expected = {
        # index: (pred at identity, break low, break high)
        0: (0, -2.0, 2.0),
        1: (0, -1.0, math.nan),
        2: (0, math.nan, 1.0),
        3: (1, -1.0, math.nan),
        4: (1, math.nan, math.nan),
        5: (1, -1.0, 1.0),
    }
    for index, (pred, low, high) in expected.items():
        assert br.loc[index, "pred_identity"] == pred
        for got, want in ((br.loc[index, "break_low"], low), (br.loc[index, "break_high"], high)):
            assert (math.isnan(got) and math.isnan(want)) or got == want, (index, got, want)
    assert br.loc[5, "label"] == 1
    summary = agg.breaking_summary(br.reset_index()).set_index("label")
    # class 0 (images 0-3): low side broken for 0, 1, 3 -> 3/4, median of -2, -1, -1 = -1
    assert summary.loc[0, "broken_low"] == 0.75
    assert summary.loc[0, "median_break_low"] == -1.0
    assert summary.loc[0, "broken_high"] == 0.5
    assert summary.loc[0, "median_break_high"] == 1.5
    assert summary.loc[agg.ALL_CLASSES, "n"] == 6


def _sums(rows):
    return pd.DataFrame(rows, columns=["transform", "magnitude", "label", "count", "softmax_sum"])


def test_softmax_curves_top3_and_others_is_max():
    # 5 classes, true class 0, two magnitudes, images split over two parts
    part1 = _sums(
        [
            ("rot", 0.0, 0, 1, np.array([0.7, 0.1, 0.1, 0.05, 0.05])),
            ("rot", 1.0, 0, 1, np.array([0.1, 0.2, 0.1, 0.3, 0.3])),
        ]
    )
    part2 = _sums(
        [
            ("rot", 0.0, 0, 1, np.array([0.5, 0.3, 0.1, 0.05, 0.05])),
            ("rot", 1.0, 0, 1, np.array([0.1, 0.4, 0.1, 0.3, 0.1])),
        ]
    )
    sums = pd.concat([part1, part2], ignore_index=True)
    combined = agg.combine_softmax_sums(sums)
    assert combined["count"].tolist() == [2, 2]
    np.testing.assert_allclose(combined["softmax_sum"].iloc[1], [0.2, 0.6, 0.2, 0.6, 0.4])
    curves = agg.softmax_curves(sums)
    # means: m=0: [.6 .2 .1 .05 .05]; m=1: [.1 .3 .1 .3 .2]; peaks: [.6 .3 .1 .3 .2]
    # top3 by peak (ties -> lower index): 0, 1, 3; others = max over classes 2, 4
    series = curves.set_index(["series", "magnitude"])
    assert series.loc[("top1", 0.0), "class_index"] == 0
    assert series.loc[("top2", 0.0), "class_index"] == 1
    assert series.loc[("top3", 0.0), "class_index"] == 3
    assert series.loc[("top1", 1.0), "mean_softmax"] == pytest.approx(0.1)
    assert series.loc[("top3", 1.0), "mean_softmax"] == pytest.approx(0.3)
    assert series.loc[("others", 0.0), "mean_softmax"] == pytest.approx(0.1)  # max(.1, .05)
    assert series.loc[("others", 1.0), "mean_softmax"] == pytest.approx(0.2)  # max(.1, .2)
    assert series.loc[("others", 1.0), "class_index"] == -1
    assert bool(series.loc[("top1", 0.0), "is_true_class"])
    assert len(curves) == 4 * 2
    # overtaken: at 0 the true class leads; at 1 classes 1 and 3 (0.3) beat it (0.1)
    over = agg.overtaken(sums, identities={"rot": 0.0}).iloc[0]
    assert over["overtaken_high"] == 1.0 and over["overtaken_by_high"] == 1
    assert math.isnan(over["overtaken_low"]) and over["overtaken_by_low"] == -1
    th = agg.thresholds(
        pd.DataFrame(
            {
                "transform": "rot",
                "magnitude": [0.0, 1.0],
                "label": 0,
                "n": 2,
                "accuracy": [1.0, 0.0],
            }
        ),
        sums=sums,
        identities={"rot": 0.0},
    ).set_index("label")
    assert th.loc[0, "threshold_high"] == 1.0 and th.loc[0, "overtaken_high"] == 1.0
    assert th.loc[agg.ALL_CLASSES, "overtaken_by_high"] == -1


def test_softmax_curves_without_others_for_few_classes():
    sums = _sums([("b", 0.0, 1, 2, np.array([0.4, 1.6])), ("b", 0.5, 1, 2, np.array([1.2, 0.8]))])
    curves = agg.softmax_curves(sums)
    assert set(curves["series"]) == {"top1", "top2"}
    over = agg.overtaken(sums, identities={"b": 0.0}).iloc[0]
    assert over["overtaken_high"] == 0.5 and over["overtaken_by_high"] == 0


def test_constant_predictions_give_flat_curves_and_no_thresholds():
    preds = {i: [0] * 5 for i in LABELS}
    rec = _records(preds, LABELS)
    curve = agg.class_accuracy_curve(rec)
    for _, group in curve.groupby("label"):
        assert group["accuracy"].nunique() == 1
    th = agg.thresholds(curve, identities={"rot": 0.0})
    assert th["threshold_low"].isna().all() and th["threshold_high"].isna().all()
    br = agg.breaking_magnitudes(rec, identities={"rot": 0.0})
    assert br["break_low"].isna().all() and br["break_high"].isna().all()


def test_two_parameter_counts():
    rows = []
    for a in (0.0, 1.0):
        for b in (0.0, 1.0):
            for index, label in ((0, 0), (1, 1)):
                correct = not (a == 1.0 and b == 1.0 and index == 0)
                rows.append(
                    {
                        "transform_a": "tx",
                        "magnitude_a": a,
                        "transform_b": "ty",
                        "magnitude_b": b,
                        "index": index,
                        "label": label,
                        "correct": correct,
                        "p_true": 1.0 if correct else 0.0,
                    }
                )
    acc = agg.accuracy_curve(pd.DataFrame(rows), keys=agg.KEYS_2D)
    assert acc["accuracy"].tolist() == [1.0, 1.0, 1.0, 0.5]
    per = agg.class_accuracy_curve(pd.DataFrame(rows), keys=agg.KEYS_2D)
    assert per[per["label"] == 0]["accuracy"].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_worst_case_summary():
    table = pd.DataFrame(
        {
            "label": [0, 0, 1, 1],
            "natural_correct": [True, True, True, False],
            "random_correct": [True, True, False, False],
            "worst_of_k_correct": [True, False, False, False],
            "grid_correct": [False, False, False, False],
        }
    )
    summary = agg.worst_case_summary(table)
    overall = summary[summary["label"] == agg.ALL_CLASSES].set_index("setting")["accuracy"]
    assert overall.to_dict() == {"natural": 0.75, "random": 0.5, "worst_of_k": 0.25, "grid": 0.0}
    class0 = summary[summary["label"] == 0].set_index("setting")["accuracy"]
    assert class0["worst_of_k"] == 0.5


# ------------------------------------------------------------------- Wilson intervals

Z95 = 1.959963984540054  # standard normal quantile at 0.975, typed in (not from scipy)


def _wilson_by_hand(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval written out from its textbook formula."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_by_hand():
    # k = 5, n = 10: p = 0.5, z^2 = 3.8415; centre = (0.5 + 0.19207) / 1.38415 = 0.5;
    # half = 1.95996 / 1.38415 * sqrt(0.025 + 0.0096036) = 1.41601 * 0.18602 = 0.26341
    low, high = agg.wilson_interval(5, 10)
    assert (float(low), float(high)) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert (float(low), float(high)) == pytest.approx(_wilson_by_hand(5, 10), abs=1e-12)
    # k = 0: low = 0 exactly, high = z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.27753
    low, high = agg.wilson_interval(0, 10)
    assert float(low) == 0.0
    assert float(high) == pytest.approx(Z95**2 / (10 + Z95**2), abs=1e-12)
    assert float(high) == pytest.approx(0.2775, abs=1e-4)
    # k = n: the mirror image, high = 1 exactly, low = n / (n + z^2) = 0.72247
    low, high = agg.wilson_interval(10, 10)
    assert float(high) == 1.0
    assert float(low) == pytest.approx(10 / (10 + Z95**2), abs=1e-12)
    # another confidence: z = 1.644854 at 90%
    low, high = agg.wilson_interval(3, 20, confidence=0.90)
    assert (float(low), float(high)) == pytest.approx(
        _wilson_by_hand(3, 20, z=1.6448536269514722), abs=1e-12
    )


def test_wilson_interval_vectorised_and_empty():
    k = np.array([[0, 1, 2], [3, 0, 7]])
    n = np.array([[0, 4, 9], [3, 5, 100]])
    low, high = agg.wilson_interval(k, n)
    assert low.shape == high.shape == (2, 3)
    assert math.isnan(low[0, 0]) and math.isnan(high[0, 0])  # n == 0
    for (i, j), kk in np.ndenumerate(k):
        if n[i, j]:
            assert (low[i, j], high[i, j]) == pytest.approx(_wilson_by_hand(kk, n[i, j]), abs=1e-12)
    with pytest.raises(InvariscopeError):
        agg.wilson_interval(3, 2)
    with pytest.raises(InvariscopeError):
        agg.wilson_interval(1, 2, confidence=1.0)


def test_wilson_interval_properties():
    n = np.arange(1, 201)
    for frac in (0.0, 0.1, 0.5, 0.93, 1.0):
        k = np.round(frac * n)
        low, high = agg.wilson_interval(k, n)
        p = k / n
        assert np.all(low <= p) and np.all(p <= high)
        assert np.all(low >= 0.0) and np.all(high <= 1.0)
        assert np.all(high - low > 0)
    # the same proportion with ten times the images: a narrower interval
    for k, n in ((1, 4), (5, 10), (7, 10), (0, 3), (9, 9)):
        width = np.subtract(*agg.wilson_interval(k, n)[::-1])
        width10 = np.subtract(*agg.wilson_interval(10 * k, 10 * n)[::-1])
        assert width10 < width
    # higher confidence: a wider interval
    lo90, hi90 = agg.wilson_interval(4, 10, confidence=0.90)
    lo99, hi99 = agg.wilson_interval(4, 10, confidence=0.99)
    assert lo99 < lo90 and hi99 > hi90


def _after(columns: list[str], rate: str) -> None:
    at = columns.index(rate)
    assert columns[at + 1 : at + 3] == [f"{rate}_low", f"{rate}_high"], columns


def test_accuracy_tables_carry_intervals():
    rec = _records(PREDS, LABELS)
    overall = agg.accuracy_curve(rec)
    assert list(overall.columns) == [
        "transform",
        "magnitude",
        "n",
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "mean_p_true",
    ]
    # magnitude 0: 5 of 6 correct
    row = overall.set_index("magnitude").loc[0.0]
    assert (row["accuracy_low"], row["accuracy_high"]) == pytest.approx(
        _wilson_by_hand(5, 6), abs=1e-12
    )
    per_class = agg.class_accuracy_curve(rec)
    assert list(per_class.columns) == [
        "transform",
        "magnitude",
        "label",
        "n",
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "mean_p_true",
    ]
    # class 1 at magnitude 0: 2 of 2 -> high is 1, low = 2 / (2 + z^2)
    row = per_class.set_index(["label", "magnitude"]).loc[(1, 0.0)]
    assert row["accuracy_high"] == 1.0
    assert row["accuracy_low"] == pytest.approx(2 / (2 + Z95**2), abs=1e-12)
    assert (per_class["accuracy_low"] <= per_class["accuracy"]).all()
    assert (per_class["accuracy"] <= per_class["accuracy_high"]).all()
    # thresholds: the identity accuracy gets its interval too; old columns keep their order
    th = agg.thresholds(per_class, identities={"rot": 0.0})
    assert list(th.columns) == [
        "transform",
        "label",
        "n",
        "identity",
        "identity_accuracy",
        "identity_accuracy_low",
        "identity_accuracy_high",
        "threshold_low",
        "threshold_high",
    ]
    row = th.set_index("label").loc[0]  # class 0 at the identity: 3 of 4
    assert (row["identity_accuracy_low"], row["identity_accuracy_high"]) == pytest.approx(
        _wilson_by_hand(3, 4), abs=1e-12
    )


def test_two_parameter_tables_carry_intervals():
    rows = [
        {
            "transform_a": "tx",
            "magnitude_a": 0.0,
            "transform_b": "ty",
            "magnitude_b": 0.0,
            "index": i,
            "label": i % 2,
            "correct": i != 0,
            "p_true": 0.5,
        }
        for i in range(4)
    ]
    acc = agg.accuracy_curve(pd.DataFrame(rows), keys=agg.KEYS_2D)
    _after(list(acc.columns), "accuracy")
    assert (acc.loc[0, "accuracy_low"], acc.loc[0, "accuracy_high"]) == pytest.approx(
        _wilson_by_hand(3, 4), abs=1e-12
    )
    per = agg.class_accuracy_curve(pd.DataFrame(rows), keys=agg.KEYS_2D)
    _after(list(per.columns), "accuracy")
    per = per.set_index("label")
    # class 0 (images 0, 2): 1 of 2 -> (0.0945, 0.9055); class 1: 2 of 2 -> (0.3424, 1)
    assert (per.loc[0, "accuracy_low"], per.loc[0, "accuracy_high"]) == pytest.approx(
        (0.0945, 0.9055), abs=1e-4
    )
    assert per.loc[1, "accuracy_high"] == 1.0
    assert per.loc[1, "accuracy_low"] == pytest.approx(2 / (2 + Z95**2), abs=1e-12)


def test_breaking_summary_carries_intervals():
    br = agg.breaking_magnitudes(_records(PREDS, LABELS), identities={"rot": 0.0})
    summary = agg.breaking_summary(br)
    assert list(summary.columns) == [
        "transform",
        "label",
        "n",
        "broken_low",
        "broken_low_low",
        "broken_low_high",
        "broken_high",
        "broken_high_low",
        "broken_high_high",
        "median_break_low",
        "median_break_high",
    ]
    s = summary.set_index("label")
    # class 0: low side 3 of 4 broken, high side 2 of 4; all: low 4 of 6, high 3 of 6
    for label, side, k, n in (
        (0, "low", 3, 4),
        (0, "high", 2, 4),
        (-1, "low", 4, 6),
        (-1, "high", 3, 6),
    ):
        got = (s.loc[label, f"broken_{side}_low"], s.loc[label, f"broken_{side}_high"])
        assert got == pytest.approx(_wilson_by_hand(k, n), abs=1e-12), (label, side)


def test_worst_case_summary_carries_intervals():
    table = pd.DataFrame(
        {
            "label": [0, 0, 1, 1],
            "natural_correct": [True, True, True, False],
            "random_correct": [True, True, False, False],
            "worst_of_k_correct": [True, False, False, False],
            "grid_correct": [False, False, False, False],
        }
    )
    summary = agg.worst_case_summary(table)
    assert list(summary.columns) == [
        "label",
        "setting",
        "n",
        "accuracy",
        "accuracy_low",
        "accuracy_high",
    ]
    overall = summary[summary["label"] == agg.ALL_CLASSES].set_index("setting")
    assert (overall.loc["natural", "accuracy_low"], overall.loc["natural", "accuracy_high"]) == (
        pytest.approx(_wilson_by_hand(3, 4), abs=1e-12)
    )
    assert overall.loc["grid", "accuracy_low"] == 0.0
    assert overall.loc["grid", "accuracy_high"] == pytest.approx(Z95**2 / (4 + Z95**2))


def test_module_doctests():
    import doctest

    result = doctest.testmod(agg)
    assert result.attempted > 0 and result.failed == 0
