"""Renamed keyword arguments of the Python API: the old names keep working, with a
:class:`DeprecationWarning` that names the new one (the command line's vocabulary:
``frames``, ``train_steps``, ``train_images``, ``train_batch``, ...)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from invariscope.errors import InvariscopeError

F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """``@renamed_arguments(steps="frames")``: ``fn(steps=4)`` calls ``fn(frames=4)`` and
    warns; giving both names is refused.

    >>> @renamed_arguments(steps="frames")
    ... def f(*, frames=16):
    ...     return frames
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     f(steps=4), str(caught[0].message)
    (4, 'f(steps=...) is deprecated; use frames=...')
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise InvariscopeError(
                            f"{fn.__name__}: {old}= is the old name of {new}=; pass {new}= only"
                        )
                    warnings.warn(
                        f"{fn.__name__}({old}=...) is deprecated; use {new}=...",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.__renamed_arguments__ = dict(renames)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
