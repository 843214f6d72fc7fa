"""Griffe extension for the API reference: fence the doctests of docstrings.

A docstring's ``>>>`` examples (run by the test suite as doctests) are plain text to
Markdown, which reads their indexing brackets (``ds.classes[:3]``) as link references.
This extension wraps each run of ``>>>`` / ``...`` lines and the output after them in a
``pycon`` code fence, so the API pages show them as code and ``mkdocs build --strict``
fails only on real broken references.
"""

from __future__ import annotations

import griffe


def fence_doctests(text: str) -> str:
    """``text`` with every doctest block (prompt lines and their output) in a fence."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
                block.append(lines[i][len(indent) :])
                i += 1
            out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence the doctests of every object's docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
