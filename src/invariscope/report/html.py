"""Render finished run directories into one self-contained, offline HTML page.

Layout of a report directory::

    REPORT_DIR/
      index.html                 the page (inline CSS, no scripts, no remote resources)
      runs/<k>-<slug>/<fig>.png  the figures of run k, copied beside the page

Each run becomes a ``<section id="run-<k>-<slug>">``, dispatched on the analysis named in
its configuration through :func:`invariscope.engine.registry.get_analysis`; sections
follow the registry's order (sweeps first), runs of one analysis in the order given.
A section opens with the analysis's headline finding (``Analysis.headline``: numbers
with intervals), what the measure means and the paper, then its pivoted tables
(``Analysis.pivots``: layer x transformation, model x protocol, ... with units), then its
figures (one per row; a wide one spreads to the window and links to its full size), then
a collapsed "All values" block with the stored summary and aggregate tables, then the
run's provenance. Titles are made distinct (``Analysis.section_title``, else the run
directory's name). A run of an analysis this version does not know still gets a section
(all its figures and tables) with a note.

Everything comes from the run directory (config, manifest, meta, aggregates, figures):
rendering never measures and never loads a model. All text is escaped; the page is
written atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from invariscope import __version__
from invariscope.errors import InvariscopeError
from invariscope.runs import RunStore

__all__ = ["MAX_ROWS", "build_report", "run_slug", "section_id"]

#: Rows of an aggregate table shown in the page (the rest are counted in a note).
MAX_ROWS = 60
#: Tables with more rows than this start collapsed.
OPEN_ROWS = 30
#: CSS pixels of the text column: a wider figure spreads to the window's width.
TEXT_WIDTH = 1000
_MAX_TEXT = 80
_MAX_ITEMS = 4
_FIGURES = "figures"
_RUNS = "runs"
_SECTION_DIR_RE = re.compile(r"^\d+-[a-z0-9-]*$")


# ------------------------------------------------------------------------ naming


def run_slug(run_dir: str | os.PathLike[str]) -> str:
    """A URL- and id-safe slug of a run directory's name (``"My run #2"`` -> ``"my-run-2"``)."""
    name = Path(os.path.abspath(run_dir)).name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-") or "run"


def section_id(k: int, run_dir: str | os.PathLike[str]) -> str:
    """The HTML id of the section of the ``k``-th run (1-based) of a report."""
    return f"run-{k}-{run_slug(run_dir)}"


# --------------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return False


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e4 <= abs(value) < 1e12:
        return f"{value:.0f}"
    return f"{value:.4g}"


