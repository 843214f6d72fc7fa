"""Figures rendered from stored tables (never from a model): measuring and drawing stay apart.

Every function takes tidy tables (as written by a run, read back with
``RunStore.read_table``), draws with matplotlib's object API (no pyplot state, no
display needed) and writes each figure as PNG and SVG.
"""

from invariscope.plots.sweep import (
    plot_accuracy_curves,
    plot_heatmaps,
    plot_softmax_curves,
    plot_thresholds,
    plot_worst_case,
    render_sweep_figures,
    render_sweep_run,
)

__all__ = [
    "plot_accuracy_curves",
    "plot_heatmaps",
    "plot_softmax_curves",
    "plot_thresholds",
    "plot_worst_case",
    "render_sweep_figures",
    "render_sweep_run",
]
