"""The registry of analyses: what each one is, where its parts of the tool live.

Every analysis registers an :class:`AnalysisEntry` with :func:`register_analysis`, in
the module that defines its :class:`~invariscope.engine.analysis.Analysis` subclass
(``invariscope.measure.sweep`` registers ``sweep``). The entry names everything the
rest of the tool needs to treat all analyses alike:

- ``command``: its ``invariscope`` sub-command (the options live in ``cli/<command>.py``);
- ``figures``: how its figures are drawn from stored tables (``invariscope render``);
- ``report_tables`` and ``about``: its section of the HTML report (``invariscope report``);
- ``demo``: its stage of ``invariscope demo``;
- ``conformance``: the arguments of a small run, which the conformance test runs to
  check resume after kill -9, 2 ranks = 1 rank and stored = in memory.

Hooks that live in higher layers (figures in ``plots/``, demo stages) are named by
dotted path (``"invariscope.plots.sweep:render_sweep_run_figures"``) and imported only
when used, so imports keep pointing downward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from invariscope.errors import InvariscopeError, unknown_name

__all__ = [
    "AnalysisEntry",
    "find_analysis",
    "get_analysis",
    "list_analyses",
    "load_hook",
    "register_analysis",
]

#: Modules that register the built-in analyses (imported on the first lookup).
BUILTIN_MODULES = (
    "invariscope.measure.sweep",
    "invariscope.measure.worst_case",
    "invariscope.measure.shift",
    "invariscope.measure.stitch",
    "invariscope.measure.lee",
    "invariscope.measure.stn",
    "invariscope.measure.alignment",
    "invariscope.measure.equivariance",
    "invariscope.measure.itn",
)


@dataclass(frozen=True)
class AnalysisEntry:
    """One registered analysis.

    Attributes:
        name: the analysis name stored in every run's configuration (``config["analysis"]``).
        analysis: the :class:`~invariscope.engine.analysis.Analysis` subclass.
        title: a short title ("Transformation sweeps").
        paper: the paper(s) the measure comes from, as cited in the report.
        about: two sentences on what the measure means, for the report.
        command: the ``invariscope`` sub-command that runs it.
        report_tables: aggregate tables shown in the report, in order.
        figures: dotted path ``"module:function"`` of
            ``render(aggregates: dict[str, DataFrame], out_dir: Path, config: dict) ->
            list[Path]``, or None.
        demo: dotted path of the demo stage ``stage(ctx) -> str``, or None.
        conformance: ``invariscope <command>`` arguments of a small run (without
            ``--model`` and ``--out``, which the test adds) for the conformance test.
        figure_order: figure names (file stems) in the order the report shows them;
            figures not named come after, sorted.
        bad_inputs: ``(arguments, words of the error)`` pairs of the command's own bad
            input (an unknown name, an out-of-domain option) that the conformance test
            checks give one line, exit status 2 and no run directory.
    """

    name: str
    analysis: type
    title: str
    paper: str
    about: str
    command: str
    report_tables: tuple[str, ...] = ()
    figures: str | None = None
    demo: str | None = None
    conformance: tuple[str, ...] = ()
    figure_order: tuple[str, ...] = ()
    bad_inputs: tuple[tuple[tuple[str, ...], str], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self) -> Callable[..., list] | None:
        """The figure renderer (imported now), or None."""
        return None if self.figures is None else load_hook(self.figures)


_REGISTRY: dict[str, AnalysisEntry] = {}
_LOADED = False


def register_analysis(entry: AnalysisEntry) -> AnalysisEntry:
    """Add ``entry`` to the registry; a second analysis with the same name is refused."""
    old = _REGISTRY.get(entry.name)
    if old is not None and old.analysis is not entry.analysis:
        raise InvariscopeError(
            f"an analysis named '{entry.name}' is already registered "
            f"({old.analysis.__module__}.{old.analysis.__qualname__}); pick another name"
        )
    _REGISTRY[entry.name] = entry
    return entry


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _LOADED = True


def get_analysis(name: str) -> AnalysisEntry:
    """The entry of analysis ``name``; unknown names list the known ones."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("analysis", str(name), _REGISTRY) from None


def find_analysis(name: str) -> AnalysisEntry | None:
    """The entry of analysis ``name``, or None when it is not registered."""
    _load_builtins()
    return _REGISTRY.get(name)


def list_analyses() -> list[AnalysisEntry]:
    """Every registered analysis: the built-ins in :data:`BUILTIN_MODULES` order, then
    the others in registration order."""
    _load_builtins()

    def rank(entry: AnalysisEntry) -> int:
        module = entry.analysis.__module__
        return BUILTIN_MODULES.index(module) if module in BUILTIN_MODULES else len(BUILTIN_MODULES)

    return sorted(_REGISTRY.values(), key=rank)


def load_hook(path: str) -> Callable[..., Any]:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise InvariscopeError(
            f"cannot load '{path}' ({type(err).__name__}: {err}); the analysis registry "
            "names a function that does not exist"
        ) from None