def _truncate(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(value: Any, items: int = _MAX_ITEMS, depth: int = 0) -> str:
    """Compact text of one value: numbers with 4 significant digits, sequences shortened."""
    if isinstance(value, np.ndarray) and value.ndim > 1:
        return f"array {'×'.join(str(n) for n in value.shape)}"
    if isinstance(value, list | tuple | np.ndarray):
        seq = list(value)
        if depth >= 1:
            return f"[{len(seq)} value{'s' if len(seq) != 1 else ''}]" if seq else "[]"
        parts = [_short(v, items, depth + 1) for v in seq[:items]]
        more = len(seq) > items
        text = "[" + ", ".join(parts) + (", …" if more else "") + "]"
        return text + (f" ({len(seq)} values)" if more else "")
    if _is_missing(value):
        return "–"
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return _number(float(value))
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return str(value)


def _cell(value: Any, tag: str = "td", numeric: bool = False, items: int = _MAX_ITEMS) -> str:
    """One table cell: escaped, shortened (the full text in a tooltip when shortened)."""
    text = _short(value, items)
    classes = ["num"] if numeric else []
    if text == "–":
        classes.append("na")
    short = _truncate(text)
    title = f' title="{_e(_truncate(text, 2000))}"' if short != text else ""
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f"<{tag}{cls}{title}>{_e(short)}</{tag}>"


def _frame_html(frame: pd.DataFrame, max_rows: int = MAX_ROWS, cls: str = "data") -> str:
    """An HTML table of the first ``max_rows`` rows of ``frame`` (all text escaped)."""
    shown = frame.head(max_rows)
    columns = list(frame.columns)
    dtypes = list(frame.dtypes)  # by position: column names need not be unique
    numeric = [
        pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t) for t in dtypes
    ]
    head = "".join(
        ('<th class="num">' if num else "<th>") + f"{_e(c)}</th>"
        for c, num in zip(columns, numeric, strict=True)
    )
    values = [shown.iloc[:, j].tolist() for j in range(len(columns))]
    body = "\n".join(
        "<tr>"
        + "".join(_cell(v, numeric=num) for v, num in zip(row, numeric, strict=True))
        + "</tr>"
        for row in zip(*values, strict=True)
    )
    return (
        f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted-key rows of nested dictionaries (lists are leaves)."""
    if isinstance(obj, dict) and obj:
        rows: list[tuple[str, Any]] = []
        for key, value in obj.items():
            rows.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    return [(prefix, obj)]


def _key_value_table(rows: Iterable[tuple[str, Any]], raw: Sequence[str] = ()) -> str:
    """A two-column table; keys in ``raw`` have values that are already HTML."""
    out = []
    for key, value in rows:
        cell = f"<td>{value}</td>" if key in raw else _cell(value, items=12)
        out.append(f"<tr><th>{_e(key)}</th>{cell}</tr>")
    return '<table class="kv"><tbody>\n' + "\n".join(out) + "\n</tbody></table>"


def _json_block(obj: Any) -> str:
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return f"<pre><code>{_e(text)}</code></pre>"


# ------------------------------------------------------------------------ figures


def _png_display_size(path: Path) -> tuple[int, int] | None:
    """(width, height) in CSS pixels from the PNG header and its dpi; None if unreadable."""
    width = height = 0
    per_metre = 0
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                header = f.read(8)
                if len(header) < 8:
                    break
                length, kind = struct.unpack(">I4s", header)
                if kind == b"IHDR":
                    width, height = struct.unpack(">II", f.read(8))
                    f.seek(length - 8 + 4, os.SEEK_CUR)
                elif kind == b"pHYs":
                    x, _, unit = struct.unpack(">IIB", f.read(9))
                    per_metre = x if unit == 1 else 0
                    f.seek(length - 9 + 4, os.SEEK_CUR)
                elif kind in (b"IDAT", b"IEND"):
                    break
                else:
                    f.seek(length + 4, os.SEEK_CUR)
    except (OSError, struct.error):
        return None
    if not width or not height:
        return None
    dpi = per_metre * 0.0254
    scale = min(1.0, 96.0 / dpi) if dpi > 0 else 1.0
    return max(1, round(width * scale)), max(1, round(height * scale))


def _png_pixels(path: Path) -> tuple[int, int] | None:
    """(width, height) in pixels from the PNG header; None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _figures(run_dir: Path, order: Sequence[str]) -> list[Path]:
    """The run's PNG figures: those named in ``order`` first (in that order), then sorted."""
    folder = run_dir / _FIGURES
    if not folder.is_dir():
        return []
    found = {p.stem: p for p in folder.glob("*.png") if p.is_file()}
    first = [found[name] for name in order if name in found]
    rest = [found[name] for name in sorted(found) if name not in set(order)]
    return first + rest


# ----------------------------------------------------------------------- sections


@dataclass
class _Run:
    k: int
    run_dir: Path
    store: RunStore
    analysis: str
    entry: Any = None  # AnalysisEntry, or None for an analysis this version does not know
    unknown_reason: str = ""
    figures: list[Path] = field(default_factory=list)
    title: str = ""

    @property
    def id(self) -> str:
        return section_id(self.k, self.run_dir)

    @property
    def folder(self) -> str:
        return f"{self.k}-{run_slug(self.run_dir)}"

    @property
    def rank(self) -> int:
        """Where the analysis stands in the registry (unknown analyses last)."""
        return _registry_rank().get(self.analysis, len(_registry_rank()))

    def hook(self, name: str) -> Any:
        """The analysis's presentation class method ``name`` (the protocol's default when
        the registered class does not derive from :class:`Analysis`)."""
        from invariscope.engine.analysis import Analysis

        cls = self.entry.analysis if self.entry is not None else Analysis
        method = getattr(cls, name, None)
        return method if callable(method) else getattr(Analysis, name)


def _registry_rank() -> dict[str, int]:
    from invariscope.engine.registry import list_analyses

    return {e.name: k for k, e in enumerate(list_analyses())}


class _Aggregates(Mapping):
    """The run's aggregate tables by name, each read from disk on first use."""

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self._names = list(store.aggregates())
        self._read: dict[str, pd.DataFrame] = {}

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._read:
            self._read[name] = self._store.read_aggregate(name)
        return self._read[name]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _lookup(analysis: str) -> tuple[Any, str]:
    from invariscope.engine.registry import get_analysis

    if not analysis:
        return None, "its configuration names no analysis"
    try:
        return get_analysis(analysis), ""
    except InvariscopeError as err:
        return None, str(err)


def _open(k: int, run_dir: Path) -> _Run:
    store = RunStore.open(run_dir)
    if not store.is_complete:
        raise InvariscopeError(
            f"run '{run_dir}' is not complete (status: {store.status}); finish it by running "
            "the same command again (it resumes), then make the report"
        )
    analysis = store.config.get("analysis")
    analysis = analysis if isinstance(analysis, str) else ""
    entry, reason = _lookup(analysis)
    order = tuple(entry.figure_order) if entry is not None else ()
    run = _Run(k, run_dir, store, analysis, entry, reason, _figures(run_dir, order))
    if entry is not None:
        try:
            run.title = str(run.hook("section_title")(entry.title, store.config))
        except Exception:  # noqa: BLE001 - a presentation bug must not lose the report
            run.title = entry.title
    else:
        run.title = f"Analysis '{analysis}'" if analysis else "Unnamed analysis"
    return run


def _what_was_measured(run: _Run) -> str:
    """``model on data`` from the run's meta (empty when unknown)."""
    meta, config = run.store.meta, run.store.config
    model = meta.get("model_spec")
    data = meta.get("data_spec")
    if not isinstance(data, str):
        data = config.get("data", {}).get("name") if isinstance(config.get("data"), dict) else None
    if not isinstance(data, str):
        return ""
    if isinstance(model, str):
        return f"{Path(model).name if Path(model).suffix else model} on {data}"
    return f"on {data}"


def _distinct_titles(runs: list[_Run]) -> None:
    """Runs whose titles coincide get what they measured appended (``model on data``),
    then, where that still coincides, their run directory's path (as far up as tells them
    apart), then their number."""

    def clashing() -> list[_Run]:
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.title] = counts.get(run.title, 0) + 1
        return [run for run in runs if counts[run.title] > 1]

    for run in clashing():
        what = _what_was_measured(run)
        if what:
            run.title = f"{run.title}: {what}"
    for depth in (1, 2, 3):
        clash = clashing()
        if not clash:
            return
        base = {id(r): r.title for r in clash}
        for run in clash:
            parts = Path(os.path.abspath(run.run_dir)).parts[-depth:]
            run.title = f"{base[id(run)]} ({'/'.join(parts)})"
        if clashing():
            for run in clash:
                run.title = base[id(run)]
    for run in clashing():
        run.title = f"{run.title} (run {run.k})"


