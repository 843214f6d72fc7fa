"""User-facing errors.

Every error a user can fix (an unknown name, a magnitude outside a transformation's
domain, an unreadable file, a wrong shape) is raised as :class:`InvariscopeError`. The
command line prints its message on one line and exits with status 2; library callers
can catch it like any ``ValueError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
