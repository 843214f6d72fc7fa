"""One command-line vocabulary: what each shared option name means, deprecated spellings,
and the one magnitude syntax.

:data:`MEANINGS` declares what an option name means wherever it appears. An option name
used by one command only means what that command says; a name used by several commands
must be declared here, with ONE meaning (``tests/test_cli_vocabulary.py`` reads every
command's options and fails otherwise, and when two names share a meaning).

Old spellings stay as hidden aliases (:func:`deprecated`) that still work and print one
line on stderr, e.g. ``invariscope: warning: --size is deprecated; use --train-images``.

Magnitudes are written one way everywhere (:func:`magnitude_entries`): ``NAME=a:b:s`` is
a range (start:stop:step, the stop included), ``NAME=v[,v...]`` lists values; several
entries are separated by ``;`` or given by repeating the option.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import click
from click.core import ParameterSource

from invariscope.errors import InvariscopeError

#: Option name -> its one meaning, for every name that more than one command uses.
MEANINGS: dict[str, str] = {
    # what is measured and how it is read
    "--model": "the model to train, convert or measure",
    "--weights": "a weights file for an architecture named by --model",
    "--input-size": "the model's input size C,H,W when its weights do not tell it",
    "--data": "the dataset: a built-in name or a path",
    "--image-size": "folder images: shorter side resized to N (antialiased), centre crop N x N",
    "--images": "how many images are measured (a seeded subset)",
    "--batch-size": "measured images per batch (a part: the unit of resumption)",
    "--classes": "only the measured images of these classes",
    "--split": "which split of --data is measured",
    "--labels": "where each measured image's reference label comes from",
    "--resize": "resize images to the model's input size inside the model",
    # training
    "--train-images": "how many images are used for training or fitting",
    "--train-batch": "training images per optimiser step",
    "--train-steps": "optimiser steps of the training",
    "--lr": "the optimiser's learning rate",
    "--epochs": "training epochs",
    "--threads": "CPU threads for training",
    "--augment": "train-time augmentation: NAME=LOW:HIGH, uniform per image",
    # transformations and magnitudes
    "--transforms": "which transformations are applied",
    "--magnitudes": "the magnitudes of a transformation: NAME=a:b:s or NAME=v[,v...]",
    "--layers": "which layers of the model are examined",
    # running
    "--seed": "seeds every random draw of the command",
    "--device": "where the computation runs (cpu, cuda, cuda:1, mps)",
    "--workers": "DataLoader worker processes",
    "--out": "where the command writes its results",
    "--overwrite": "discard the results already in --out",
    "--timeout": "seconds a distributed rank waits for the others",
    "--no-figures": "write tables only, no figures",
    "--no-progress": "hide the progress bar",
    "--forward-batch": "most images per forward pass",
    "--memory-format": "the memory format of the forward passes",
    "--amp": "autocast the forward passes",
    "--max-work": "refuse a run that would forward more images than this",
    # method settings that several commands share
    "--method": "which algorithm of the command is used (its choices are listed per command)",
    "--kernel-size": "size m of a learned m x m convolution",
    "--examples": "how many test images are drawn as examples in a figure",
    "--wc-angle": "worst-case budget: largest rotation",
    "--wc-shift": "worst-case budget: largest translation",
    "--wc-grid": "worst-case grid size",
    "--wc-k": "worst-case: number of random draws",
}

#: (command, old spelling) -> the spelling to use; the old ones are hidden aliases.
DEPRECATED: dict[tuple[str, str], str] = {}


def warn(message: str) -> None:
    """Print ``invariscope: warning: MESSAGE`` as one line on stderr."""
    click.echo("invariscope: warning: " + " ".join(str(message).split()), err=True)


def _given(value: Any) -> bool:
    return value is not None and value is not False and value != ()


def deprecated(command: str, old: str, new: str, dest: str, **option: Any) -> Callable:
    """A hidden option ``old`` of ``command`` that sets parameter ``dest`` (the option
    ``new``) and prints one deprecation line; giving both is refused.

    Apply it right below ``@cli.command`` (after the command's other options).
    """
    DEPRECATED[(command, old)] = new
    hidden_name = f"deprecated_{old.lstrip('-').replace('-', '_')}"

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if _given(value) and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
            warn(f"{old} is deprecated; use {new}")
        return value

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(hidden_name)
            if _given(value):
                ctx = click.get_current_context()
                if ctx.get_parameter_source(dest) is ParameterSource.COMMANDLINE:
                    raise click.UsageError(f"{old} is the old name of {new}; give {new} only")
                kwargs[dest] = value
            return fn(*args, **kwargs)

        option.setdefault("default", None)
        return click.option(old, hidden_name, hidden=True, callback=callback, **option)(wrapper)

    return decorate


# ------------------------------------------------------------------------ magnitudes


def magnitude_entries(values: Iterable[str] | str | None) -> list[str]:
    """The entries of a repeatable magnitude option: each value split at ``;``.

    >>> magnitude_entries(("rotation=0:90:45; zoom=0.5,2", "shear_x=0.1"))
    ['rotation=0:90:45', 'zoom=0.5,2', 'shear_x=0.1']
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = (values,)
    return [e.strip() for v in values for e in str(v).split(";") if e.strip()]


def parse_magnitude(option: str, text: str) -> tuple[str, tuple[float, ...] | list[float]]:
    """``"NAME=a:b[:s]"`` -> ``(NAME, (a, b[, s]))`` (a range, a tuple) and
    ``"NAME=v[,v...]"`` -> ``(NAME, [v, ...])`` (values, a list).

    >>> parse_magnitude("--range", "rotation=-30:30:5")
    ('rotation', (-30.0, 30.0, 5.0))
    >>> parse_magnitude("--magnitudes", "zoom=0.5, 2")
    ('zoom', [0.5, 2.0])
    """
    form = f"{option} takes NAME=START:STOP:STEP (a range) or NAME=V[,V...] (values)"
    name, sep, rest = text.partition("=")
    name, rest = name.strip(), rest.strip()
    if not sep or not name or not rest:
        raise InvariscopeError(f"{option} '{text}': {form}, e.g. rotation=-30:30:5")
    ranged = ":" in rest
    parts = rest.split(":") if ranged else [p for p in rest.split(",")]
    if ranged and (len(parts) not in (2, 3) or "," in rest):
        raise InvariscopeError(f"{option} '{text}': {form}")
    numbers = []
    for part in parts:
        try:
            numbers.append(float(part))
        except ValueError:
            raise InvariscopeError(
                f"{option} {name}: the values must be numbers, got '{part.strip()}'"
            ) from None
    if not all(math.isfinite(v) for v in numbers):
        raise InvariscopeError(f"{option} {name}: the values must be finite, got '{rest}'")
    return (name, tuple(numbers)) if ranged else (name, numbers)


def range_values(option: str, name: str, start: float, stop: float, step: float) -> list[float]:
    """The values ``start, start + step, ...`` up to ``stop`` inclusive.

    >>> range_values("--magnitudes", "rotation", 15, 45, 15)
    [15.0, 30.0, 45.0]
    """
    if not step > 0:
        raise InvariscopeError(f"{option} {name}: the step must be positive, got {step:g}")
    if start > stop:
        raise InvariscopeError(f"{option} {name}: START {start:g} exceeds STOP {stop:g}")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [float(round(start + i * step, 12)) for i in range(count)]


def magnitude_values(option: str, values: Iterable[str] | str | None) -> dict[str, list[float]]:
    """Parse a magnitude option into ``{NAME: [values]}`` (ranges expanded; a range
    needs its step here). A name given twice is refused.

    >>> magnitude_values("--magnitudes", ("rotation=15:45:15;zoom=0.5,2",))
    {'rotation': [15.0, 30.0, 45.0], 'zoom': [0.5, 2.0]}
    """
    out: dict[str, list[float]] = {}
    for entry in magnitude_entries(values):
        name, spec = parse_magnitude(option, entry)
        if name in out:
            raise InvariscopeError(f"{option} is given twice for {name}; give it once")
        if isinstance(spec, tuple):
            if len(spec) != 3:
                raise InvariscopeError(
                    f"{option} '{entry}': give the step too, NAME=START:STOP:STEP"
                )
            out[name] = range_values(option, name, *spec)
        else:
            out[name] = spec
    return out


# ------------------------------------------------------------------ the vocabulary check


def _kind(option: click.Option) -> str:
    return "flag" if option.is_flag else "repeatable" if option.multiple else "value"


def vocabulary_problems(commands: dict[str, click.Command]) -> list[str]:
    """What breaks "one name per meaning" among ``commands``' visible options.

    A name used by one command means what that command says; a name used by several
    must be declared in :data:`MEANINGS` (one meaning), and take values the same way
    (flag, value or repeatable) everywhere. Two declared names with one meaning are
    a problem too, unless they are aliases of one option. Hidden (deprecated) options
    are left out.
    """
    uses: dict[str, list[tuple[str, str, str]]] = {}
    groups: dict[str, set[tuple[str, ...]]] = {}
    for cname, command in sorted(commands.items()):
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            names = tuple(sorted(o for o in (*param.opts, *param.secondary_opts) if o[:2] == "--"))
            for name in names:
                meaning = MEANINGS.get(name, f"what '{cname}' says")
                uses.setdefault(name, []).append((cname, meaning, _kind(param)))
                if name in MEANINGS:
                    groups.setdefault(MEANINGS[name], set()).add(names)
    problems = []
    for name, rows in sorted(uses.items()):
        meanings = sorted({m for _, m, _ in rows})
        if len(meanings) > 1:
            where = ", ".join(f"{c} ({m})" for c, m, _ in rows)
            problems.append(
                f"{name} has {len(meanings)} meanings: {where}; declare its one meaning in "
                "MEANINGS, or rename it where it means something else"
            )
        kinds = sorted({k for _, _, k in rows})
        if len(kinds) > 1:
            where = ", ".join(f"{c} ({k})" for c, _, k in rows)
            problems.append(f"{name} takes values in {len(kinds)} ways: {where}")
    for meaning, sets in sorted(groups.items()):
        common = set.intersection(*(set(s) for s in sets))
        if not common:
            problems.append(
                f"'{meaning}' has several names: {', '.join('/'.join(s) for s in sorted(sets))}"
            )
    return problems
