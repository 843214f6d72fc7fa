"""``invariscope sweep``: transformation-sensitivity screening of a classifier into a run directory."""

from __future__ import annotations

import math
from pathlib import Path

import click

from invariscope.cli._app import cli
from invariscope.cli._engine import engine_options, pop_common, run_analysis_command, split_list
from invariscope.cli._vocab import magnitude_entries, parse_magnitude


def budget_from_options(kwargs: dict):
    """The :class:`SpatialBudget` of the ``--wc-*`` options (removed from ``kwargs``)."""
    from invariscope.errors import InvariscopeError
    from invariscope.measure.worst_case import SpatialBudget

    angle, shift = kwargs.pop("wc_angle"), kwargs.pop("wc_shift")
    grid, k = kwargs.pop("wc_grid"), kwargs.pop("wc_k")
    parts = grid.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvariscopeError(
            f"--wc-grid '{grid}' must be ANGLESxSHIFTS, e.g. 31x5 (31 angles, 5 shifts per axis)"
        )
    return SpatialBudget(
        max_angle=angle, max_shift=shift, angles=int(parts[0]), shifts=int(parts[1]), k=k
    )


def worst_case_options(command):
    """The ``--wc-*`` options of the worst-case budget (shared with ``worst-case``)."""
    options = [
        click.option(
            "--wc-angle",
            default=30.0,
            show_default=True,
            type=float,
            help="Worst-case budget: largest rotation (degrees).",
        ),
        click.option(
            "--wc-shift",
            default=3.0,
            show_default=True,
            type=float,
            help="Worst-case budget: largest translation per axis (pixels).",
        ),
        click.option(
            "--wc-grid",
            default="31x5",
            show_default=True,
            metavar="ANGLESxSHIFTS",
            help="Worst-case grid: number of angles x number of shifts per axis.",
        ),
        click.option(
            "--wc-k",
            default=10,
            show_default=True,
            type=int,
            help="Worst-case: number of random draws for worst-of-k.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command("sweep")
@click.option(
    "--transforms",
    "transform_list",
    default=None,
    metavar="A,B,...",
    help="Transformations to sweep one at a time, e.g. rotation,translate_x,gaussian_noise "
    "(see 'invariscope transforms').",
)
@click.option(
    "--range",
    "ranges",
    multiple=True,
    metavar="NAME=START:STOP[:STEP]|NAME=V[,V...]",
    help="Magnitudes of one transformation: a range (stop included) or values; repeatable "
    "or ';'-separated, e.g. --range 'rotation=-180:180:5;zoom=0.5,1,2' [default: the "
    "transformation's own range]. The identity is always included.",
)
@click.option(
    "--pair",
    "pairs",
    multiple=True,
    metavar="A,B",
    help="Two-parameter sweep over the grid of both ranges (repeatable), e.g. "
    "--pair translate_x,translate_y (a heatmap).",
)
@click.option(
    "--worst-case",
    is_flag=True,
    help="Worst-case rotation x translation search (Engstrom et al. 2019).",
)
@worst_case_options
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=float,
    help="A threshold is where class accuracy drops below this fraction of its identity accuracy.",
)
@engine_options
def sweep_cmd(transform_list, ranges, pairs, worst_case, threshold, **kwargs) -> None:
    """Sweep transformations over their magnitudes and summarise how predictions change.

    Writes to --out: per-image records (label, prediction, p(true class), top-5) as
    Parquet parts, the aggregates (accuracy vs magnitude overall and per class,
    class-wise softmax curves, thresholds, breaking magnitudes, 2-D grids, worst case)
    and figures (PNG and SVG) under figures/. An interrupted run resumes where it
    stopped when started again with the same arguments.

    Under torchrun each process computes its share of the parts into the same --out
    (with --device cuda, process i uses cuda:LOCAL_RANK); rank 0 waits for the others,
    then aggregates and prints the summary.

    \b
    Example:
      invariscope sweep --model model.pt --data digits --transforms rotation,translate_x,gaussian_noise --range rotation=-180:180:5 --out runs/sweep
      invariscope sweep --model model.pt --data digits --pair translate_x,translate_y --worst-case --images 200 --out runs/grid
      torchrun --nproc_per_node 2 -m invariscope sweep --model model.pt --data digits --transforms rotation --out runs/dist
    """
    from invariscope.errors import InvariscopeError
    from invariscope.measure.sweep import SweepAnalysis
    from invariscope.transforms import parse_range

    common = pop_common(kwargs)
    names = split_list(transform_list)
    magnitudes: dict[str, tuple[float, float, float] | list[float]] = {}
    for item in magnitude_entries(ranges):
        name, spec = parse_magnitude("--range", item)
        if name in magnitudes:
            raise InvariscopeError(f"--range for '{name}' is given twice; give it once")
        if isinstance(spec, tuple):
            name, start, stop, step = parse_range(item)
            magnitudes[name] = (start, stop, step)
        else:
            magnitudes[name] = spec
    pair_list = [tuple(split_list(p)) for p in pairs]
    budget = budget_from_options(kwargs) if worst_case else None
    analysis = SweepAnalysis(
        names,
        magnitudes or None,
        pairs=pair_list,
        worst_case=budget,
        threshold_fraction=threshold,
    )
    result = run_analysis_command(analysis, common, options={"threshold_fraction": threshold})
    if result.aggregated:  # the other ranks print nothing but errors
        _report(result, common["out"])


def _fmt(value) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"
    )


