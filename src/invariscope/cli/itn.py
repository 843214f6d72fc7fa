"""``invariscope itn``: learn the transformations a classifier is invariant to (Bunne et al.'s
Invariant Transformer Net) into a run directory."""

from __future__ import annotations

import math

import click

from invariscope.cli._app import cli
from invariscope.cli._engine import (
    create_train_set,
    engine_options,
    pop_common,
    run_analysis_command,
)
from invariscope.cli._vocab import deprecated


@cli.command("itn")
@deprecated("itn", "--steps", "--train-steps", "train_steps", type=int)
@click.option("--train-steps", default=400, show_default=True, type=int, help="Adam steps in all.")
@click.option(
    "--save-every",
    default=100,
    show_default=True,
    type=int,
    help="Steps per training part: the run resumes from the last finished part.",
)
@click.option(
    "--train-batch",
    default=64,
    show_default=True,
    type=int,
    help="Training images per step (from the dataset's train split).",
)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option(
    "--tolerance",
    default=0.9,
    show_default=True,
    type=float,
    help="acc_orig = tolerance x the clean accuracy on the train split; batches below it "
    "use the classifier's loss. In (0, 1].",
)
@click.option(
    "--c-theta",
    "c_theta",
    default=1.0,
    show_default=True,
    type=float,
    help="Weight of the colour term of the invariance loss (the paper's c_theta). On "
    "grey digits 1 lets the colour map run away to a huge contrast that a ReLU network "
    "barely notices; 1e-3 balances the two terms there (see the README).",
)
@click.option(
    "--controls",
    default="spatial,colour",
    show_default=True,
    metavar="spatial,colour|colour,spatial",
    help="Which transformation k1 and k2 drive (the paper's figures: k1 spatial; its loss "
    "formula: k1 colour).",
)
@click.option(
    "--hidden", default=32, show_default=True, type=int, help="Hidden width of each control net."
)
@click.option(
    "--vectors",
    default=16,
    show_default=True,
    type=int,
    help="Random unit vectors |S| per step in the invariance loss.",
)
@click.option(
    "--grid",
    default=5,
    show_default=True,
    type=int,
    help="Points per axis of the (k1, k2) accuracy lattice on [0, 1]^2.",
)
@click.option(
    "--sweep-points",
    default=11,
    show_default=True,
    type=int,
    help="Values of k1 (k2 = 0) in the class-probability sweep.",
)
@click.option(
    "--examples",
    default=6,
    show_default=True,
    type=int,
    help="Test images shown at the corner controls.",
)
@engine_options
def itn_cmd(
    train_steps,
    save_every,
    train_batch,
    lr,
    tolerance,
    c_theta,
    controls,
    hidden,
    vectors,
    grid,
    sweep_points,
    examples,
    **kwargs,
) -> None:
    """Learn a family of transformations the classifier is invariant to (Invariant Transformer Net).

    Two small nets map controls k1, k2 in [0, 1] to a spatial affine transformation and a
    colour affine transformation; images (train split) are colour-transformed, warped
    and fed to the FROZEN classifier. A batch whose accuracy is below acc_orig uses the
    classifier's loss; otherwise the loss -k ||A x - x||^2 pushes the transformations to
    grow with k (Bunne et al. 2018, strategy 2). Then the learned family is evaluated on
    the test images: accuracy on a (k1, k2) grid, class probabilities along k1, the
    learned matrices decomposed (rotation, scale, shear, translation; contrast,
    brightness). Writes tables, the ITN's state and figures to --out; resumable.

    \b
    Example:
      invariscope itn --model cnn.ckpt --data digits --train-steps 400 --out runs/itn
      invariscope itn --model cnn.ckpt --data digits --train-steps 1000 --save-every 200 --tolerance 0.95 --controls colour,spatial --out runs/itn-text
    """
    from invariscope.measure.itn import ITNAnalysis

    common = pop_common(kwargs)
    analysis_args = dict(
        steps=train_steps,
        save_every=save_every,
        train_batch=train_batch,
        lr=lr,
        tolerance=tolerance,
        c_theta=c_theta,
        controls=controls,
        hidden=hidden,
        vectors=vectors,
        grid=grid,
        sweep_points=sweep_points,
        examples=examples,
    )
    train_set = create_train_set(common)
    analysis = ITNAnalysis(train_set, **analysis_args)
    result = run_analysis_command(analysis, common)
    if result.aggregated:
        _report(result, common["out"])


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _report(result, out) -> None:
    agg, s = result.aggregates, result.summary
    click.echo(
        f"clean accuracy (train split) {_fmt(s['clean_accuracy_train'])}, acc_orig "
        f"{_fmt(s['acc_orig'])}; {100 * s['invariance_steps']:.0f}% of the steps used the "
        "invariance loss"
    )
    acc = agg["accuracy"]
    corners = acc[acc["k1"].isin([0.0, 1.0]) & acc["k2"].isin([0.0, 1.0])]
    click.echo(f"test accuracy under F(k1, k2) ({s['num_images']} images):")
    for r in corners.itertuples(index=False):
        click.echo(
            f"  k1={r.k1:g} k2={r.k2:g}: {_fmt(r.accuracy)} [{_fmt(r.accuracy_low)}, "
            f"{_fmt(r.accuracy_high)}]"
        )
    lt = agg["learned_transforms"]
    for r in lt[lt["k"] == 1.0].itertuples(index=False):
        if r.transform == "spatial":
            text = (
                f"rotation {r.rotation_deg:+.1f} deg, scale {r.scale_x:.3f} x {r.scale_y:.3f}, "
                f"shear {r.shear:+.3f}, translation ({r.tx_px:+.2f}, {r.ty_px:+.2f}) px"
            )
        else:
            text = f"contrast {r.contrast:.3f}, brightness {r.brightness:+.3f}"
        click.echo(f"  {r.control}=1 ({r.transform}): {text}; mean ||Ax - x|| {r.displacement:.3f}")
    if out is not None:
        click.echo(f"tables and {len(result.figures) // 2} figures written to {out}")
