"""User-facing errors.

Every error a user can fix (an unknown name, a magnitude outside a transformation's
domain, an unreadable file, a wrong shape) is raised as :class:`InvariscopeError`. The
command line prints its message on one line and exits with status 2; library callers
can catch it like any ``ValueError``.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from collections.abc import Iterable, Iterator


class InvariscopeError(ValueError):
    """An error whose one-line message says what was wrong and how to fix it."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> InvariscopeError:
    """Build the error for an unknown registry name, listing the known names.

    >>> str(unknown_name("model", "simple-cn", ["simple-cnn", "small-vgg"]))
    "unknown model 'simple-cn' (did you mean 'simple-cnn'?); known: simple-cnn, small-vgg"
    """
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return InvariscopeError(f"unknown {kind} '{name}'{hint}; known: {', '.join(known)}")


# Which interface the user is speaking through: fix hints name what that interface has.
_INTERFACE: contextvars.ContextVar[str] = contextvars.ContextVar(
    "invariscope_interface", default="python"
)


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Within this block, :func:`hint` words fixes for the command line."""
    token = _INTERFACE.set("cli")
    try:
        yield
    finally:
        _INTERFACE.reset(token)


def warn(message: str) -> None:
    """Tell the user something they should know, in the words of the interface in use: one
    line ``invariscope: warning: ...`` on stderr on the command line, a
    :class:`UserWarning` in Python."""
    message = " ".join(str(message).split())
    if _INTERFACE.get() == "cli":
        import sys

        print(f"invariscope: warning: {message}", file=sys.stderr, flush=True)
    else:
        import warnings

        warnings.warn(message, UserWarning, stacklevel=3)


def hint(python: str, cli: str) -> str:
    """A fix in the words of the interface in use: ``python`` (an argument of the API,
    e.g. ``"pass overwrite=True"``) or ``cli`` (an option, e.g. ``"pass --overwrite"``).

    >>> hint("pass overwrite=True", "pass --overwrite")
    'pass overwrite=True'
    >>> with command_line():
    ...     hint("pass overwrite=True", "pass --overwrite")
    'pass --overwrite'
    """
    return cli if _INTERFACE.get() == "cli" else python
