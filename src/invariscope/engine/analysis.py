"""The analysis protocol: what one analysis says; the runner does everything else.

An analysis is to the engine what a ``LightningModule`` is to Lightning's ``Trainer``,
with the *part* in place of the batch. It implements a handful of methods:

- :meth:`Analysis.config`: its result-defining configuration (JSON-able). The engine
  adds the model and data fingerprints, the selected images and the common settings,
  and stores the whole as the run's configuration;
- :meth:`Analysis.plan`: a deterministic list of :class:`Part` s. A part either works on
  one batch of images (``batch`` set: the runner reads each batch once for all the parts
  that share it) or is a whole job that loops by itself (``batch=None``: a training run,
  a regression fit). Parts come in ``stage`` s: every part of stage ``s`` is done (on
  every rank) before any part of stage ``s + 1`` starts, and a later stage may read an
  earlier stage's stored results through ``ctx.results``;
- :meth:`Analysis.compute`: the tables of one part (and optionally binary blobs:
  fitted maps, trained weights), stored inside the part before its done-marker;
- :meth:`Analysis.aggregate`: the aggregate tables, computed on rank 0 by streaming over
  the stored parts;
- :meth:`Analysis.summary`: a few headline numbers (stored in the manifest).

For the report (``invariscope report``), three class methods present a finished run from
its stored summary, aggregate tables and configuration (they never measure):
:meth:`Analysis.headline` (the finding in one or two sentences, with numbers and
intervals), :meth:`Analysis.pivots` (tidy pivoted tables: layer x transformation, model x
protocol, ...) and :meth:`Analysis.section_title` (a title that tells runs of the same
analysis apart).

Reproducibility: randomness must come from ``(ctx.seed, part key)`` (e.g.
:func:`invariscope.engine.random.uniform_per_image`), never from rank or order, and
tables must not hold wall-clock times; then a resumed or distributed run gives identical
tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import torch

if TYPE_CHECKING:  # pragma: no cover
    from invariscope.engine.context import Context

__all__ = ["Analysis", "Batch", "Part", "PartOutput", "default_headline"]


@dataclass(frozen=True)
class Part:
    """One unit of work: of resumption, of distribution and of storage.

    Attributes:
        id: the part id (``invariscope.runs.part_id(...)``: sorts in key order).
        stage: parts of a stage run after every part of the earlier stages is done.
        batch: the batch number (into ``ctx.batches[dataset]``) this part reads, or
            None for a job part that loops by itself.
        dataset: which of the analysis's datasets the batch comes from.
        key: anything the analysis needs to know which work this is (a transformation
            name, a layer, a grid index); never used by the engine.
    """

    id: str
    stage: int = 0
    batch: int | None = None
    dataset: str = "data"
    key: Any = None


@dataclass
class Batch:
    """A batch of images for batch parts, on the run's device.

    Attributes:
        x: images ``[B, C, H, W]`` in ``[0, 1]``; y: labels ``[B]`` (int64);
        index: dataset indices ``[B]`` (int64, on the CPU); number: the batch number.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    number: int
    dataset: str = "data"


