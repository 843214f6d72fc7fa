"""``invariscope demo``: the whole tool in one command on built-in data."""

from __future__ import annotations

from pathlib import Path

import click

from invariscope.cli._app import cli


@cli.command("demo")
@click.option(
    "--out",
    default="demo-output",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for tables and figures.",
)
@click.option("--model", "model_name", default="simple-cnn", show_default=True)
@click.option("--data", "data_name", default="digits", show_default=True)
@click.option("--epochs", default=5, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--retrain", is_flag=True, help="Ignore the cached model and train again.")
@click.option(
    "--stages",
    default=None,
    metavar="A,B,...",
    help="Only these stages (e.g. sweep,shift), opt-in ones included "
    "[default: every stage but the opt-in ones].",
)
@click.option(
    "--full",
    is_flag=True,
    help="Also run the opt-in stages (stn_benchmark: table I's pose-SD comparison with the "
    "--quick preset: 72 s on 2 idle cores, several minutes on a busy machine).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo_cmd(
    out, model_name, data_name, epochs, seed, device, retrain, stages, full, no_progress
) -> None:
    """Train (or reuse from the cache) the default model and run every analysis stage.

    The trained model is cached under $INVARISCOPE_CACHE (default ~/.cache/invariscope),
    keyed by architecture, data, settings and version. Each stage prints its duration
    and a finding with its interval ("[sweep 41 s] ..."); the last line gives the total.

    \b
    Example:
      invariscope demo --out demo-output
      invariscope demo --full --out demo-output     # with the opt-in stages
    """
    from invariscope.demo import demo_stages, run_demo
    from invariscope.errors import unknown_name
    from invariscope.train import resolve_device

    chosen = None
    if stages is not None:
        known = [name for name, _ in demo_stages()]
        chosen = [s.strip() for s in stages.split(",") if s.strip()]
        for name in chosen:
            if name not in known:
                raise unknown_name("demo stage", name, known)

    run_demo(
        out,
        model_name=model_name,
        data_name=data_name,
        epochs=epochs,
        seed=seed,
        device=resolve_device(device),
        retrain=retrain,
        progress=not no_progress,
        stages=chosen,
        full=full,
        echo=click.echo,
    )
