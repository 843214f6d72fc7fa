"""``invariscope equivariance``: learned equivariance maps and invariance by layer."""

from __future__ import annotations

import math

import click

from invariscope.cli._app import cli
from invariscope.cli._engine import (
    create_train_set,
    engine_options,
    pop_common,
    run_analysis_command,
    split_list,
)
from invariscope.cli._vocab import deprecated, magnitude_values, warn

#: The transformations and magnitudes measured when --transforms is not given.
DEFAULT_TRANSFORMS = ("hflip", "vflip", "rot90", "zoom", "rotation")
DEFAULT_MAGNITUDES = {"zoom": [0.5], "rotation": [45.0]}


def _transform_items(transforms: str | None, magnitudes: tuple[str, ...]) -> list[str]:
    """``--transforms`` and ``--magnitudes`` as the analysis's ``NAME[=V]`` items."""
    from invariscope.measure.equivariance import with_magnitudes

    given = magnitude_values("--magnitudes", magnitudes)
    names = list(DEFAULT_TRANSFORMS) if transforms is None else split_list(transforms)
    if transforms is None:
        given = {**DEFAULT_MAGNITUDES, **given}
    if any("=" in n for n in names):
        warn("--transforms NAME=V is deprecated; use --transforms NAME --magnitudes NAME=V")
    return with_magnitudes(names, given, command_line=True)


