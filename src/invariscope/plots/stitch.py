"""Figures of the stitching analysis, drawn from its stored aggregate tables.

After Lenc & Vedaldi 2018 (table 6: the top-1 error of the stitched network
``psi_B o E o phi_A`` for each pair of layers, A's layer on the rows, B's on the
columns) and Kornblith et al. 2019 (linear CKA between the two networks' layers, as a
heatmap). A run stitches network A (role ``"model"``) into network B (role
``"model_b"``).

Tables (each optional; a missing table skips its panel):

- ``stitch_error``: ``layer_a, layer_b, order_a, order_b`` (a layer's position in its
  network), ``error`` (top-1 error of the stitched network, 0..1), ``error_low,
  error_high`` (95% interval), ``n``;
- ``cka``: ``layer_a, layer_b, order_a, order_b, cka`` (linear CKA, 0..1),
  ``constant_a, constant_b`` (a constant representation: CKA undefined);
- ``models``: ``model`` (``"model"`` = A, ``"model_b"`` = B), ``label`` (display name),
  ``error, error_low, error_high, n`` (the network's own top-1 error);
- ``layers``: ``model, layer, order`` (every layer of both networks: a layer no pair
  has a value for still gets its row / column, drawn "n/a").

Figure (written as ``stitch_cka.png`` (150 dpi) and ``stitch_cka.svg``, like the
sweep's): ``stitch_cka``, the stitched error (left) and CKA (right) as heatmaps with
the same axes, each cell annotated with its value. The error's colour scale runs
bright (0) to dark (1), the CKA's dark (0) to bright (1): bright = compatible layers
in both panels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from invariscope.errors import InvariscopeError
from invariscope.plots.shift import _present
from invariscope.plots.sweep import _save, figures_dir, stored_aggregates

__all__ = ["render_stitch_figures", "render_stitch_run"]

#: Colour-bar labels of the two panels.
ERROR_LABEL = "stitched top-1 error"
CKA_LABEL = "linear CKA"
#: Roles of the two networks in the ``models`` table.
_ROLES = {"A": "model", "B": "model_b"}
#: Tables with a heatmap panel, in panel order.
_PANEL_TABLES = ("stitch_error", "cka")


def _labels(tables: Mapping[str, pd.DataFrame]) -> dict[str, dict]:
    """``{"A": {"label", "error", "low", "high"}, "B": ...}`` from the ``models`` table."""
    info = {k: {"label": "", "error": math.nan} for k in _ROLES}
    models = _present(tables, "models")
    if models is None:
        return info
    for record in models.to_dict("records"):
        for key, role in _ROLES.items():
            if str(record.get("model")) == role:
                label = record.get("label")
                info[key] = {
                    "label": "" if _missing(label) else str(label),
                    "error": _float(record.get("error")),
                    "low": _float(record.get("error_low")),
                    "high": _float(record.get("error_high")),
                }
    return info


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _layers(
    tables: list[pd.DataFrame], side: str, listed: pd.DataFrame | None = None
) -> tuple[list[float], list[str]]:
    """Orders and names of one network's layers (``side`` ``"a"`` or ``"b"``), input first.

    ``listed`` (the ``layers`` table) adds the layers no pair has a value for.
    """
    names: dict[float, str] = {}
    if listed is not None and {"model", "layer", "order"} <= set(listed.columns):
        own = listed[listed["model"].astype(str) == _ROLES[side.upper()]]
        for order, name in zip(own["order"].astype(float), own["layer"].astype(str), strict=True):
            names.setdefault(order, name)
    for table in tables:
        pairs = zip(
            table[f"order_{side}"].astype(float), table[f"layer_{side}"].astype(str), strict=True
        )
        for order, name in pairs:
            names.setdefault(order, name)
    orders = sorted(names)
    return orders, [names[o] for o in orders]


def _matrix(table: pd.DataFrame, column: str, rows: list[float], cols: list[float]) -> np.ndarray:
    """``column`` as rows (order_a) x columns (order_b); NaN where a pair is missing."""
    sub = table.assign(
        _ra=table["order_a"].astype(float),
        _cb=table["order_b"].astype(float),
        _v=table[column].astype(float),
    )
    grid = sub.pivot_table(index="_ra", columns="_cb", values="_v", aggfunc="mean", dropna=False)
    return grid.reindex(index=rows, columns=cols).to_numpy(dtype=float)


def _flags(table: pd.DataFrame, rows: list[float], cols: list[float]) -> np.ndarray:
    """Cells where either representation is constant (CKA undefined)."""
    flag = np.zeros(len(table), dtype=bool)
    for column in ("constant_a", "constant_b"):
        if column in table.columns:
            flag |= table[column].fillna(False).astype(bool).to_numpy()
    sub = pd.DataFrame(
        {
            "_ra": table["order_a"].astype(float).to_numpy(),
            "_cb": table["order_b"].astype(float).to_numpy(),
            "_f": flag.astype(float),
        }
    )
    grid = sub.pivot_table(index="_ra", columns="_cb", values="_f", aggfunc="max")
    return grid.reindex(index=rows, columns=cols).fillna(0.0).to_numpy() > 0


def _text_colour(rgba) -> str:
    """Black on light cells, white on dark ones (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def _heatmap(
    fig: Figure,
    ax,
    values: np.ndarray,
    *,
    cmap_name: str,
    label: str,
    fontsize: float,
    marks: np.ndarray | None = None,
) -> None:
    """``values`` as an annotated 0..1 heatmap with a colour bar (missing cells grey)."""
    cmap = colormaps[cmap_name].with_extremes(bad="0.85")
    norm = Normalize(vmin=0.0, vmax=1.0)
    image = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=cmap,
        norm=norm,
        origin="upper",
        aspect="equal",
        interpolation="nearest",
    )
    for (r, c), v in np.ndenumerate(values):
        marked = marks is not None and bool(marks[r, c])
        if np.isfinite(v):
            text = f"{v:.2f}" + ("*" if marked else "")
            colour = _text_colour(cmap(norm(v)))
        else:
            text, colour = ("const" if marked else "n/a"), "0.25"
        ax.text(c, r, text, ha="center", va="center", fontsize=fontsize, color=colour)
    fig.colorbar(image, ax=ax, label=label, shrink=0.9, ticks=np.linspace(0, 1, 6))


