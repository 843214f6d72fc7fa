"""``invariscope stn-benchmark``: STNs at any depth, trained and compared (Finnveden et al. 2020)."""

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
from invariscope.cli._vocab import deprecated

#: Full-run defaults, and what ``--quick`` uses instead (explicit options win over both).
FULL = {"steps": 2000, "train_batch": 64, "images": None, "family": "affine", "loc_lr_scale": 1.0}
QUICK = {"steps": 800, "train_batch": 64, "images": 1000, "family": "affine", "loc_lr_scale": 1.0}
#: ``--quick`` on ``rotated-*``: at 800 steps the paper's affine head does not learn to undo
#: rotations (every STN stays at the SD of the applied angles); a rotation-only head whose
#: localisation net learns 3x faster does (README, "STN benchmark").
QUICK_ROTATED = {**QUICK, "family": "rotation", "loc_lr_scale": 3.0}


@cli.command("stn-benchmark")
@deprecated("stn-benchmark", "--steps", "--train-steps", "train_steps", type=int)
@deprecated(
    "stn-benchmark", "--augment", "--fresh-perturbations", "fresh_perturbations", is_flag=True
)
@click.option(
    "--archs",
    default="cnn,C0,C1,DL1,SL1",
    show_default=True,
    metavar="A[,A...]",
    help="Architectures: cnn (the plain classifier), C<X> (transformer after X conv blocks; "
    "C0 warps the input, CX>0 a feature map), DL<X> (localisation net = fresh copies of the "
    "first X blocks, warps the input), SL<X> (shares the first X blocks, warps the input); "
    "suffix x<n> for n iterations (e.g. SL1x2).",
)
@click.option(
    "--seeds",
    default=3,
    show_default=True,
    type=int,
    help="Training runs (seeds) per architecture; tables give mean and SD over them.",
)
@click.option(
    "--train-steps",
    default=None,
    type=int,
    help=f"Adam steps per training run [default: {FULL['steps']}, --quick {QUICK['steps']}].",
)
@click.option(
    "--train-batch",
    default=None,
    type=int,
    help=f"Training images per step [default: {FULL['train_batch']}].",
)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option(
    "--loc-lr-scale",
    default=None,
    type=float,
    help="The localisation nets learn at lr x this [default: 1; --quick on rotated-* sets: "
    f"{QUICK_ROTATED['loc_lr_scale']:g}].",
)
@click.option(
    "--train-images",
    default=None,
    type=int,
    help="Train on a seeded subset of this many training images [default: all].",
)
@click.option(
    "--fresh-perturbations",
    is_flag=True,
    help="Render every training image afresh with a new perturbation of the data's family "
    "each time it is drawn (augmentation for the CNN and the STNs alike).",
)
@click.option(
    "--family",
    default=None,
    type=click.Choice(["affine", "rotation", "similarity", "translation_scale"]),
    help="Transformations the localisation nets predict [default: affine; --quick on "
    f"rotated-* sets: {QUICK_ROTATED['family']}].",
)
@click.option(
    "--examples",
    default=6,
    show_default=True,
    type=int,
    help="Test images per architecture shown with their warped versions (figure 5).",
)
@click.option(
    "--quick",
    is_flag=True,
    help=f"A short run: {QUICK['steps']} steps and {QUICK['images']} test images; on "
    "rotated-* sets also --family rotation --loc-lr-scale 3 (unless either is given), without which no transformer "
    "learns to undo rotations in so few steps (on rotated-glyphs about 4 CPU-minutes per "
    "seed for the default archs; 60 and 112 px sets cost more).",
)
@engine_options(model_default="simple-cnn")
def stn_cmd(
    archs,
    seeds,
    train_steps,
    train_batch,
    lr,
    loc_lr_scale,
    train_images,
    fresh_perturbations,
    family,
    examples,
    quick,
    **kwargs,
) -> None:
    """Train and compare spatial transformer networks (Finnveden et al. 2020, tables I-II).

    --model names the BASE CLASSIFIER by its ARCHITECTURE only: a registered name
    (default: simple-cnn, the papers' base classifier) or a checkpoint of one; it is rebuilt for the data's image size and every
    (architecture, seed) trains from a fresh seeded initialisation, with the same budget, on
    the train split of --data (rotated-, translated- or scaled-<digits|glyphs>). Measured on
    the test images: the top-1 error (table II) and, for every STN, the pose SD (table I):
    each test digit gets a fresh seeded perturbation, the localisation net's transform is
    composed with it, and the within-class SD of the final pose (degrees, pixels, log2 det)
    is averaged over classes; figures of predicted vs applied angles (figure 6) and of
    warped examples (figure 5). Resumable and distributable: one part per (architecture,
    seed) trains and stores its weights, then evaluation parts per test batch.

    \b
    Example:
      invariscope stn-benchmark --model simple-cnn --data rotated-glyphs --quick --out runs/stn-r
      invariscope stn-benchmark --model simple-cnn --data translated-glyphs --archs cnn,C0,C1,DL1,SL1 --seeds 3 --out runs/stn-t
    """
    from invariscope.measure.stn import STNBenchmarkAnalysis

    common = pop_common(kwargs)
    train_set = create_train_set(common)
    # the rotated preset is a pair: naming either option gives the other its paper default
    rotated = getattr(train_set, "kind", None) == "rotated"
    paired = quick and rotated and family is None and loc_lr_scale is None
    preset = QUICK_ROTATED if paired else QUICK if quick else FULL
    if paired:
        click.echo(
            f"--quick on {common['data_spec']}: --family {preset['family']} "
            f"--loc-lr-scale {preset['loc_lr_scale']:g} (pass --family affine for the paper's head)"
        )
    if common["images"] is None:
        common["images"] = preset["images"]
    analysis = STNBenchmarkAnalysis(
        train_set,
        split_list(archs),
        seeds=seeds,
        steps=preset["steps"] if train_steps is None else train_steps,
        train_batch=preset["train_batch"] if train_batch is None else train_batch,
        lr=lr,
        train_images=train_images,
        augment=fresh_perturbations,
        family=preset["family"] if family is None else family,
        examples=examples,
        loc_lr_scale=preset["loc_lr_scale"] if loc_lr_scale is None else loc_lr_scale,
    )
    # Only the base model's architecture is used, but the run's configuration holds its
    # weights' fingerprint: a registered name is built under a fixed seed so that the
    # same command resumes its run directory.
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = run_analysis_command(analysis, common)
    if result.aggregated:
        _report(result, common["out"])


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _report(result, out) -> None:
    agg = result.aggregates
    errors = agg["error_table"]
    click.echo(f"{result.summary['num_images']} test images ({result.summary['data']})")
    click.echo("table II: top-1 error % (mean ± SD over seeds)    params")
    for r in errors.itertuples(index=False):
        click.echo(
            f"  {r.label:<22} {_fmt(r.error_mean_pct):>6} ± {_fmt(r.error_std_pct):<5} "
            f"{r.params:>10,}"
        )
    pose = agg.get("pose_table")
    if pose is not None and len(pose):
        unit = {
            "angle_sd_deg": "deg, circular SD",
            "distance_sd_px": "px",
            "log2_det_sd": "log2 det",
        }
        click.echo(
            f"table I: pose SD ({unit[pose['measure'].iloc[0]]}, mean over classes and seeds)"
        )
        for r in pose.itertuples(index=False):
            click.echo(f"  {r.label:<22} {_fmt(r.pose_sd, 3):>8}")
        if "unaligned_pose_sd" in pose:
            reference = _fmt(float(pose["unaligned_pose_sd"].iloc[0]), 3)
            click.echo(f"  {'(no alignment)':<22} {reference:>8}")
    if out is not None:
        click.echo(f"tables and {len(result.figures) // 2} figures written to {out}")
