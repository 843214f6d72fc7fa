"""Text helpers of the analyses' report methods (``headline``, ``pivots``): numbers with
their 95% intervals, as the demo's summary lines write them."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["ci", "fmt", "pct", "pct_ci", "pivot", "row", "with_unit"]


def _missing(value: Any) -> bool:
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def fmt(value: Any, digits: int = 3) -> str:
    """``0.8734 -> "0.873"``; None or NaN -> ``"n/a"``."""
    if _missing(value):
        return "n/a"
    v = float(value)
    if v == 0:
        return "0"
    return f"{v:.{digits}g}"


def ci(value: Any, low: Any, high: Any, digits: int = 3) -> str:
    """``"0.87 [0.79, 0.92]"``: a value with its 95% interval (the interval left out
    when missing)."""
    if _missing(low) or _missing(high):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def pct(value: Any) -> str:
    """``0.335 -> "33.5%"``."""
    return "n/a" if _missing(value) else f"{100 * float(value):.1f}%"


def pct_ci(value: Any, low: Any, high: Any) -> str:
    """``"33.5% [31.6, 35.5]"``: a fraction in percent with its 95% interval."""
    if _missing(low) or _missing(high):
        return pct(value)
    return f"{pct(value)} [{100 * float(low):.1f}, {100 * float(high):.1f}]"


def with_unit(name: str, unit: Any) -> str:
    """A column header with its unit: ``"rotation (degree)"``; no unit -> the name."""
    return f"{name} ({unit})" if isinstance(unit, str) and unit else name


def row(frame: pd.DataFrame, **where: Any) -> pd.Series | None:
    """The first row of ``frame`` whose columns equal ``where``, or None."""
    mask = pd.Series(True, index=frame.index)
    for key, value in where.items():
        if key not in frame.columns:
            return None
        mask &= frame[key] == value
    hits = frame[mask]
    return None if hits.empty else hits.iloc[0]


def pivot(table: pd.DataFrame, index: str | list[str], columns: str, values: str) -> pd.DataFrame:
    """``table`` pivoted: one row per ``index`` value, one column per ``columns`` value,
    both in order of first appearance; all-NaN rows and columns are kept (unlike
    ``DataFrame.pivot_table``). Duplicated cells are averaged."""
    keys = [index] if isinstance(index, str) else list(index)
    wide = table.groupby([*keys, columns], sort=False, dropna=False)[values].mean()
    wide = wide.unstack(columns)
    rows = table[keys].drop_duplicates()
    order = (
        pd.Index(rows[keys[0]], name=keys[0]) if len(keys) == 1 else pd.MultiIndex.from_frame(rows)
    )
    wide = wide.reindex(index=order, columns=list(dict.fromkeys(table[columns])))
    wide.columns.name = None
    return wide