@cli.command("equivariance")
@deprecated("equivariance", "--steps", "--train-steps", "train_steps", type=int)
@click.option(
    "--transforms",
    default=None,
    metavar="T1,T2,...",
    help="Geometric transformations g [default: hflip,vflip,rot90,zoom,rotation with "
    "--magnitudes 'zoom=0.5;rotation=45'].",
)
@click.option(
    "--magnitudes",
    multiple=True,
    metavar="T=V[,V...]|T=START:STOP:STEP",
    help="Magnitudes of one transformation of --transforms, one map per value (repeatable "
    "or ';'-separated), e.g. --magnitudes 'rotation=15,45;zoom=0.5' [default: the "
    "transformation's own magnitude].",
)
@click.option(
    "--layers",
    default=None,
    metavar="L1,L2,...",
    help="Layers to map [default: every layer with a 4-D output]; not with --model hog.",
)
@click.option(
    "--method",
    default="ridge",
    show_default=True,
    type=click.Choice(["ridge", "lsq", "omp", "none"]),
    help="Regression map: ridge, least squares, k-sparse forward selection (OMP), or none.",
)
@click.option(
    "--structured",
    default=None,
    type=int,
    metavar="M",
    help="Structured sparsity: predict each cell from the M x M cells around its "
    "back-projection [default: dense maps where they fit, else the largest odd M <= 3 "
    "that fits].",
)
@click.option(
    "--ridge", default=1e-3, show_default=True, type=float, help="Ridge strength (relative)."
)
@click.option("--k", default=5, show_default=True, type=int, help="OMP non-zeros per output.")
@click.option(
    "--train-images",
    default=None,
    type=int,
    help="Training images for the regression [default: min(1000, the train split)].",
)
@click.option(
    "--stats-batch",
    default=256,
    show_default=True,
    type=int,
    help="Training images per statistics part.",
)
@click.option(
    "--transformation-layer",
    default=None,
    type=click.Choice(["l2", "l2-relu", "task"]),
    help="Also train a transformation layer (resampling + m x m convolutions) with this loss.",
)
@click.option(
    "--kernel-size", default=3, show_default=True, type=int, help="Transformation layer's m."
)
@click.option(
    "--train-steps",
    default=300,
    show_default=True,
    type=int,
    help="Transformation layer Adam steps.",
)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option(
    "--train-batch", default=64, show_default=True, type=int, help="Images per Adam step."
)
@click.option("--hog-cell", default=4, show_default=True, type=int, help="HOG pixels per cell.")
@click.option(
    "--hog-orientations", default=9, show_default=True, type=int, help="HOG orientation bins."
)
@engine_options
def equivariance_cmd(
    transforms,
    magnitudes,
    layers,
    method,
    structured,
    ridge,
    k,
    train_images,
    stats_batch,
    transformation_layer,
    kernel_size,
    train_steps,
    lr,
    train_batch,
    hog_cell,
    hog_orientations,
    **kwargs,
) -> None:
    """Learned equivariance maps M_g and invariance by layer (Lenc & Vedaldi 2018).

    For each layer (or HOG with --model hog) and transformation g, a map M_g learned on
    the train split predicts phi(x) from phi(g^-1 x): an affine regression (ridge, least
    squares or OMP; dense or structured with --structured M) and/or a transformation
    layer (bilinear resampling then m x m convolutions, --transformation-layer). On the
    test images: per-cell reconstruction error (Hellinger for HOG, l2 for layers) of the
    identity, of the spatial permutation P_g and of the maps, and the top-1 error of the
    rest of the network on each; a layer is flagged invariant to g when P_g does as well
    as the learned map. Resumable and distributable.

    \b
    Example:
      invariscope equivariance --model hog --data digits --transforms hflip,rotation --magnitudes rotation=45 --method omp --structured 3 --out runs/hog
      invariscope equivariance --model cnn.ckpt --data digits --layers conv1,relu1,relu2 --method none --transformation-layer task --out runs/eq
    """
    from invariscope.errors import InvariscopeError
    from invariscope.measure.equivariance import EquivarianceAnalysis
    from invariscope.models.hog import HOG

    common = pop_common(kwargs)
    is_hog = common["model_spec"] == "hog"
    if is_hog:
        if common["weights"] is not None or common["input_size"] is not None:
            raise InvariscopeError(
                "HOG has no weights or input size; leave out --weights/--input-size"
            )
        if layers is not None:
            raise InvariscopeError("HOG has no layers; leave out --layers with --model hog")
    hog = HOG(orientations=hog_orientations, cell=hog_cell) if is_hog else None
    analysis = EquivarianceAnalysis(
        create_train_set(common),
        _transform_items(transforms, magnitudes),
        None if layers is None else split_list(layers),
        hog=hog,
        method=method,
        structured=structured,
        ridge=ridge,
        k=k,
        train_images=train_images,
        stats_batch=stats_batch,
        transformation_layer=transformation_layer,
        kernel_size=kernel_size,
        steps=train_steps,
        lr=lr,
        train_batch=train_batch,
    )
    result = run_analysis_command(analysis, common)
    if result.aggregated:
        _report(result, common["out"])


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _report(result, out) -> None:
    agg = result.aggregates
    click.echo(f"{result.summary['num_images']} test images")
    rec = agg["reconstruction"]
    maps = [m for m in ("none", "permutation", "regression", "tl") if m in set(rec["map"])]
    click.echo("relative reconstruction error (mean per-cell distance / mean per-cell norm)")
    click.echo("  " + f"{'layer':<12} {'transform':<14}" + "".join(f"{m:>13}" for m in maps))
    pivot = rec.pivot_table(
        index=["order", "layer", "transform_order", "transform"], columns="map", values="relative"
    )
    for (_, layer, _, transform), row in pivot.iterrows():
        click.echo(
            "  " + f"{layer:<12} {transform:<14}" + "".join(f"{_fmt(row.get(m)):>13}" for m in maps)
        )
    if "invariance_summary" in agg:
        e = agg["models"]["error"].iloc[0]
        click.echo(f"top-1 error on the original images: {_fmt(e)}")
        click.echo(
            "  "
            + f"{'layer':<12} {'transform':<14}{'none':>8}{'P_g':>8}{'learned':>9}{'recovered':>11}  invariant"
        )
        for r in agg["invariance_summary"].itertuples(index=False):
            click.echo(
                "  "
                + f"{r.layer:<12} {r.transform:<14}{_fmt(r.error_none):>8}{_fmt(r.error_permutation):>8}"
                + f"{_fmt(r.error_learned):>9}{_fmt(r.recovered):>11}  {'yes' if r.invariant else 'no'}"
            )
    if out is not None:
        click.echo(f"tables, maps and {len(result.figures) // 2} figures written to {out}")
