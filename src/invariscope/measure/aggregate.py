"""Aggregates of sweep records: pure functions from tidy tables to tidy tables.

A sweep (:mod:`invariscope.measure.sweep`) writes, per transformation and batch of
images, a *records* table (one row per image and magnitude) and a *softmax sums* table
(per true class and magnitude, the sum of the softmax vectors of the images of that
class). Everything here turns those into the measures of Bunne et al. 2018 (strategy 1,
"sensibility to transformations"), with the exact definitions of ``DESIGN.md``:

- **accuracy curve**: top-1 accuracy at each magnitude, overall and per class
  (:func:`accuracy_curve`, :func:`class_accuracy_curve`);
- **class-wise softmax curves**: for images of class ``c``, the mean softmax of the three
  classes with the highest mean at any magnitude, the remaining classes condensed into
  "others" = max over them (:func:`softmax_curves`);
- **threshold**: per class and transformation, the smallest deviation from the identity
  on each side at which class accuracy drops below ``fraction`` (default 0.5) of its
  identity accuracy, and where the true class's mean softmax is first overtaken by another
  class (:func:`thresholds`, :func:`overtaken`);
- **breaking magnitude** (per image): the first magnitude, moving out from the identity,
  where the top-1 prediction differs from the prediction at the identity, on each side
  (:func:`breaking_magnitudes`).

Every proportion of images in these tables (``accuracy``, ``identity_accuracy``, the
``broken_*`` fractions) is followed by ``<name>_low`` and ``<name>_high``: its 95% Wilson
score interval (:func:`wilson_interval`), NaN where there are no images.

Convention:
    "Low" is the side of magnitudes below the transformation's identity (negative angles
    and shifts, scale factors below 1), "high" the side above. A threshold or breaking
    magnitude is reported as the magnitude itself (not its distance to the identity);
    ``NaN`` means "not reached within the swept range". The identity magnitude must be
    one of the swept magnitudes. Rows with ``label == -1`` summarise all classes.

Record tables can be concatenated across parts in any order; :func:`class_counts` and
:func:`combine_softmax_sums` reduce a part to a small table whose rows can be summed
across parts, and :class:`SoftmaxSumAccumulator` adds parts one at a time, so
aggregates stream over parts with memory bounded by the number of (class, magnitude)
cells, not by the number of images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.stats import norm

from invariscope.errors import InvariscopeError

#: Keys of a one-parameter sweep.
KEYS_1D: tuple[str, ...] = ("transform", "magnitude")
#: Keys of a two-parameter sweep.
KEYS_2D: tuple[str, ...] = ("transform_a", "magnitude_a", "transform_b", "magnitude_b")
#: ``label`` value of rows that summarise all classes.
ALL_CLASSES = -1

_COUNT_COLUMNS = ["n", "n_correct", "sum_p_true"]


def _identity_of(name: str, identities: Mapping[str, float] | float | None) -> float:
    """Identity magnitude of transformation ``name`` (from ``identities`` or the registry)."""
    if isinstance(identities, int | float):
        return float(identities)
    if identities is not None and name in identities:
        return float(identities[name])
    from invariscope.transforms import get_transform

    identity = get_transform(name).identity
    return float(identity)


def _identity_position(mags: np.ndarray, identity: float, name: str) -> int:
    """Position of ``identity`` in the sorted magnitudes ``mags`` (an error if absent)."""
    hits = np.flatnonzero(np.isclose(mags, identity, rtol=0.0, atol=1e-9))
    if len(hits) == 0:
        raise InvariscopeError(
            f"the sweep of '{name}' does not include its identity magnitude {identity:g}; "
            "add it to the swept range"
        )
    return int(hits[0])


def wilson_interval(
    successes: ArrayLike, n: ArrayLike, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion ``successes / n``, elementwise.

    With ``p = k / n`` and ``z`` the standard normal quantile at ``(1 + confidence) / 2``::

        centre = (p + z^2 / (2 n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        low, high = centre - half, centre + half

    The interval lies in ``[0, 1]`` (``low = 0`` exactly when ``k = 0``, ``high = 1`` when
    ``k = n``) and, unlike the normal approximation, is never empty or degenerate at
    ``p = 0`` or 1. ``successes`` need not be integers (a proportion times ``n`` works).

    Args:
        successes: number of successes ``k``, any shape (broadcast with ``n``).
        n: number of trials; ``n == 0`` gives NaN for both bounds.
        confidence: coverage in ``(0, 1)``.

    Returns:
        ``(low, high)`` float64 arrays of the broadcast shape (0-d for scalars).

    >>> low, high = wilson_interval(5, 10)
    >>> round(float(low), 4), round(float(high), 4)
    (0.2366, 0.7634)
    """
    if not 0.0 < confidence < 1.0:
        raise InvariscopeError(f"confidence must be in (0, 1), got {confidence}")
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n):
        raise InvariscopeError("wilson_interval: needs 0 <= successes <= n")
    z = float(norm.ppf(0.5 + confidence / 2.0))
    z2 = z * z
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1.0 + z2 / n
        centre = (p + z2 / (2.0 * n)) / denom
        half = z / denom * np.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
        low = np.clip(centre - half, 0.0, 1.0)
        high = np.clip(centre + half, 0.0, 1.0)
    empty = n == 0
    low = np.where(empty, np.nan, np.where(k == 0, 0.0, low))
    high = np.where(empty, np.nan, np.where(k == n, 1.0, high))
    return low, high


