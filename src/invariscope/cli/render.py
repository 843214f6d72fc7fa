"""``invariscope render RUN_DIR``: redraw a stored run's figures, without measuring anything."""

from __future__ import annotations

from pathlib import Path

import click

from invariscope.cli._app import cli


@cli.command("render")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the figures (default: RUN_DIR/figures; only with one RUN_DIR).",
)
def render_cmd(run_dirs, out) -> None:
    """Redraw the figures of stored runs from their tables (any analysis).

    \b
    Example:
      invariscope render runs/sweep
    """
    from invariscope.engine.registry import get_analysis
    from invariscope.errors import InvariscopeError
    from invariscope.runs.store import RunStore

    if out is not None and len(run_dirs) > 1:
        raise InvariscopeError("--out takes one RUN_DIR; leave it out to draw into each run")
    for run_dir in run_dirs:
        store = RunStore.open(run_dir)
        if not store.is_complete:
            raise InvariscopeError(
                f"run '{run_dir}' is not complete; run the same command again to finish it"
            )
        entry = get_analysis(store.config.get("analysis", "?"))
        render = entry.render()
        folder = out or Path(run_dir) / "figures"
        paths = [] if render is None else _draw(render, Path(run_dir), folder)
        click.echo(f"{run_dir}: {len(paths) // 2} figures ({entry.title})")


def _draw(render, run_dir: Path, folder: Path) -> list:
    """``render(run_dir, folder)`` with a one-line error for a folder that cannot be written."""
    from invariscope.errors import InvariscopeError

    where = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if where is not None and not where.is_dir():
        raise InvariscopeError(
            f"'{where}' is a file, not a folder; move it away or pass another --out"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return list(render(run_dir, folder))
    except OSError as exc:
        raise InvariscopeError(
            f"cannot write the figures into '{folder}' ({type(exc).__name__}: "
            f"{exc.strerror or exc}); pass a folder you can write with --out"
        ) from None
