"""The ``invariscope`` command line: thin wrappers that parse arguments and call the API.

Each sub-command lives in its own module of this package and registers itself on
:data:`main` (see ``_app.py``). User-fixable errors (:class:`InvariscopeError`) and bad
arguments print ONE line, ``invariscope: error: ...``, on stderr and exit with status 2.
"""

from invariscope.cli._app import main, run

__all__ = ["main", "run"]
