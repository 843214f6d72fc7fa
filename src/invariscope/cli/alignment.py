"""``invariscope alignment``: Jansson et al.'s feature-map alignment check, per layer, into a run directory."""

from __future__ import annotations

import math

import click

from invariscope.cli._app import cli
from invariscope.cli._engine import engine_options, pop_common, run_analysis_command, split_list
from invariscope.cli._vocab import magnitude_values


def _magnitudes(values: tuple[str, ...]) -> dict[str, list[float]]:
    return magnitude_values("--magnitudes", values)


@cli.command("alignment")
@click.option(
    "--transforms",
    default="translate_x,rotation,zoom,shear_x",
    show_default=True,
    metavar="T[,T...]",
    help="Transformations, comma-separated: translate_x, translate_y (pixels), rotation "
    "(degrees), zoom, scale_x, scale_y (factors), shear_x, shear_y (shear factors).",
)
@click.option(
    "--magnitudes",
    multiple=True,
    metavar="T=V[,V...]|T=START:STOP:STEP",
    help="Magnitudes of one transformation (repeatable or ';'-separated), e.g. "
    "--magnitudes 'rotation=15,45,90;zoom=0.8:1.2:0.2' "
    "[default: translate 1,2,4 px; rotation 15,45,90 deg; zoom/scale 0.8,1.25,1.5; "
    "shear 0.1,0.25,0.5].",
)
@click.option(
    "--layers",
    default=None,
    metavar="A,B,...",
    help="Layers to check [default: every probe-able layer with a 4-D output whose grid can "
    "be placed on the image].",
)
@click.option(
    "--best-case",
    is_flag=True,
    help="Also search, per image, the best purely spatial warp near T^-1 (Adam on an affine "
    "correction).",
)
@click.option(
    "--best-steps", default=50, show_default=True, type=int, help="Adam steps of that search."
)
@click.option(
    "--margin",
    default=8,
    show_default=True,
    type=int,
    help="Zero canvas around each image, pixels per side.",
)
@engine_options
def alignment_cmd(transforms, magnitudes, layers, best_case, best_steps, margin, **kwargs) -> None:
    """Can a purely spatial warp align CNN feature maps? (Jansson et al. 2020)

    Per layer, the relative error ||T^-1 Gamma(T f) - Gamma f|| / ||Gamma f|| over the
    valid central region, with T^-1 carried to the layer's feature grid (stride and
    receptive-field centres). The theorem: it is ~0 only for translations (by multiples
    of the stride) or with invariant filters. Also the interpolation floors (an exactly
    equivariant representation checked the same way) and, with --best-case, the best
    spatial warp near T^-1. Writes per-image and mean tables and a figure per
    transformation to --out; resumable and distributable.

    \b
    Example:
      invariscope alignment --model cnn.ckpt --data digits --out runs/align
      invariscope alignment --model cnn.ckpt --data digits --transforms rotation \\
          --magnitudes rotation=10,30 --layers conv1,conv2 --best-case --out runs/align-rot
    """
    from invariscope.measure.alignment import AlignmentAnalysis

    common = pop_common(kwargs)
    layer_list = None if layers is None else split_list(layers)
    analysis = AlignmentAnalysis(
        split_list(transforms),
        magnitudes=_magnitudes(magnitudes),
        layers=layer_list,
        best_case=best_case,
        best_steps=best_steps,
        margin=margin,
    )
    result = run_analysis_command(analysis, common)
    if result.aggregated:
        _report(result, common["out"])


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


def _report(result, out) -> None:
    table = result.aggregates["alignment_mean"]
    click.echo(f"{result.summary['num_images']} images; mean alignment error per layer")
    wide = table.pivot_table(
        index=["transform", "magnitude", "order", "layer"],
        columns="method",
        values="mean",
        sort=False,
    ).reset_index()
    methods = [m for m in ("exact", "best", "floor", "input") if m in wide.columns]
    lw = max(5, *(len(str(v)) for v in wide["layer"]))
    click.echo(
        f"  {'transform':<12} {'magnitude':>9} {'layer':<{lw}} "
        + " ".join(f"{m:>8}" for m in methods)
    )
    for r in wide.itertuples(index=False):
        row = r._asdict()
        click.echo(
            f"  {row['transform']:<12} {row['magnitude']:>9g} {row['layer']:<{lw}} "
            + " ".join(f"{_fmt(row[m]):>8}" for m in methods)
        )
    if out is not None:
        click.echo(f"tables and {len(result.figures) // 2} figures written to {out}")
