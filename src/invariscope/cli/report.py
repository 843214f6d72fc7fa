"""``invariscope report``: one offline HTML page over finished run directories."""

from __future__ import annotations

from pathlib import Path

import click

from invariscope.cli._app import cli


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Report directory: index.html is written there, the figures beside it.",
)
def report_cmd(run_dirs: tuple[Path, ...], out: Path) -> None:
    """Write an HTML report of finished runs to --out/index.html.

    One section per run directory, in the analyses' registry order (sweeps first; runs
    of one analysis in the order given): the headline finding, what the measure means and
    the paper it comes from, pivoted tables with units, the figures, all stored values
    (collapsed) and the exact configuration with the model and data fingerprints. The page is rendered from the
    stored results only (no model is loaded, nothing is measured) and works offline:
    open it from the file system, or copy the whole --out folder elsewhere.

    \b
    Example:
      invariscope report runs/sweep --out report
      invariscope report runs/sweep runs/sweep-augmented --out report && xdg-open report/index.html
    """
    from invariscope.report import build_report

    click.echo(str(build_report(list(run_dirs), out)))
