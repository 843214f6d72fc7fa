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
        paths = [] if render is None else render(Path(run_dir), out or Path(run_dir) / "figures")
        click.echo(f"{run_dir}: {len(paths) // 2} figures ({entry.title})")