def mean_interval(values: ArrayLike) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite ``values`` and its 95% normal
    interval, mean +- 1.96 standard errors (NaN bounds for a single value, all NaN for
    none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return m, m - half, m + half


def _insert_interval(
    frame: pd.DataFrame, column: str, successes: ArrayLike, n: ArrayLike
) -> pd.DataFrame:
    """Insert ``<column>_low`` and ``<column>_high`` (Wilson, 95%) right after ``column``."""
    low, high = wilson_interval(np.asarray(successes), np.asarray(n))
    at = frame.columns.get_loc(column) + 1
    frame.insert(at, f"{column}_low", np.broadcast_to(low, (len(frame),)).copy())
    frame.insert(at + 1, f"{column}_high", np.broadcast_to(high, (len(frame),)).copy())
    return frame


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; has {list(df.columns)}")


# ----------------------------------------------------------------------------- accuracy


def class_counts(records: pd.DataFrame, keys: Sequence[str] = KEYS_1D) -> pd.DataFrame:
    """Reduce records to per-(keys, label) sums that add up across parts.

    Args:
        records: one row per (image, magnitude) with columns ``keys``, ``label``,
            ``correct`` (bool) and ``p_true`` (probability of the true class).
        keys: the sweep parameters, :data:`KEYS_1D` or :data:`KEYS_2D`.

    Returns:
        Columns ``*keys, label, n, n_correct, sum_p_true``, sorted by keys then label.
        Already-reduced tables (with ``n``) are accepted and re-summed, so
        ``class_counts(pd.concat([class_counts(a), class_counts(b)]))`` equals
        ``class_counts(pd.concat([a, b]))`` up to float rounding of ``sum_p_true``.
    """
    keys = list(keys)
    group = [*keys, "label"]
    if "n" in records.columns:
        _check_columns(records, [*group, *_COUNT_COLUMNS], "counts table")
        frame = records[[*group, *_COUNT_COLUMNS]]
    else:
        _check_columns(records, [*group, "correct", "p_true"], "records table")
        frame = records[group].copy()
        frame["n"] = 1
        frame["n_correct"] = records["correct"].astype("int64").to_numpy()
        frame["sum_p_true"] = records["p_true"].astype("float64").to_numpy()
    out = frame.groupby(group, sort=True, observed=True)[_COUNT_COLUMNS].sum().reset_index()
    out["n"] = out["n"].astype("int64")
    out["n_correct"] = out["n_correct"].astype("int64")
    out["label"] = out["label"].astype("int64")
    return out


def class_accuracy_curve(data: pd.DataFrame, keys: Sequence[str] = KEYS_1D) -> pd.DataFrame:
    """Per-class accuracy curves.

    Args:
        data: records or :func:`class_counts` output.

    Returns:
        Columns ``*keys, label, n, accuracy, accuracy_low, accuracy_high, mean_p_true``:
        top-1 accuracy (with its 95% Wilson interval) and mean probability of the true
        class over the images of class ``label`` at each point.
    """
    counts = class_counts(data, keys)
    out = counts[[*keys, "label", "n"]].copy()
    out["accuracy"] = counts["n_correct"] / counts["n"]
    _insert_interval(out, "accuracy", counts["n_correct"], counts["n"])
    out["mean_p_true"] = counts["sum_p_true"] / counts["n"]
    return out.reset_index(drop=True)


def accuracy_curve(data: pd.DataFrame, keys: Sequence[str] = KEYS_1D) -> pd.DataFrame:
    """Accuracy over all images at each point of the sweep.

    Args:
        data: records or :func:`class_counts` output.

    Returns:
        Columns ``*keys, n, accuracy, accuracy_low, accuracy_high, mean_p_true`` sorted by
        keys (``accuracy_low/high``: the 95% Wilson interval of the accuracy).
    """
    keys = list(keys)
    counts = class_counts(data, keys)
    total = counts.groupby(keys, sort=True, observed=True)[_COUNT_COLUMNS].sum().reset_index()
    out = total[[*keys, "n"]].copy()
    out["n"] = out["n"].astype("int64")
    out["accuracy"] = total["n_correct"] / total["n"]
    _insert_interval(out, "accuracy", total["n_correct"], total["n"])
    out["mean_p_true"] = total["sum_p_true"] / total["n"]
    return out


# ----------------------------------------------------------------------- softmax curves


def combine_softmax_sums(sums: pd.DataFrame) -> pd.DataFrame:
    """Add up softmax-sum rows with the same (transform, label, magnitude).

    Args:
        sums: columns ``transform, magnitude, label, count, softmax_sum`` where
            ``softmax_sum`` holds a length-K array: the sum of the softmax vectors of
            the ``count`` images of true class ``label`` at that magnitude.

    Returns:
        The same columns, one row per (transform, label, magnitude), sorted that way;
        ``softmax_sum`` as float64 arrays.
    """
    _check_columns(
        sums, ["transform", "magnitude", "label", "count", "softmax_sum"], "softmax sums"
    )
    if len(sums) == 0:
        return pd.DataFrame(
            {"transform": [], "magnitude": [], "label": [], "count": [], "softmax_sum": []}
        )
    vectors = np.stack([np.asarray(v, dtype=np.float64) for v in sums["softmax_sum"]])
    keys = sums[["transform", "label", "magnitude"]].reset_index(drop=True)
    codes = keys.groupby(["transform", "label", "magnitude"], sort=True, observed=True).ngroup()
    n_groups = int(codes.max()) + 1
    total = np.zeros((n_groups, vectors.shape[1]), dtype=np.float64)
    np.add.at(total, codes.to_numpy(), vectors)
    counts = np.bincount(codes.to_numpy(), weights=sums["count"].to_numpy(), minlength=n_groups)
    first = keys.groupby(codes.to_numpy(), sort=True).first()
    out = pd.DataFrame(
        {
            "transform": first["transform"].to_numpy(),
            "magnitude": first["magnitude"].to_numpy(dtype=np.float64),
            "label": first["label"].to_numpy(dtype=np.int64),
            "count": counts.astype(np.int64),
            "softmax_sum": list(total),
        }
    )
    for column in ("n_correct", "sum_p_true"):
        if column in sums.columns:
            summed = np.bincount(
                codes.to_numpy(),
                weights=sums[column].to_numpy(dtype=np.float64),
                minlength=n_groups,
            )
            out[column] = summed.astype(np.int64) if column == "n_correct" else summed
    return out


class SoftmaxSumAccumulator:
    """Streaming sum of softmax-sum tables of ONE transformation, part by part.

    Memory is one ``[M, K]`` float64 array per class seen (M magnitudes, K classes),
    whatever the number of parts or images. :meth:`frame` returns the same table as
    :func:`combine_softmax_sums` of all the parts added.

    Args:
        transform: the transformation's name.
        magnitudes: all swept magnitudes of it (any order).
    """

    def __init__(self, transform: str, magnitudes: Sequence[float]) -> None:
        self.transform = transform
        self.magnitudes = np.unique(np.asarray(magnitudes, dtype=np.float64))
        self._sums: dict[int, np.ndarray] = {}
        self._counts: dict[int, np.ndarray] = {}

    def add(self, part: pd.DataFrame) -> None:
        """Add a part's rows (columns ``magnitude, label, count, softmax_sum`` and
        optionally ``n_correct, sum_p_true``)."""
        if len(part) == 0:
            return
        mags = part["magnitude"].to_numpy(dtype=np.float64)
        pos = np.searchsorted(self.magnitudes, mags)
        pos = np.clip(pos, 0, len(self.magnitudes) - 1)
        if not np.allclose(self.magnitudes[pos], mags, rtol=0.0, atol=1e-12):
            raise ValueError(f"softmax sums of '{self.transform}' hold an unexpected magnitude")
        labels = part["label"].to_numpy(dtype=np.int64)
        vectors = np.stack([np.asarray(v, dtype=np.float64) for v in part["softmax_sum"]])
        extra = np.stack(
            [part["count"].to_numpy(dtype=np.float64)]
            + [
                part[c].to_numpy(dtype=np.float64) if c in part.columns else np.zeros(len(part))
                for c in ("n_correct", "sum_p_true")
            ],
            axis=1,
        )
        m = len(self.magnitudes)
        for label in np.unique(labels):
            sel = labels == label
            if label not in self._sums:
                self._sums[label] = np.zeros((m, vectors.shape[1]))
                self._counts[label] = np.zeros((m, 3))
            np.add.at(self._sums[label], pos[sel], vectors[sel])
            np.add.at(self._counts[label], pos[sel], extra[sel])

    def frame(self) -> pd.DataFrame:
        """Columns ``transform, magnitude, label, count, softmax_sum, n_correct,
        sum_p_true``, one row per (label, magnitude) with images, sorted that way."""
        rows = []
        for label in sorted(self._sums):
            counts = self._counts[label]
            keep = counts[:, 0] > 0
            rows.append(
                pd.DataFrame(
                    {
                        "transform": self.transform,
                        "magnitude": self.magnitudes[keep],
                        "label": int(label),
                        "count": counts[keep, 0].astype(np.int64),
                        "softmax_sum": list(self._sums[label][keep]),
                        "n_correct": counts[keep, 1].astype(np.int64),
                        "sum_p_true": counts[keep, 2],
                    }
                )
            )
        if not rows:
            return pd.DataFrame(
                columns=[
                    "transform",
                    "magnitude",
                    "label",
                    "count",
                    "softmax_sum",
                    "n_correct",
                    "sum_p_true",
                ]
            )
        return pd.concat(rows, ignore_index=True)

    def counts(self) -> pd.DataFrame:
        """The :func:`class_counts` table (``transform, magnitude, label, n, n_correct,
        sum_p_true``) of the images added, sorted by magnitude then label."""
        frame = self.frame().drop(columns="softmax_sum").rename(columns={"count": "n"})
        frame = frame.sort_values(["magnitude", "label"], kind="stable").reset_index(drop=True)
        return frame[["transform", "magnitude", "label", "n", "n_correct", "sum_p_true"]]


def _mean_softmax_groups(sums: pd.DataFrame):
    """Yield ``(transform, label, magnitudes[M], mean softmax [M, K])`` per group."""
    combined = combine_softmax_sums(sums)
    for (name, label), group in combined.groupby(["transform", "label"], sort=True, observed=True):
        group = group.sort_values("magnitude")
        mags = group["magnitude"].to_numpy(dtype=np.float64)
        total = np.stack(list(group["softmax_sum"]))
        mean = total / group["count"].to_numpy(dtype=np.float64)[:, None]
        yield str(name), int(label), mags, mean


def softmax_curves(sums: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Class-wise mean softmax curves (Bunne et al. 2018, figures 2-3).

    For the images of true class ``label`` under one transformation, the mean softmax
    vector is taken at each magnitude; the ``top`` classes with the highest mean at any
    magnitude (ties: lower class index first) get one curve each and the remaining
    classes are condensed into "others", the max over them at each magnitude.

    Args:
        sums: softmax sums (see :func:`combine_softmax_sums`), any number of parts.
        top: number of classes drawn individually.

    Returns:
        Columns ``transform, label, magnitude, series, class_index, mean_softmax,
        is_true_class``; ``series`` is ``"top1"`` ... ``"top{top}"`` or ``"others"``
        (``class_index == -1``); no "others" rows when there are at most ``top`` classes.
    """
    rows = []
    for name, label, mags, mean in _mean_softmax_groups(sums):
        k = mean.shape[1]
        peak = mean.max(axis=0)
        order = np.argsort(-peak, kind="stable")
        chosen = order[: min(top, k)]
        for rank, cls in enumerate(chosen, start=1):
            rows.append(
                pd.DataFrame(
                    {
                        "transform": name,
                        "label": label,
                        "magnitude": mags,
                        "series": f"top{rank}",
                        "class_index": int(cls),
                        "mean_softmax": mean[:, cls],
                        "is_true_class": int(cls) == label,
                    }
                )
            )
        rest = order[min(top, k) :]
        if len(rest):
            rows.append(
                pd.DataFrame(
                    {
                        "transform": name,
                        "label": label,
                        "magnitude": mags,
                        "series": "others",
                        "class_index": -1,
                        "mean_softmax": mean[:, rest].max(axis=1),
                        "is_true_class": False,
                    }
                )
            )
    if not rows:
        return pd.DataFrame(
            columns=[
                "transform",
                "label",
                "magnitude",
                "series",
                "class_index",
                "mean_softmax",
                "is_true_class",
            ]
        )
    out = pd.concat(rows, ignore_index=True)
    out["class_index"] = out["class_index"].astype("int64")
    return out


def overtaken(
    sums: pd.DataFrame, identities: Mapping[str, float] | float | None = None
) -> pd.DataFrame:
    """Where the true class's mean softmax is first overtaken, on each side of the identity.

    At magnitude ``m`` the true class ``c`` is overtaken when some other class has a
    higher mean softmax over the images of class ``c``. The scan starts AT the identity
    (overtaken there means overtaken at the identity itself) and moves outwards.

    Args:
        sums: softmax sums (see :func:`combine_softmax_sums`).
        identities: identity magnitude per transformation (default: the registry's).

    Returns:
        Columns ``transform, label, overtaken_low, overtaken_high, overtaken_by_low,
        overtaken_by_high`` (the overtaking class, -1 when not overtaken; magnitudes NaN).
    """
    rows = []
    for name, label, mags, mean in _mean_softmax_groups(sums):
        i0 = _identity_position(mags, _identity_of(name, identities), name)
        true = mean[:, label] if label < mean.shape[1] else np.zeros(len(mags))
        other = mean.copy()
        if label < mean.shape[1]:
            other[:, label] = -np.inf
        best = other.argmax(axis=1)
        lost = other.max(axis=1) > true
        row = {"transform": name, "label": label}
        for side, order in (("low", range(i0, -1, -1)), ("high", range(i0, len(mags)))):
            hit = next((j for j in order if lost[j]), None)
            row[f"overtaken_{side}"] = float(mags[hit]) if hit is not None else np.nan
            row[f"overtaken_by_{side}"] = int(best[hit]) if hit is not None else -1
        rows.append(row)
    columns = [
        "transform",
        "label",
        "overtaken_low",
        "overtaken_high",
        "overtaken_by_low",
        "overtaken_by_high",
    ]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- thresholds


def _first_below(
    mags: np.ndarray, acc: np.ndarray, i0: int, fraction: float
) -> tuple[float, float]:
    """First magnitude on each side of ``i0`` with ``acc < fraction * acc[i0]``."""
    limit = fraction * acc[i0]
    low = next((mags[j] for j in range(i0 - 1, -1, -1) if acc[j] < limit), np.nan)
    high = next((mags[j] for j in range(i0 + 1, len(mags)) if acc[j] < limit), np.nan)
    return float(low), float(high)


def thresholds(
    class_accuracy: pd.DataFrame,
    *,
    sums: pd.DataFrame | None = None,
    identities: Mapping[str, float] | float | None = None,
    fraction: float = 0.5,
) -> pd.DataFrame:
    """Breaking thresholds per class and transformation (both sides of the identity).

    The threshold on the high side is the smallest magnitude ``m > identity`` at which
    the class's accuracy is below ``fraction * accuracy(identity)``; on the low side the
    largest ``m < identity`` with the same property. A class whose identity accuracy is 0
    has no threshold. A row with ``label == -1`` does the same for the overall accuracy.

    Args:
        class_accuracy: :func:`class_accuracy_curve` output (or records / counts).
        sums: softmax sums; when given, the :func:`overtaken` columns are joined in.
        identities: identity magnitude per transformation (default: the registry's).
        fraction: relative accuracy drop that defines the threshold, in ``(0, 1]``.

    Returns:
        Columns ``transform, label, n, identity, identity_accuracy, identity_accuracy_low,
        identity_accuracy_high, threshold_low, threshold_high`` (+ ``overtaken_low,
        overtaken_high, overtaken_by_low, overtaken_by_high`` with ``sums``); NaN = not
        reached in the swept range. ``identity_accuracy_low/high`` is the 95% Wilson
        interval of the identity accuracy (not a side of the identity).
    """
    if not 0.0 < fraction <= 1.0:
        raise InvariscopeError(f"threshold fraction must be in (0, 1], got {fraction}")
    if "accuracy" not in class_accuracy.columns:
        class_accuracy = class_accuracy_curve(class_accuracy)
    _check_columns(
        class_accuracy, ["transform", "magnitude", "label", "n", "accuracy"], "class accuracy table"
    )
    counts = class_accuracy.assign(n_correct=class_accuracy["accuracy"] * class_accuracy["n"])
    overall = (
        counts.groupby(["transform", "magnitude"], sort=True, observed=True)[["n", "n_correct"]]
        .sum()
        .reset_index()
    )
    overall["label"] = ALL_CLASSES
    overall["accuracy"] = overall["n_correct"] / overall["n"]
    frame = pd.concat([overall, counts], ignore_index=True)
    rows = []
    for (name, label), group in frame.groupby(["transform", "label"], sort=True, observed=True):
        group = group.sort_values("magnitude")
        mags = group["magnitude"].to_numpy(dtype=np.float64)
        acc = group["accuracy"].to_numpy(dtype=np.float64)
        identity = _identity_of(str(name), identities)
        i0 = _identity_position(mags, identity, str(name))
        low, high = _first_below(mags, acc, i0, fraction)
        rows.append(
            {
                "transform": str(name),
                "label": int(label),
                "n": int(group["n"].iloc[i0]),
                "identity": identity,
                "identity_accuracy": float(acc[i0]),
                "threshold_low": low,
                "threshold_high": high,
            }
        )
    out = pd.DataFrame(
        rows,
        columns=[
            "transform",
            "label",
            "n",
            "identity",
            "identity_accuracy",
            "threshold_low",
            "threshold_high",
        ],
    )
    # counts are integers: undo the float round trip through accuracy * n
    _insert_interval(
        out, "identity_accuracy", np.round(out["identity_accuracy"] * out["n"]), out["n"]
    )
    if sums is not None:
        out = out.merge(overtaken(sums, identities), on=["transform", "label"], how="left")
        out["overtaken_by_low"] = out["overtaken_by_low"].fillna(-1).astype("int64")
        out["overtaken_by_high"] = out["overtaken_by_high"].fillna(-1).astype("int64")
    return out


# -------------------------------------------------------------------- breaking magnitude


def breaking_from_predictions(
    pred: np.ndarray, magnitudes: np.ndarray, i0: int
) -> tuple[np.ndarray, np.ndarray]:
    """Breaking magnitudes ``(low[N], high[N])`` from predictions ``pred`` ``[N, M]``.

    ``magnitudes`` ``[M]`` are sorted and ``i0`` is the position of the identity; NaN
    where the prediction never differs from ``pred[:, i0]`` on that side.
    """
    changed = pred != pred[:, i0 : i0 + 1]
    high_side = changed[:, i0 + 1 :]
    low_side = changed[:, :i0][:, ::-1]
    high = np.full(len(pred), np.nan)
    low = np.full(len(pred), np.nan)
    if high_side.shape[1]:
        hit = high_side.any(axis=1)
        high[hit] = magnitudes[i0 + 1 + high_side.argmax(axis=1)][hit]
    if low_side.shape[1]:
        hit = low_side.any(axis=1)
        low[hit] = magnitudes[i0 - 1 - low_side.argmax(axis=1)][hit]
    return low, high


def breaking_magnitudes(
    records: pd.DataFrame, identities: Mapping[str, float] | float | None = None
) -> pd.DataFrame:
    """Per-image breaking magnitudes of a one-parameter sweep.

    Moving out from the identity on each side, the breaking magnitude is the first
    magnitude where the top-1 prediction differs from the prediction at the identity
    (NaN when it never changes within the swept range). Each image must have a record
    at every swept magnitude of its transformation.

    Args:
        records: columns ``transform, magnitude, index, label, pred``.
        identities: identity magnitude per transformation (default: the registry's).

    Returns:
        Columns ``transform, index, label, pred_identity, break_low, break_high``, sorted
        by transform then index.
    """
    _check_columns(records, ["transform", "magnitude", "index", "label", "pred"], "records table")
    columns = ["transform", "index", "label", "pred_identity", "break_low", "break_high"]
    parts = []
    for name, group in records.groupby("transform", sort=True, observed=True):
        table = group.pivot(index="index", columns="magnitude", values="pred").sort_index(axis=1)
        if table.isna().to_numpy().any():
            raise ValueError(f"records of '{name}' miss some (image, magnitude) pairs")
        mags = table.columns.to_numpy(dtype=np.float64)
        i0 = _identity_position(mags, _identity_of(str(name), identities), str(name))
        pred = table.to_numpy(dtype=np.int64)
        low, high = breaking_from_predictions(pred, mags, i0)
        labels = group.drop_duplicates("index").set_index("index")["label"].reindex(table.index)
        parts.append(
            pd.DataFrame(
                {
                    "transform": str(name),
                    "index": table.index.to_numpy(dtype=np.int64),
                    "label": labels.to_numpy(dtype=np.int64),
                    "pred_identity": pred[:, i0],
                    "break_low": low,
                    "break_high": high,
                }
            )
        )
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def breaking_summary(breaking: pd.DataFrame) -> pd.DataFrame:
    """Summarise per-image breaking magnitudes per class (and over all, ``label == -1``).

    Returns:
        Columns ``transform, label, n, broken_low, broken_low_low, broken_low_high,
        broken_high, broken_high_low, broken_high_high, median_break_low,
        median_break_high``: the fraction of images whose prediction changes within the
        swept range on each side (``broken_<side>``, followed by its 95% Wilson interval
        ``broken_<side>_low`` / ``broken_<side>_high``), and the median breaking magnitude
        over those images.
    """
    _check_columns(breaking, ["transform", "label", "break_low", "break_high"], "breaking table")
    both = pd.concat([breaking.assign(label=ALL_CLASSES), breaking], ignore_index=True)
    grouped = both.groupby(["transform", "label"], sort=True, observed=True)
    out = grouped.agg(
        n=("break_low", "size"),
        broken_low=("break_low", lambda s: float(s.notna().mean())),
        broken_high=("break_high", lambda s: float(s.notna().mean())),
        median_break_low=("break_low", "median"),
        median_break_high=("break_high", "median"),
    ).reset_index()
    out["label"] = out["label"].astype("int64")
    n_broken = grouped[["break_low", "break_high"]].count().reset_index(drop=True)
    for side in ("low", "high"):
        _insert_interval(out, f"broken_{side}", n_broken[f"break_{side}"], out["n"])
    return out


# ---------------------------------------------------------------------------- worst case

#: The four accuracies of Engstrom et al. 2019, in the order they are reported.
WORST_CASE_SETTINGS = ("natural", "random", "worst_of_k", "grid")


def worst_case_summary(per_image: pd.DataFrame) -> pd.DataFrame:
    """Natural / random / worst-of-k / grid accuracy from the per-image worst-case table.

    Args:
        per_image: columns ``label`` and ``<setting>_correct`` for each setting in
            :data:`WORST_CASE_SETTINGS` (bool).

    Returns:
        Columns ``label, setting, n, accuracy, accuracy_low, accuracy_high``: one row per
        setting over all images (``label == -1``) and per class, with the 95% Wilson
        interval of the accuracy.
    """
    _check_columns(
        per_image, ["label", *(f"{s}_correct" for s in WORST_CASE_SETTINGS)], "worst-case table"
    )
    both = pd.concat([per_image.assign(label=ALL_CLASSES), per_image], ignore_index=True)
    rows = []
    for label, group in both.groupby("label", sort=True):
        for setting in WORST_CASE_SETTINGS:
            correct = group[f"{setting}_correct"]
            rows.append(
                {
                    "label": int(label),
                    "setting": setting,
                    "n": len(group),
                    "accuracy": float(correct.mean()),
                    "n_correct": int(correct.astype("int64").sum()),
                }
            )
    out = pd.DataFrame(rows, columns=["label", "setting", "n", "accuracy", "n_correct"])
    _insert_interval(out, "accuracy", out["n_correct"], out["n"])
    return out.drop(columns="n_correct")
