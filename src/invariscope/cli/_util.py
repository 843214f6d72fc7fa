"""Small helpers shared by the command modules."""

from __future__ import annotations

import click


def image_size_option(default: str):
    """The ``--image-size N`` option of every command that reads data (one wording, one
    policy: shorter side resized to N with antialiasing, then the centre N x N crop);
    ``default`` says what happens without it."""
    return click.option(
        "--image-size",
        default=None,
        type=click.IntRange(min=1),
        metavar="N",
        help="Read folder images at N x N: shorter side resized to N (antialiased), centre "
        f"crop [default: {default}]; datasets with a size option (shapes, photos) are made "
        "at N.",
    )


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Echo ``rows`` as a plain, aligned text table with the given column order."""
    rows = [{c: "-" if r.get(c) is None else r[c] for c in columns} for r in rows]
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip())


def fmt_number(x: float) -> str:
    """Format a magnitude compactly (``inf`` stays ``inf``)."""
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"
