"""What an analysis sees while it runs: :class:`Context`, and :class:`MemoryStore` for runs
without a directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from invariscope.engine.execution import Execution, Forward
from invariscope.errors import InvariscopeError

__all__ = ["Context", "MemoryStore"]


@dataclass
class Context:
    """Everything an analysis's ``plan``, ``compute`` and ``aggregate`` may use.

    Attributes:
        models, datasets: by the names the analysis declares (``"model"``, ``"data"``).
        device: where the models run.
        seed: the run's seed; randomness must come from ``(seed, part key)``.
        indices: per dataset, the selected dataset indices (grouped by class).
        batches: per dataset, the index arrays of the batches parts refer to.
        classes: per dataset, its class names.
        execution: forward batch, memory format, autocast (see :mod:`.execution`).
        forward: ``ctx.forward(images, model="model")`` runs a model as ``execution`` says.
        results: the stored parts so far (a later stage reads an earlier one's tables):
            ``iter_table``, ``read_table``, ``read_blob``, ``is_done``.
        rank, world_size: this process's place in the run.
        options: run-wide settings that do not change results (e.g. a threshold fraction).
    """

    models: dict[str, nn.Module]
    datasets: dict[str, Dataset]
    device: torch.device
    seed: int
    indices: dict[str, np.ndarray]
    batches: dict[str, list[np.ndarray]]
    classes: dict[str, list[str]]
    execution: Execution
    forward: Forward
    results: Any = None
    rank: int = 0
    world_size: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0

    @property
    def model(self) -> nn.Module:
        """The model named ``"model"``."""
        return self.models["model"]

    @property
    def dataset(self) -> Dataset:
        """The dataset named ``"data"``."""
        return self.datasets["data"]

    @property
    def num_classes(self) -> int:
        """The number of classes of ``"data"``."""
        return len(self.classes["data"])

    @property
    def forward_batch(self) -> int:
        """Most images per forward pass now (halved after an out-of-memory retry)."""
        return self.forward.forward_batch


class MemoryStore:
    """The part of :class:`~invariscope.runs.RunStore` a run uses, kept in memory (``out=None``)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, pd.DataFrame]] = {}
        self.blobs: dict[str, dict[str, bytes]] = {}
        self.aggregates: dict[str, pd.DataFrame] = {}

    def is_done(self, pid: str) -> bool:
        return pid in self.parts

    def pending(self, ids: Iterable[str]) -> list[str]:
        return [p for p in ids if p not in self.parts]

    def write_part(
        self,
        pid: str,
        tables: Mapping[str, pd.DataFrame],
        blobs: Mapping[str, bytes] | None = None,
        stage: int | None = None,
    ) -> None:
        # stored as a stored run reads them back: RangeIndex, no shared frames
        self.parts[pid] = {n: t.reset_index(drop=True) for n, t in tables.items()}
        self.blobs[pid] = dict(blobs or {})

    def tables(self) -> list[str]:
        return sorted({n for t in self.parts.values() for n in t})

    def iter_table(
        self, name: str, columns=None, filters=None
    ) -> Iterator[tuple[str, pd.DataFrame]]:
        for pid in sorted(self.parts):
            frame = self.parts[pid].get(name)
            if frame is None:
                continue
            for column, op, value in filters or ():
                if op != "==":
                    raise ValueError(f"in-memory runs filter with == only, got {op!r}")
                frame = frame[frame[column] == value].reset_index(drop=True)
            yield pid, frame if columns is None else frame[list(columns)]

    def read_table(self, name: str, columns=None, filters=None) -> pd.DataFrame:
        frames = [f for _, f in self.iter_table(name, columns, filters)]
        if not frames:
            raise InvariscopeError(f"this run produced no '{name}' table")
        return pd.concat(frames, ignore_index=True)

    def read_blob(self, pid: str, name: str) -> bytes:
        try:
            return self.blobs[pid][name]
        except KeyError:
            raise InvariscopeError(f"part {pid!r} has no blob {name!r}") from None

    def write_aggregate(self, name: str, table: pd.DataFrame) -> None:
        self.aggregates[name] = table

    def read_aggregate(self, name: str) -> pd.DataFrame:
        return self.aggregates[name]
