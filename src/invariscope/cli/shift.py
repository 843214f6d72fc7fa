"""``invariscope shift``: small-shift stability of a classifier (and a baseline) into a run directory."""

from __future__ import annotations

import math
from pathlib import Path

import click

from invariscope.cli._app import cli
from invariscope.cli._engine import engine_options, pop_common, run_analysis_command, split_list
from invariscope.cli._vocab import deprecated


def _label(spec: str) -> str:
    return Path(spec).name if spec else spec


@cli.command("shift")
@deprecated("shift", "--steps", "--frames", "frames", type=int)
@click.option(
    "--protocol",
    "protocols",
    default="embed",
    show_default=True,
    metavar="P[,P...]",
    help="embed, crop, scale, circular, subpixel or sequence:TRANSFORM (e.g. sequence:rotation); "
    "several comma-separated.",
)
@click.option(
    "--baseline", default=None, metavar="MODEL", help="A baseline model (mFR, side by side)."
)
@click.option(
    "--frames",
    default=None,
    type=int,
    help="Frames per sequence [default: 16, or the most that fit the image].",
)
@click.option(
    "--direction",
    default="vertical",
    show_default=True,
    type=click.Choice(["vertical", "horizontal", "diagonal"]),
    help="Direction of the 1-pixel shifts.",
)
@click.option(
    "--factor",
    default=0.5,
    show_default=True,
    type=float,
    help="embed/scale: size of the embedded image relative to the canvas.",
)
@click.option(
    "--fill",
    default="inpaint",
    show_default=True,
    type=click.Choice(["inpaint", "black", "mean"]),
    help="embed/scale: how the canvas around the image is filled.",
)
@click.option(
    "--step",
    default=None,
    type=float,
    help="subpixel: shift per frame in pixels (0.25); sequence:T: magnitude per frame.",
)
@click.option(
    "--consistency-pairs",
    default=5,
    show_default=True,
    type=int,
    help="Random pairs of 2-D shifts per image for Zhang's consistency (0: none).",
)
@click.option(
    "--consistency-range",
    default=None,
    type=int,
    help="2-D shifts drawn from [0, RANGE) pixels per axis [default: 32/224 of the size].",
)
@click.option(
    "--layers",
    default=None,
    metavar="A,B,...",
    help="Layers for nonshiftability [default: the model's probe-able layers]; 'none' skips it.",
)
@click.option(
    "--map-threshold",
    default=0.1,
    show_default=True,
    type=float,
    help="Nonshiftability counts maps whose peak exceeds this fraction of the layer's largest.",
)
@engine_options
def shift_cmd(
    protocols,
    baseline,
    frames,
    direction,
    factor,
    fill,
    step,
    consistency_pairs,
    consistency_range,
    layers,
    map_threshold,
    **kwargs,
) -> None:
    """Small-shift stability: jaggedness, flip rates, consistency, nonshiftability.

    Each image becomes a sequence of frames moved one pixel at a time (Azulay & Weiss
    2019): embedded in a canvas (filled black, with the mean colour or by inpainting),
    cropped, rescaled, rolled circularly, shifted by fractions of a pixel, or perturbed in
    small steps by any registered transformation (ImageNet-P sequences). Writes per-frame
    predictions, per-image measures and per-layer nonshiftability as Parquet parts, the
    summary with 95% intervals and figures to --out; resumable and distributable.

    \b
    Example:
      invariscope shift --model vgg.ckpt --data shapes --protocol embed,crop --out runs/shift
      invariscope shift --model vgg-blurpool.ckpt --baseline vgg.ckpt --data shapes --protocol embed,circular,sequence:rotation --out runs/shift-aa
    """
    from invariscope.measure.shift import ShiftAnalysis

    common = pop_common(kwargs)
    layer_list = None
    if layers is not None:
        layer_list = [] if layers.strip().lower() == "none" else split_list(layers)
    analysis = ShiftAnalysis(
        split_list(protocols),
        protocol_options={
            "steps": frames,
            "direction": direction,
            "factor": factor,
            "fill": fill,
            "step": step,
        },
        baseline=baseline is not None,
        layers=layer_list,
        consistency_pairs=consistency_pairs,
        consistency_range=consistency_range,
        map_threshold=map_threshold,
    )
    options = {"model_label": _label(common["model_spec"])}
    if baseline is not None:
        options["baseline_label"] = _label(baseline)
    result = run_analysis_command(
        analysis,
        common,
        options=options,
        extra_models={"baseline": baseline} if baseline is not None else None,
    )
    if result.aggregated:
        _report(result, common["out"])


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _report(result, out) -> None:
    s = result.aggregates["shift_summary"]
    labels = dict(result.aggregates["models"][["model", "label"]].itertuples(index=False))
    click.echo(f"{result.summary['num_images']} images")
    mw = max(5, *(len(str(v)) for v in labels.values()))
    pw = max(8, *(len(p) for p in s["protocol"]))
    click.echo(
        f"  {'model':<{mw}} {'protocol':<{pw}} {'acc':>6} {'jagged':>7} {'P(flip)':>8} "
        f"{'FP':>6} {'T5D':>6} {'MAD':>6} {'consist':>8}"
    )
    for r in s.itertuples(index=False):
        click.echo(
            f"  {labels.get(r.model, r.model):<{mw}} {r.protocol:<{pw}} "
            f"{_fmt(r.accuracy):>6} {_fmt(r.jagged):>7} {_fmt(r.p_top1_change):>8} "
            f"{_fmt(r.fp):>6} {_fmt(r.t5d, 2):>6} {_fmt(r.mad):>6} {_fmt(r.consistency):>8}"
        )
    if result.summary.get("mfr") is not None:
        click.echo(f"flip rate relative to the baseline (mFR): {result.summary['mfr']:.3f}")
    if out is not None:
        click.echo(f"tables and {len(result.figures) // 2} figures written to {out}")