def _figures_html(run: _Run) -> str:
    """One figure per row, at most the page width; a figure wider than the text column
    spreads to the window's width, and every figure links to its full-size PNG."""
    if not run.figures:
        return '<p class="note">This run has no figures.</p>'
    out = []
    for fig in run.figures:
        href = f"{_RUNS}/{quote(run.folder)}/{quote(fig.name)}"
        size = _png_display_size(fig)
        dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
        wide = size is not None and size[0] > TEXT_WIDTH
        cls = ' class="wide"' if wide else ""
        style = f' style="--w: {size[0]}px"' if wide else ""
        pixels = _png_pixels(fig)
        full = f" ({pixels[0]} × {pixels[1]} px)" if pixels else ""
        out.append(
            f'<figure{cls}{style} data-figure="{_e(fig.stem)}"><a href="{_e(href)}" '
            f'target="_blank" title="open full size"><img src="{_e(href)}"{dims} '
            f'alt="{_e(fig.stem)}" loading="eager"></a><figcaption><code>{_e(fig.name)}</code> '
            f'<a class="enlarge" href="{_e(href)}" target="_blank">open full size{_e(full)}</a>'
            "</figcaption></figure>"
        )
    return '<div class="figures">\n' + "\n".join(out) + "\n</div>"


def _pivot_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with its row labels (a named or multi-level index) as first columns."""
    index = frame.index
    named = any(n is not None for n in index.names)
    if isinstance(index, pd.MultiIndex) or named:
        return frame.reset_index()
    return frame.reset_index(drop=True)


def _headline_html(run: _Run, aggregates: Mapping[str, pd.DataFrame]) -> str:
    try:
        text = str(run.hook("headline")(run.store.summary, aggregates, run.store.config))
    except Exception as err:  # noqa: BLE001 - a presentation bug must not lose the report
        return (
            f'<p class="note warn">The headline of this run could not be written '
            f"({_e(type(err).__name__)}: {_e(err)}); the values are below.</p>"
        )
    return f'<p class="headline">{_e(text)}</p>' if text else ""


def _pivots_html(run: _Run, aggregates: Mapping[str, pd.DataFrame]) -> str:
    try:
        pivots = dict(run.hook("pivots")(aggregates, run.store.config))
    except Exception as err:  # noqa: BLE001 - a presentation bug must not lose the report
        return (
            f'<p class="note warn">The tables of this run could not be pivoted '
            f"({_e(type(err).__name__)}: {_e(err)}); the stored tables are under All values.</p>"
        )
    out = []
    for k, (caption, frame) in enumerate(pivots.items(), start=1):
        shown = _pivot_frame(frame)
        rows = len(shown)
        note = f'<p class="note">first {MAX_ROWS} of {rows} rows</p>' if rows > MAX_ROWS else ""
        out.append(
            f'<div class="pivot" id="{_e(run.id)}-pivot-{k}" data-pivot="{_e(caption)}">'
            f"<h4>{_e(caption)}</h4>\n{_frame_html(shown, cls='data pivot')}{note}</div>"
        )
    return "\n".join(out)


def _tables_html(run: _Run) -> str:
    stored = run.store.aggregates()
    if run.entry is not None:
        names = [n for n in run.entry.report_tables if n in stored]
        missing = [n for n in run.entry.report_tables if n not in stored]
        others = [n for n in stored if n not in set(run.entry.report_tables)]
    else:
        names, missing, others = stored, [], []
    out = []
    for name in names:
        frame = run.store.read_aggregate(name)
        rows, cols = frame.shape
        note = f'<p class="note">first {MAX_ROWS} of {rows} rows</p>' if rows > MAX_ROWS else ""
        opened = " open" if rows <= OPEN_ROWS else ""
        out.append(
            f'<details class="table" id="{_e(run.id)}-table-{_e(name)}" '
            f'data-table="{_e(name)}"{opened}>'
            f"<summary><code>{_e(name)}</code> "
            f'<span class="muted">{rows} row{"s" if rows != 1 else ""} × {cols} column'
            f"{'s' if cols != 1 else ''}</span></summary>\n"
            f"{_frame_html(frame)}{note}</details>"
        )
    if not names:
        out.append('<p class="note">This run has no aggregate tables to show.</p>')
    if missing:
        out.append(f'<p class="note">Not stored in this run: {_e(", ".join(missing))}.</p>')
    if others:
        out.append(
            f'<p class="note">Also stored in <code>aggregates/</code>, not shown: '
            f"{_e(', '.join(others))}.</p>"
        )
    return "\n".join(out)


def _details_html(run: _Run) -> str:
    store, config, meta, manifest = run.store, run.store.config, run.store.meta, run.store.manifest
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    rows: list[tuple[str, Any]] = [
        ("run directory", str(Path(os.path.abspath(run.run_dir)))),
        ("analysis", run.analysis or "–"),
        ("status", manifest.get("status")),
        ("started", manifest.get("created")),
        ("finished", manifest.get("finished")),
        ("configuration hash", f"<code>{_e(store.config_hash)}</code>"),
        ("model", meta.get("model_spec")),
        ("model class", model.get("class")),
        ("model fingerprint", model.get("fingerprint")),
        ("data", meta.get("data_spec") or data.get("name")),
        ("data size", data.get("size")),
        ("data fingerprint", data.get("fingerprint")),
        ("device", meta.get("device")),
        ("processes", meta.get("world_size") or manifest.get("world_size")),
        ("invariscope version", meta.get("invariscope")),
        ("torch version", meta.get("torch")),
    ]
    rows = [(k, v) for k, v in rows if v is not None and v != ""]
    fingerprints = {"model fingerprint", "data fingerprint"}
    rows = [(k, f"<code>{_e(v)}</code>") if k in fingerprints else (k, v) for k, v in rows]
    raw = ["configuration hash", *fingerprints]
    return (
        _key_value_table(rows, raw=raw)
        + '\n<details class="config"><summary>Configuration (<code>config.json</code>)'
        + "</summary>\n"
        + _json_block(config)
        + '</details>\n<details class="config"><summary>Environment (<code>meta.json</code>)'
        + "</summary>\n"
        + _json_block(meta)
        + "</details>"
    )


def _summary_html(run: _Run) -> str:
    summary = run.store.summary
    if not summary:
        return '<p class="note">The run stored no summary.</p>'
    return _key_value_table(_flatten(summary))


def _section_html(run: _Run) -> str:
    """Title, what the measure means, the headline finding, the pivoted tables, the
    figures, then (collapsed) every stored value, and the run's provenance."""
    aggregates = _Aggregates(run.store)
    parts = [
        f'<section class="run" id="{_e(run.id)}" data-analysis="{_e(run.analysis)}" '
        f'data-run="{_e(run.run_dir.name)}">',
        f'<h2><span class="index">{run.k}</span><span class="title">{_e(run.title)}</span> '
        f'<span class="run-name">{_e(Path(os.path.abspath(run.run_dir)).name)}</span></h2>',
    ]
    if run.entry is not None:
        parts.append(_headline_html(run, aggregates))
        parts.append(f'<p class="about">{_e(run.entry.about)}</p>')
        if run.entry.paper:
            parts.append(
                f'<p class="paper"><span class="muted">Paper:</span> {_e(run.entry.paper)}</p>'
            )
        pivots = _pivots_html(run, aggregates)
        if pivots:
            parts += ["<h3>Tables</h3>", pivots]
    else:
        parts.append(
            '<p class="note warn">This version of invariscope does not know how to present '
            f"this run ({_e(run.unknown_reason)}): it shows the run's figures and all its "
            "tables as stored.</p>"
        )
    parts += [
        "<h3>Figures</h3>",
        _figures_html(run),
    ]
    stored = _tables_html(run)
    if run.entry is None:
        parts += ["<h3>Tables</h3>", stored]
    parts += [
        '<details class="all-values"><summary>All values <span class="muted">(the stored '
        "summary"
        + (" and aggregate tables" if run.entry is not None else "")
        + ")</span></summary>",
        "<h4>Summary</h4>",
        _summary_html(run),
    ]
    if run.entry is not None:
        parts += ["<h4>Stored tables</h4>", stored]
    parts += [
        "</details>",
        "<h3>Run</h3>",
        _details_html(run),
        '<p class="top"><a href="#contents">↑ contents</a></p>',
        "</section>",
    ]
    return "\n".join(parts)


