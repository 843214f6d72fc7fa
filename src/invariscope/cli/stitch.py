"""``invariscope stitch``: stitching layers and linear CKA between two networks' layers."""

from __future__ import annotations

import math
from pathlib import Path

import click

from invariscope.cli._app import cli
from invariscope.cli._engine import (
    create_train_set,
    engine_options,
    pop_common,
    run_analysis_command,
    split_list,
)
from invariscope.cli._vocab import deprecated


def _label(spec: str) -> str:
    return Path(spec).name if spec else spec


@cli.command("stitch")
@deprecated("stitch", "--steps", "--train-steps", "train_steps", type=int)
@click.option(
    "--model-b",
    "model_b",
    default=None,
    metavar="MODEL",
    help="Network B, whose later layers classify [default: the same as --model-a].",
)
@click.option(
    "--layers-a",
    default=None,
    metavar="L1,L2,...",
    help="Layers of A to stitch from [default: every layer with a 4-D output].",
)
@click.option(
    "--layers-b",
    default=None,
    metavar="L1,L2,...",
    help="Layers of B to stitch into [default: every layer with a 4-D output].",
)
@click.option(
    "--kernel-size",
    default=1,
    show_default=True,
    type=int,
    help="Odd size m of the m x m stitching convolution.",
)
@click.option(
    "--train-steps",
    default=300,
    show_default=True,
    type=int,
    help="Adam steps per layer pair.",
)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option(
    "--train-batch",
    default=64,
    show_default=True,
    type=int,
    help="Training images per step (from the dataset's train split).",
)
@click.option("--no-cka", is_flag=True, help="Skip the CKA matrix.")
@engine_options(model_aliases=("--model-a",))
def stitch_cmd(
    model_b, layers_a, layers_b, kernel_size, train_steps, lr, train_batch, no_cka, **kwargs
) -> None:
    """Stitching error and linear CKA between the layers of networks A and B.

    For each pair (A's layer i, B's layer j) a stitching layer E (an m x m convolution,
    with bilinear resampling where the sizes differ; a linear map between vector
    layers) learns, on the train split and through B's frozen remainder, to feed A's
    layer i into B after layer j (Lenc & Vedaldi 2018); the top-1 error of the stitched
    network is measured on the test images. Linear CKA (Kornblith et al. 2019) between
    every pair of layers is streamed over the test batches (unbiased HSIC; batches need
    >= 4 images). Writes tables, E's weights and figures to --out; resumable and
    distributable.

    \b
    Example:
      invariscope stitch --model-a cnn.ckpt --data digits --out runs/self-stitch
      invariscope stitch --model-a cnn.ckpt --model-b vgg.ckpt --data digits --layers-a pool1,relu2 --layers-b pool1,pool2 --out runs/stitch
    """
    from invariscope.errors import InvariscopeError
    from invariscope.measure.stitch import StitchAnalysis

    common = pop_common(kwargs)
    if model_b is None and common["weights"] is not None:
        raise InvariscopeError(
            "--weights applies to --model-a only, so B would lack them; give --model-b "
            "explicitly (a checkpoint, or a spec that loads its own weights)"
        )
    train_set = create_train_set(common)
    analysis = StitchAnalysis(
        train_set,
        layers_a=None if layers_a is None else split_list(layers_a),
        layers_b=None if layers_b is None else split_list(layers_b),
        kernel_size=kernel_size,
        steps=train_steps,
        lr=lr,
        train_batch=train_batch,
        cka=not no_cka,
    )
    spec_b = model_b if model_b is not None else common["model_spec"]
    options = {"model_label": _label(common["model_spec"]), "model_b_label": _label(spec_b)}
    result = run_analysis_command(
        analysis, common, options=options, extra_models={"model_b": spec_b}
    )
    if result.aggregated:
        _report(result, common["out"])


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _matrix(table, column: str, rows: list[str], cols: list[str]) -> list[str]:
    values = {(r.layer_a, r.layer_b): getattr(r, column) for r in table.itertuples(index=False)}
    rw = max(6, *(len(r) for r in rows))
    cw = max(6, *(len(c) for c in cols))
    corner = "A \\ B"
    lines = [f"  {corner:<{rw}} " + " ".join(f"{c:>{cw}}" for c in cols)]
    for r in rows:
        cells = [_fmt(values.get((r, c))) for c in cols]
        lines.append(f"  {r:<{rw}} " + " ".join(f"{v:>{cw}}" for v in cells))
    return lines


def _report(result, out) -> None:
    agg = result.aggregates
    models = agg["models"]
    layers = agg["layers"]
    rows = list(layers[layers["model"] == "model"].sort_values("order")["layer"])
    cols = list(layers[layers["model"] == "model_b"].sort_values("order")["layer"])
    click.echo(f"{result.summary['num_images']} test images")
    for r in models.itertuples(index=False):
        which = "A" if r.model == "model" else "B"
        click.echo(
            f"  {which} ({r.label}): top-1 error {_fmt(r.error)} "
            f"[{_fmt(r.error_low)}, {_fmt(r.error_high)}]"
        )
    if len(agg["stitch_error"]):
        click.echo("stitched top-1 error (rows: A's layer, columns: B's layer)")
        for line in _matrix(agg["stitch_error"], "error", rows, cols):
            click.echo(line)
    if "cka" in agg and len(agg["cka"]):
        click.echo("linear CKA")
        for line in _matrix(agg["cka"], "cka", rows, cols):
            click.echo(line)
        constant = sorted(
            {f"A:{r.layer_a}" for r in agg["cka"].itertuples(index=False) if r.constant_a}
            | {f"B:{r.layer_b}" for r in agg["cka"].itertuples(index=False) if r.constant_b}
        )
        if constant:
            click.echo(f"constant over the images (CKA 0): {', '.join(constant)}")
    if out is not None:
        click.echo(f"tables and {len(result.figures) // 2} figures written to {out}")