@dataclass
class PartOutput:
    """What :meth:`Analysis.compute` may return when a part also has binary blobs."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)


class Analysis:
    """Base class of every analysis run by :func:`invariscope.engine.run`.

    Class attributes:
        name: the registered name, stored as ``config["analysis"]``.
        version: bump when the tables an unchanged configuration produces change, so
            that an old run directory is not resumed with new code.
        grad: True to compute parts with autograd (training, Lie derivatives); False
            (default) runs them under ``torch.inference_mode``.
        models: names of the models it takes (``("model",)``; ``()`` for none; two
            for stitching).
        datasets: names of the datasets it takes (``("data",)``; ``()`` for none).
        part_tables: names of the per-part tables (for error messages and results).
        aggregate_tables: names of the aggregate tables it may write.
        classifier: True when ``models["model"]`` is a classifier of
            ``datasets["data"]``: the pre-flight then runs it on the first images and
            checks its logits ``[B, K]`` (K = number of classes) before anything is
            written, and the forward batch and memory format are tuned on it.
        mixed_batches: True when a part computes a statistic of its batch that assumes
            i.i.d. images (the unbiased HSIC of streamed CKA): the runner then cuts the
            batches from the selected images in a random order seeded by the run's seed
            (:func:`invariscope.engine.selection.mix_indices`) instead of grouping them by
            class, so that no batch is dominated by one class.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    grad: ClassVar[bool] = False
    models: ClassVar[tuple[str, ...]] = ("model",)
    datasets: ClassVar[tuple[str, ...]] = ("data",)
    part_tables: ClassVar[tuple[str, ...]] = ()
    aggregate_tables: ClassVar[tuple[str, ...]] = ()
    classifier: ClassVar[bool] = True
    mixed_batches: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """The analysis's own result-defining settings (JSON-able)."""
        return {}

    def check(self, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Refuse bad input before anything is written (raise InvariscopeError)."""

    def max_forward_batch(self, ctx: Context) -> int | None:
        """The most images one forward pass of this analysis can hold (caps tuning)."""
        return None

    def work(self, ctx: Context) -> int | None:
        """About how many images the run forwards in all (None: unknown).

        The engine tunes the forward batch only when the run is long enough to gain.
        """
        return None

    def plan(self, ctx: Context) -> list[Part]:
        """The parts, in a deterministic order."""
        raise NotImplementedError

    def compute(
        self, part: Part, ctx: Context, batch: Batch | None
    ) -> Mapping[str, pd.DataFrame] | PartOutput:
        """The tables (and blobs) of one part."""
        raise NotImplementedError

    def aggregate(self, ctx: Context) -> dict[str, pd.DataFrame]:
        """Aggregate tables from the stored parts (``ctx.results``), on rank 0."""
        return {}

    def summary(self, aggregates: Mapping[str, pd.DataFrame], ctx: Context) -> dict[str, Any]:
        """A few headline numbers (JSON-able), stored in the manifest."""
        return {}

    # ----------------------------------------------------------------- presentation

    @classmethod
    def headline(
        cls,
        summary: Mapping[str, Any],
        aggregates: Mapping[str, pd.DataFrame],
        config: Mapping[str, Any],
    ) -> str:
        """The run's finding in one or two sentences, with numbers (and intervals).

        ``aggregates`` maps table names to the stored aggregate tables (read when looked
        up). The default lists the first scalar numbers of ``summary``.
        """
        return default_headline(summary)

    @classmethod
    def pivots(
        cls, aggregates: Mapping[str, pd.DataFrame], config: Mapping[str, Any]
    ) -> dict[str, pd.DataFrame]:
        """Tidy pivoted tables for the report: caption -> table.

        Each table's index holds the row labels (named: ``layer``, ``model``, ...), its
        columns the compared settings; headers carry the units. Default: none.
        """
        return {}

    @classmethod
    def section_title(cls, title: str, config: Mapping[str, Any]) -> str:
        """The report title of a run: the registered ``title``, made specific to this
        run's configuration where runs of the analysis differ in kind."""
        return title


def default_headline(summary: Mapping[str, Any], items: int = 4) -> str:
    """``"On 40 images: score 0.5, loss 1.25."``: the first top-level scalar numbers."""
    numbers = [
        (str(k), v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "num_images"
    ]
    parts = [f"{k.replace('_', ' ')} {v:.4g}" for k, v in numbers[:items]]
    n = summary.get("num_images")
    prefix = f"On {n} images" if isinstance(n, int) and not isinstance(n, bool) else ""
    if not parts:
        return f"{prefix}." if prefix else ""
    return (f"{prefix}: " if prefix else "") + ", ".join(parts) + "."