_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0;
  --zebra: #f6f8fa; --accent: #0969da; --page: #f3f4f6; --card: #ffffff; }
* { box-sizing: border-box; }
html { background: var(--page); }
body { margin: 0 auto; max-width: 1120px; padding: 28px 24px 40px; color: var(--fg);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  "Noto Sans", "DejaVu Sans", sans-serif; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono",
  "DejaVu Sans Mono", monospace; font-size: 0.88em; }
header.page h1 { margin: 0 0 4px; font-size: 28px; letter-spacing: -0.01em; }
header.page p { margin: 0; color: var(--muted); }
nav.toc, section.run { background: var(--card); border: 1px solid var(--line);
  border-radius: 10px; margin: 22px 0; }
nav.toc { padding: 14px 24px; }
nav.toc h2 { margin: 0 0 6px; font-size: 16px; }
nav.toc ol { margin: 0; padding-left: 22px; }
nav.toc li { margin: 3px 0; }
section.run { padding: 6px 28px 18px; }
section.run h2 { font-size: 22px; margin: 18px 0 6px; display: flex; align-items: baseline;
  gap: 10px; flex-wrap: wrap; }
h2 .index { display: inline-block; min-width: 28px; padding: 0 8px; border-radius: 14px;
  background: var(--accent); color: #fff; font-size: 15px; text-align: center; }
h2 .run-name { font: 500 14px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  color: var(--muted); background: var(--zebra); border: 1px solid var(--line);
  border-radius: 6px; padding: 1px 8px; }
h3 { font-size: 16px; margin: 26px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.muted { color: var(--muted); }
p.about { margin: 6px 0; }
p.paper { margin: 4px 0 10px; font-style: italic; }
p.note { color: var(--muted); font-size: 13px; margin: 6px 0; }
p.warn { color: #7d4e00; background: #fff8c5; border: 1px solid #eac54f; border-radius: 6px;
  padding: 8px 12px; font-size: 14px; }
p.top { text-align: right; font-size: 13px; margin: 18px 0 0; }
p.headline { font-size: 16px; line-height: 1.5; margin: 10px 0 8px; padding: 10px 14px;
  background: #ddf4ff; border-left: 4px solid var(--accent); border-radius: 6px; }
h4 { font-size: 14px; margin: 18px 0 4px; }
div.pivot { margin: 4px 0 14px; }
details.all-values { margin: 22px 0 8px; padding: 6px 12px; border: 1px solid var(--line);
  border-radius: 6px; }
details.all-values > summary { font-weight: 600; }
.figures { display: flex; flex-direction: column; align-items: center; }
figure { margin: 16px 0 22px; text-align: center; max-width: 100%; }
figure.wide { width: min(var(--w), calc(100vw - 48px)); max-width: none; }
a.enlarge { margin-left: 8px; font-size: 12px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px;
  background: #fff; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
table.data { margin: 6px 0 2px; }
table.data th { position: sticky; top: 0; background: #eaeef2; text-align: left;
  font-weight: 600; }
table.data th, table.data td { padding: 3px 10px; border-bottom: 1px solid var(--line);
  white-space: nowrap; }
table.data tbody tr:nth-child(even) { background: var(--zebra); }
table.data tbody tr:hover { background: #ddf4ff; }
th.num, td.num { text-align: right; }
td.na { color: #8c959f; }
table.kv th { text-align: left; font-weight: 500; color: var(--muted); padding: 3px 18px 3px 0;
  white-space: nowrap; vertical-align: top; }
table.kv td { padding: 3px 0; word-break: break-all; }
table.kv tr + tr > * { border-top: 1px solid var(--zebra); }
details { margin: 8px 0; }
details > summary { cursor: pointer; padding: 2px 0; }
details.table > summary code { font-weight: 600; }
pre { background: var(--zebra); border: 1px solid var(--line); border-radius: 6px;
  padding: 10px 14px; overflow: auto; max-height: 520px; }
footer { color: var(--muted); font-size: 13px; text-align: center; margin-top: 30px; }
@media print { html, body { background: #fff; } nav.toc, section.run { border: none; } }
"""


def _page(runs: list[_Run], generated: str) -> str:
    toc = "\n".join(
        f'<li><a href="#{_e(r.id)}">{_e(r.title)}</a> '
        f'<span class="muted">— <code>{_e(Path(os.path.abspath(r.run_dir)).name)}</code></span></li>'
        for r in runs
    )
    plural = "s" if len(runs) != 1 else ""
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="invariscope {_e(__version__)}">',
            f"<title>invariscope report ({len(runs)} run{plural})</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            '<header class="page">',
            "<h1>invariscope report</h1>",
            f"<p>{len(runs)} run{plural}, rendered from stored results only; generated "
            f"{_e(generated)}.</p>",
            "</header>",
            '<nav class="toc" id="contents"><h2>Contents</h2>',
            f"<ol>\n{toc}\n</ol></nav>",
            "<main>",
            *(_section_html(r) for r in runs),
            "</main>",
            f"<footer>Generated by invariscope {_e(__version__)} on {_e(generated)}.</footer>",
            "</body>",
            "</html>",
            "",
        ]
    )


# ----------------------------------------------------------------------- writing


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_figures(runs: list[_Run], out_dir: Path) -> None:
    folder = out_dir / _RUNS
    if folder.is_dir():  # figures of an earlier report in the same place
        for child in folder.iterdir():
            if child.is_dir() and _SECTION_DIR_RE.match(child.name):
                shutil.rmtree(child)
    for run in runs:
        target = folder / run.folder
        target.mkdir(parents=True, exist_ok=True)
        for fig in run.figures:
            shutil.copyfile(fig, target / fig.name)


def build_report(
    run_dirs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write ``out_dir/index.html`` over finished run directories and return its path.

    Args:
        run_dirs: one or more run directories written by an analysis (``invariscope
            sweep --out ...``); each must be complete. Each gets a section; sections
            follow the analysis registry's order (sweeps first, unknown analyses last),
            runs of the same analysis in the order given.
        out_dir: the report directory (created); figures are copied under
            ``out_dir/runs/<k>-<slug>/`` and referenced by relative paths, so the folder
            can be moved or opened from ``file://`` as a whole.

    Raises:
        InvariscopeError: a path that is not a run directory, a run that is not
            complete, the same run given twice, or ``out_dir`` that is a file.
    """
    if isinstance(run_dirs, str | os.PathLike):
        run_dirs = [run_dirs]
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise InvariscopeError("no run directories given; pass at least one, e.g. runs/sweep")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvariscopeError(f"report directory '{out}' is a file; pass a directory for --out")
    seen: dict[str, Path] = {}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            raise InvariscopeError(f"run directory '{path}' is given twice; give each run once")
        seen[key] = path
    opened = [_open(k, path) for k, path in enumerate(paths, start=1)]
    runs = sorted(opened, key=lambda r: r.rank)  # registry order; stable within an analysis
    for k, run in enumerate(runs, start=1):
        run.k = k
    _distinct_titles(runs)
    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    text = _page(runs, generated)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _copy_figures(runs, out)
        index = out / "index.html"
        _write_atomic(index, text)
    except OSError as err:
        raise InvariscopeError(
            f"cannot write the report to '{out}' ({type(err).__name__}: {err.strerror or err}); "
            "pass a writable directory for --out"
        ) from None
    return index
