"""Sweep helpers: parse ``NAME=LOW:HIGH[:STEP]`` ranges and build 2-parameter grids."""

from __future__ import annotations

from typing import Any

import torch

from invariscope.errors import InvariscopeError
from invariscope.transforms.registry import get_transform

__all__ = ["parse_range", "grid", "grid_steps"]

_FORM = "expected NAME=LOW:HIGH[:STEP], e.g. rotation=-30:30:5"


def parse_range(text: str) -> tuple[str, float, float, float]:
    """Parse ``"rotation=-30:30:5"`` into ``(name, start, stop, step)``.

    The step is optional (``"rotation=-30:30"`` takes the transformation's default step).
    The name must be registered, and every magnitude of the sweep must lie in the
    transformation's domain; otherwise a one-line :class:`InvariscopeError` says what
    to fix. ``get_transform(name).magnitudes((start, stop, step))`` gives the values.

    >>> parse_range("rotation=-30:30:5")
    ('rotation', -30.0, 30.0, 5.0)
    >>> parse_range("zoom=0.5:2")
    ('zoom', 0.5, 2.0, 0.25)
    """
    if not isinstance(text, str):
        raise InvariscopeError(f"range {text!r} must be a string; {_FORM}")
    name, sep, values = text.strip().partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise InvariscopeError(f"range '{text}': {_FORM}")
    spec = get_transform(name)
    if spec.default_range is None:
        raise InvariscopeError(
            f"range '{text}': {name} has no scalar sweep; sweep rotation, zoom, translate_x, ... instead"
        )
    parts = values.split(":")
    if len(parts) not in (2, 3):
        raise InvariscopeError(f"range '{text}': {_FORM}")
    numbers = []
    for part in parts:
        try:
            numbers.append(float(part))
        except ValueError:
            raise InvariscopeError(f"range '{text}': '{part}' is not a number; {_FORM}") from None
    if len(numbers) == 2:
        numbers.append(float(spec.default_range[2]))
    start, stop, step = numbers
    spec.magnitudes((start, stop, step))  # checks step > 0, start <= stop, the domain
    return name, start, stop, step


def _values(name: str, mags: Any) -> torch.Tensor:
    spec = get_transform(name)
    if mags is None or isinstance(mags, str):
        return spec.magnitudes(mags)
    values = torch.as_tensor(mags, dtype=torch.float64).flatten()
    spec.check(values)
    return values


def grid(name_a: str, mags_a: Any = None, name_b: str | None = None, mags_b: Any = None):
    """All pairs of magnitudes of two transformations, as a tidy DataFrame.

    Args:
        name_a, name_b: registered transformation names (applied a first, then b).
        mags_a, mags_b: explicit magnitudes (a 1-D tensor, list, tuple or array), a range
            string ``"start:stop[:step]"``, or None for the default sweep.

    Returns:
        ``pandas.DataFrame`` with one row per pair and columns ``name_a, a, name_b, b``
        (``a`` and ``b`` the float magnitudes), ``a``-major: ``a`` varies slowest, as
        ``itertools.product(mags_a, mags_b)``. Evaluate it on one image ``x`` ``[1, C, H, W]``
        with ``compose(x.expand(len(df), -1, -1, -1), grid_steps(df))``.

    >>> df = grid("rotation", [0, 90], "zoom", [1, 2])
    >>> df[["a", "b"]].values.tolist()
    [[0.0, 1.0], [0.0, 2.0], [90.0, 1.0], [90.0, 2.0]]
    """
    import pandas as pd

    if name_b is None:
        raise InvariscopeError("grid: needs two transformations, name_a and name_b")
    a = _values(name_a, mags_a)
    b = _values(name_b, mags_b)
    aa, bb = torch.meshgrid(a, b, indexing="ij")
    return pd.DataFrame(
        {
            "name_a": name_a,
            "a": aa.flatten().numpy(),
            "name_b": name_b,
            "b": bb.flatten().numpy(),
        }
    )


def grid_steps(df) -> list[tuple[str, torch.Tensor]]:
    """The ``compose`` steps ``[(name_a, a[N]), (name_b, b[N])]`` of a :func:`grid` DataFrame."""
    missing = {"name_a", "a", "name_b", "b"} - set(df.columns)
    if missing:
        raise InvariscopeError(
            f"grid_steps: DataFrame lacks columns {sorted(missing)}; build it with grid()"
        )
    steps = []
    for name_col, col in (("name_a", "a"), ("name_b", "b")):
        names = df[name_col].unique()
        if len(names) != 1:
            raise InvariscopeError(
                f"grid_steps: column {name_col} must hold one name, got {list(names)}"
            )
        steps.append(
            (str(names[0]), torch.tensor(df[col].to_numpy(dtype=float), dtype=torch.float64))
        )
    return steps