#: The widest a figure is drawn (inches; 1600 px at the saved 150 dpi, less a margin).
MAX_WIDTH_IN = 10.4


def _stitch_figure(tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Stitched top-1 error and linear CKA as heatmaps: rows = layers of A, columns = of B."""
    present = {name: _present(tables, name) for name in _PANEL_TABLES}
    present = {k: v for k, v in present.items() if v is not None}
    if not present:
        return None
    info = _labels(tables)
    listed = _present(tables, "layers")
    rows, row_names = _layers(list(present.values()), "a", listed)
    cols, col_names = _layers(list(present.values()), "b", listed)
    n_rows, n_cols = len(rows), len(cols)
    # cells shrink with the matrix so a panel stays within about 5 inches
    cell = float(np.clip(4.6 / max(n_rows, n_cols), 0.32, 0.6))
    fontsize = 8 if cell >= 0.5 else 7 if cell >= 0.38 else 6
    row_chars = max(len(n) for n in row_names)
    col_chars = max(len(n) for n in col_names)
    panels = len(present)
    width = panels * (cell * n_cols + 0.07 * row_chars + 1.9) + 0.4
    height = cell * n_rows + 0.05 * col_chars + 2.2
    # side by side where they fit the page width (MAX_WIDTH_IN), else one above the other
    stacked = panels > 1 and width > MAX_WIDTH_IN
    if stacked:
        width, height = (width - 0.4) / panels + 0.4, height * panels
    fig = Figure(figsize=(max(width, 5.0), max(height, 3.2)), layout="constrained")
    axes = fig.subplots(panels, 1) if stacked else fig.subplots(1, panels, squeeze=False)[0]
    name = {k: v["label"] for k, v in info.items()}
    ylabel = f"layer of A ({name['A']})" if name["A"] else "layer of A"
    xlabel = f"layer of B ({name['B']})" if name["B"] else "layer of B"
    notes = []
    for ax, (table_name, table) in zip(axes, present.items(), strict=True):
        if table_name == "stitch_error":
            values = _matrix(table, "error", rows, cols)
            marks = np.zeros(values.shape, dtype=bool)
            _heatmap(fig, ax, values, cmap_name="viridis_r", label=ERROR_LABEL, fontsize=fontsize)
            title = "top-1 error of ψ_B ∘ E ∘ φ_A"
            if {"error_low", "error_high"} <= set(table.columns):
                half = np.concatenate(
                    [
                        (table["error"] - table["error_low"]).to_numpy(dtype=float),
                        (table["error_high"] - table["error"]).to_numpy(dtype=float),
                    ]
                )
                half = half[np.isfinite(half)]
                if len(half):
                    title += f"\n(95% interval: ±{half.max():.2f} at most)"
        else:
            marks = _flags(table, rows, cols)
            values = _matrix(table, "cka", rows, cols)
            _heatmap(
                fig,
                ax,
                values,
                cmap_name="viridis",
                label=CKA_LABEL,
                fontsize=fontsize,
                marks=marks,
            )
            title = "linear CKA between the layers\n(Kornblith et al. 2019)"
            if marks.any():
                notes.append("* or const: a layer constant over the images (CKA undefined)")
        missing = ~np.isfinite(values) & ~marks
        if missing.any() and "n/a: no value for this pair (e.g. not stitchable)" not in notes:
            notes.append("n/a: no value for this pair (e.g. not stitchable)")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(n_cols), col_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n_rows), row_names, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(length=2)
    parts = []
    for key in ("A", "B"):
        text = f"{key}: {name[key] or 'network ' + key}"
        error = info[key]["error"]
        if np.isfinite(error):
            text += f" (error {error:.2f})"
        parts.append(text)
    line = ", ".join(parts)
    # one line where it fits the figure, else A and B on a line each
    if 0.085 * len(line) > max(width, 5.0):
        line = ",\n".join(parts)
    table = present.get("stitch_error")
    n = table["n"].dropna().unique() if table is not None and "n" in table.columns else []
    suffix = f"; {int(n[0])} images per cell" if len(n) == 1 else ""
    fig.suptitle(f"Stitching A into B{suffix}; layers input → output\n{line}", fontsize=10)
    if notes:
        fig.supxlabel("; ".join(notes), fontsize=8, color="0.3")
    return fig


# ------------------------------------------------------------------- entry points


def render_stitch_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Draw the stitching figure from ``tables``; return the written paths.

    ``stitch_error`` and ``cka`` each draw a panel; a missing one leaves its panel out.
    """
    if not any(_present(tables, name) is not None for name in _PANEL_TABLES):
        raise InvariscopeError(
            "the stitching tables have neither 'stitch_error' nor 'cka'; draw the figures "
            "of a finished stitching run (run the stitching analysis first)"
        )
    fig = _stitch_figure(tables)
    return _save(fig, Path(out_dir), "stitch_cka") if fig is not None else []


def render_stitch_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a stored stitching run (read-only) into ``out_dir`` (default ``run_dir/figures``)."""
    return render_stitch_figures(stored_aggregates(run_dir), figures_dir(run_dir, out_dir))
