"""``invariscope lee``: the Lie derivative / local equivariance error of a classifier into a run directory."""

from __future__ import annotations

import math

import click

from invariscope.cli._app import cli
from invariscope.cli._engine import engine_options, pop_common, run_analysis_command, split_list


@cli.command("lee")
@click.option(
    "--transforms",
    default="translate_x,rotation",
    show_default=True,
    metavar="T[,T...]",
    help="Continuous transformations, comma-separated: translate_x, translate_y (per pixel), "
    "rotation (per degree), zoom, scale_x, scale_y (per unit of log-scale), shear_x, shear_y, "
    "brightness, contrast (per unit of log-factor), grayscale.",
)
@click.option(
    "--layers",
    default=None,
    metavar="A,B,...",
    help="Layers whose own equivariance error is measured [default: the model's probe-able "
    "layers with 4-D outputs]; 'none' skips it.",
)
@click.option(
    "--units",
    type=click.Choice(["invariscope", "gruver"]),
    default="invariscope",
    show_default=True,
    help="Units of t: invariscope (pixel, degree, log-scale...) or gruver (Gruver et al.'s: "
    "normalised coordinate = (W-1)/2 px, radian...), so their published values compare "
    "directly (LEE(prob) column).",
)
@engine_options
def lee_cmd(transforms, layers, units, **kwargs) -> None:
    """Lie derivative of the logits: Gruver et al.'s local equivariance error (LEE).

    For each image x and transformation T_t (t in pixels, degrees, units of log-scale...),
    L f(x) = d/dt f(T_t x) at t = 0, one forward-mode product of the image's exact t = 0
    tangent (forward differences times the transformation's vector field); LEE is
    the mean over images of ||L f(x)||^2 (squared l2 over the logits), LEE(abs) the mean
    of its l1 norm. Per layer, the derivative of T_-t Gamma(T_t x) gives each
    representation's own equivariance error. Writes per-image and per-layer tables, the
    summary with 95% intervals and figures to --out; resumable and distributable.

    \b
    Example:
      invariscope lee --model cnn.ckpt --data digits --transforms translate_x,rotation,zoom --out runs/lee
      invariscope lee --model cnn.ckpt --data digits --transforms brightness --layers none --out runs/lee-b
    """
    from invariscope.measure.lee import LEEAnalysis

    common = pop_common(kwargs)
    layer_list = None
    if layers is not None:
        layer_list = [] if layers.strip().lower() == "none" else split_list(layers)
    analysis = LEEAnalysis(split_list(transforms), layers=layer_list, units=units)
    result = run_analysis_command(analysis, common)
    if result.aggregated:
        _report(result, common["out"])


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _report(result, out) -> None:
    s = result.aggregates["lee_summary"]
    click.echo(f"{result.summary['num_images']} images")
    tw = max(9, *(len(t) for t in s["transform"]))
    uw = max(4, *(len(u) for u in s["unit"]))
    click.echo(
        f"  {'transform':<{tw}} {'unit':<{uw}} {'LEE (squared)':>13} {'95% interval':>23} "
        f"{'LEE (abs)':>10} {'LEE (prob)':>10}"
    )
    for r in s.itertuples(index=False):
        interval = f"[{_fmt(r.lee_low)}, {_fmt(r.lee_high)}]"
        click.echo(
            f"  {r.transform:<{tw}} {r.unit:<{uw}} {_fmt(r.lee):>13} {interval:>23} "
            f"{_fmt(r.lee_abs):>10} {_fmt(r.lee_prob_abs):>10}"
        )
    click.echo(
        "  (LEE: mean ||d/dt logits||^2 per unit of t; abs: mean sum |d/dt logits|; prob: "
        "mean over classes of |d/dt softmax|, Gruver et al.'s number with --units gruver)"
    )
    if out is not None:
        click.echo(f"tables and {len(result.figures) // 2} figures written to {out}")
