"""The click group, the error policy and the registration of sub-commands."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from invariscope.errors import InvariscopeError, command_line

# Sub-command modules; each defines commands decorated with ``@cli.command``.
COMMAND_MODULES = (
    "listing",
    "train",
    "demo",
    "sweep",
    "shift",
    "antialias",
    "stitch",
    "lee",
    "stn",
    "alignment",
    "equivariance",
    "itn",
    "render",
    "report",
)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="invariscope")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Measure, explain and improve how image classifiers respond to transformations.

    \b
    Example:
      invariscope train --model simple-cnn --data digits --epochs 5 --out model.pt
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: leave a configured logging alone
        handler = logging.StreamHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
        root.setLevel(level)


class _Formatter(logging.Formatter):
    """Warnings and errors read like the command's own one-line messages
    (``invariscope: warning: ...``); -v / -vv output names its logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"invariscope: {record.levelname.lower()}: {record.getMessage()}"
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def _load_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"invariscope.cli.{name}")
        except ModuleNotFoundError as err:  # a command module not written yet
            if err.name != f"invariscope.cli.{name}":
                raise


def _fail(message: str) -> int:
    message = " ".join(str(message).split())  # always one line
    click.echo(f"invariscope: error: {message}", err=True)
    return 2


def run(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` and return the exit status (never raises)."""
    _load_commands()
    try:
        with command_line():
            cli.main(args=argv, prog_name="invariscope", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:
        click.echo(err.ctx.get_help() if err.ctx else str(err))
        return 0
    except click.UsageError as err:
        hint = (
            f" (see 'invariscope {err.ctx.command_path.split(' ', 1)[-1]} --help')"
            if (err.ctx and " " in err.ctx.command_path)
            else " (see 'invariscope --help')"
        )
        return _fail(err.format_message() + hint)
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.Abort:
        click.echo("invariscope: interrupted", err=True)
        return 130
    except click.ClickException as err:
        return _fail(err.format_message())
    except InvariscopeError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        click.echo("invariscope: interrupted", err=True)
        return 130
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