def _report(result, out: Path) -> None:
    """A few lines on stdout: identity accuracy, overall thresholds, worst case, outputs."""
    s = result.summary
    click.echo(f"{s['num_images']} images")
    th = result.aggregates.get("thresholds")
    if th is not None:
        info = result.aggregates["transforms"].set_index("transform")
        overall = th[th["label"] == -1]
        click.echo(f"accuracy at the identity: {s['identity_accuracy']:.4f}")
        click.echo(f"accuracy below {s['threshold_fraction']:g} x identity accuracy at:")
        for r in overall.itertuples(index=False):
            # "n/a": nothing was swept on that side of the identity
            lo, hi = info.loc[r.transform, "min_magnitude"], info.loc[r.transform, "max_magnitude"]
            low = "n/a" if lo >= r.identity else _fmt(r.threshold_low)
            high = "n/a" if hi <= r.identity else _fmt(r.threshold_high)
            click.echo(
                f"  {r.transform:<16} low {low:>8}  high {high:>8}  "
                f"[{info.loc[r.transform, 'unit']}]"
            )
    acc2d = result.aggregates.get("accuracy_2d")
    if acc2d is not None:
        for (a, b), sub in acc2d.groupby(["transform_a", "transform_b"], sort=False):
            click.echo(
                f"{a} x {b}: accuracy from {sub['accuracy'].min():.4f} to "
                f"{sub['accuracy'].max():.4f} over {len(sub)} grid points"
            )
    wc = s.get("worst_case")
    if wc:
        click.echo(
            "worst case: " + ", ".join(f"{k.replace('_', '-')} {v:.4f}" for k, v in wc.items())
        )
    click.echo(f"tables and {len(result.figures) // 2} figures written to {out}")


@cli.command("worst-case")
@worst_case_options
@engine_options
def worst_case_cmd(**kwargs) -> None:
    """Worst-case rotation x translation accuracy (Engstrom et al. 2019).

    Each image is counted correct under four evaluations: natural, one random
    transformation from the budget, all of k random ones (worst-of-k), and every point
    of a grid over the budget (grid). Writes the per-image table, the accuracies with
    95% Wilson intervals and a figure to --out; resumable and distributable like every
    analysis.

    \b
    Example:
      invariscope worst-case --model model.pt --data digits --wc-angle 30 --wc-shift 3 --images 200 --out runs/worst
    """
    from invariscope.measure.worst_case import WorstCaseAnalysis

    common = pop_common(kwargs)
    result = run_analysis_command(WorstCaseAnalysis(budget_from_options(kwargs)), common)
    if result.aggregated:
        s = result.summary
        click.echo(f"{s['num_images']} images, budget {s['budget']}")
        click.echo(
            "worst case: "
            + ", ".join(f"{k.replace('_', '-')} {v:.4f}" for k, v in s["worst_case"].items())
        )
        click.echo(f"tables and {len(result.figures) // 2} figures written to {common['out']}")
