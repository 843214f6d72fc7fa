"""The offline HTML report: one page over finished run directories, from stored results only.

``build_report(["runs/sweep"], "report")`` writes ``report/index.html`` with one section
per run (what the measure means, its figures, its aggregate tables, its summary and its
exact configuration) and copies the figures beside the page. Rendering reads the run
directories only: it never measures, never loads a model and needs no network, so the
page opens from ``file://`` anywhere.
"""

from invariscope.report.html import build_report

__all__ = ["build_report"]
