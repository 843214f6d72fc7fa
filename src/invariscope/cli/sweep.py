"""``invariscope sweep``: transformation-sensitivity screening of a classifier into a run directory."""

from __future__ import annotations

import math
from pathlib import Path

import click

from invariscope.cli._app import cli


def _split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _budget(angle: float, shift: float, grid: str, k: int):
    from invariscope.errors import InvariscopeError
    from invariscope.measure.worst_case import SpatialBudget

    parts = grid.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvariscopeError(
            f"--wc-grid '{grid}' must be ANGLESxSHIFTS, e.g. 31x5 (31 angles, 5 shifts per axis)"
        )
    return SpatialBudget(
        max_angle=angle, max_shift=shift, angles=int(parts[0]), shifts=int(parts[1]), k=k
    )


@cli.command("sweep")
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="Checkpoint path, registered name, package.module:factory, torchvision:NAME or timm:NAME.",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Weights file for a registry name, module:factory, torchvision or timm model.",
)
@click.option(
    "--data",
    "data_spec",
    required=True,
    help="Dataset name or path (see 'invariscope datasets'); its test split is used.",
)
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
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
    metavar="NAME=START:STOP[:STEP]",
    help="Magnitudes of one transformation (repeatable), e.g. --range rotation=-180:180:5; "
    "default: the transformation's own range. The identity is always included.",
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
@click.option(
    "--wc-angle",
    default=30.0,
    show_default=True,
    type=float,
    help="Worst-case budget: largest rotation (degrees).",
)
@click.option(
    "--wc-shift",
    default=3.0,
    show_default=True,
    type=float,
    help="Worst-case budget: largest translation per axis (pixels).",
)
@click.option(
    "--wc-grid",
    default="31x5",
    show_default=True,
    metavar="ANGLESxSHIFTS",
    help="Worst-case grid: number of angles x number of shifts per axis.",
)
@click.option(
    "--wc-k",
    default=10,
    show_default=True,
    type=int,
    help="Worst-case: number of random draws for worst-of-k.",
)
@click.option(
    "--images",
    default=None,
    type=int,
    help="Measure a seeded random subset of N images (default: all).",
)
@click.option(
    "--classes",
    default=None,
    metavar="C1,C2,...",
    help="Only images of these classes (names or indices).",
)
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=float,
    help="A threshold is where class accuracy drops below this fraction of its identity accuracy.",
)
@click.option(
    "--batch-size",
    default=128,
    show_default=True,
    type=int,
    help="Images per part (the unit of resumption).",
)
@click.option(
    "--forward-batch",
    default=None,
    type=int,
    help="Most images per forward pass (several magnitudes of a batch are stacked) "
    "[default: 256 on cpu, 1024 on cuda].",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seeds the image subset, the noise and the worst-case draws.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps.")
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=int,
    help="DataLoader worker processes for datasets read from files.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory (resumed if it holds the same configuration).",
)
@click.option("--overwrite", is_flag=True, help="Discard the results already in --out.")
@click.option(
    "--timeout",
    default=1800.0,
    show_default=True,
    type=float,
    help="Distributed runs (torchrun): seconds a rank waits for the others.",
)
@click.option("--no-figures", is_flag=True, help="Write tables only.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def sweep_cmd(
    model_spec,
    weights,
    data_spec,
    split,
    transform_list,
    ranges,
    pairs,
    worst_case,
    wc_angle,
    wc_shift,
    wc_grid,
    wc_k,
    images,
    classes,
    threshold,
    batch_size,
    forward_batch,
    seed,
    device,
    workers,
    out,
    overwrite,
    timeout,
    no_figures,
    no_progress,
) -> None:
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
    from invariscope.data import create_dataset
    from invariscope.errors import InvariscopeError
    from invariscope.measure._sweep_core import init_distributed, rank_device
    from invariscope.measure.sweep import sweep
    from invariscope.models import load_model
    from invariscope.runs.store import rank_from_env
    from invariscope.train import resolve_device
    from invariscope.transforms import parse_range

    names = _split_list(transform_list)
    magnitudes: dict[str, tuple[float, float, float]] = {}
    for item in ranges:
        name, start, stop, step = parse_range(item)
        if name in magnitudes:
            raise InvariscopeError(f"--range for '{name}' is given twice; give it once")
        magnitudes[name] = (start, stop, step)
    pair_list = [tuple(_split_list(p)) for p in pairs]
    budget = _budget(wc_angle, wc_shift, wc_grid, wc_k) if worst_case else None
    if not names and not pair_list and budget is None:
        raise InvariscopeError(
            "nothing to sweep: give --transforms (e.g. rotation,translate_x), --pair or --worst-case"
        )
    if timeout <= 0:
        raise InvariscopeError(f"--timeout must be positive, got {timeout:g}")
    rank, world_size = rank_from_env()
    dev = rank_device(resolve_device(device), rank, world_size)
    model = load_model(model_spec, weights)
    dataset = create_dataset(data_spec, split=split)
    started = init_distributed(dev, timeout=timeout)
    try:
        result = sweep(
            model,
            dataset,
            names,
            magnitudes or None,
            pairs=pair_list,
            worst_case=budget,
            images=images,
            classes=_split_list(classes) if classes else None,
            batch_size=batch_size,
            forward_batch=forward_batch,
            seed=seed,
            threshold_fraction=threshold,
            device=dev,
            out=out,
            overwrite=overwrite,
            figures=not no_figures,
            progress=not no_progress,
            num_workers=workers,
            model_spec=model_spec if weights is None else f"{model_spec} (weights {weights})",
            data_spec=f"{data_spec}:{split}" if split != "test" else data_spec,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if result.aggregated:  # the other ranks print nothing but errors
        _report(result, out)


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
