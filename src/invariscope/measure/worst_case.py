"""Worst-case spatial robustness: rotation x translation search (Engstrom et al. 2019).

Engstrom, Tran, Tsipras, Schmidt, Madry, "Exploring the landscape of spatial
robustness" (ICML 2019) evaluate a classifier under combined rotations and
translations within a budget in four ways, reported here per image and as accuracies:

- **natural**: the untransformed image;
- **random**: one transformation drawn uniformly from the budget;
- **worst-of-k**: correct only if all of k uniform draws (k = 10) are classified correctly;
- **grid**: correct only if every point of a grid over the budget is classified
  correctly (their grid: 31 angles x 5 x 5 translations). The *worst point* of the
  grid is the one with the lowest probability of the true class.

Convention:
    A transformation ``(angle, tx, ty)`` rotates by ``angle`` degrees (counter-clockwise
    as displayed, about the image centre) and then translates by ``(tx, ty)`` pixels
    (right / down), fused into ONE warp (``invariscope.transforms.compose``), filling
    with zeros. The budget is ``|angle| <= max_angle`` and ``|tx|, |ty| <= max_shift``
    pixels; grid axes are ``linspace(-max, max, n)`` (odd ``n`` contains the identity).
    Random draws depend only on ``(seed, dataset index, draw)``, so they are the same in
    any batch and after a resume.

Example:
    >>> from invariscope.data import create_dataset
    >>> from invariscope.models import create_model
    >>> res = worst_case_spatial(create_model("simple-cnn"), create_dataset("digits", "test"),
    ...                          SpatialBudget(angles=3, shifts=3, k=2), images=8)
    >>> res.summary[res.summary["label"] == -1]["setting"].tolist()
    ['natural', 'random', 'worst_of_k', 'grid']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from invariscope.engine import Analysis, AnalysisEntry, Batch, Part, part_id, register_analysis
from invariscope.engine import run as run_analysis
from invariscope.engine.execution import check_logits
from invariscope.engine.random import uniform_per_image
from invariscope.errors import InvariscopeError
from invariscope.measure._present import ci, fmt
from invariscope.measure._present import pivot as tidy_pivot

__all__ = [
    "SpatialBudget",
    "WorstCaseAnalysis",
    "WorstCaseResult",
    "worst_case_batch",
    "worst_case_spatial",
]


@dataclass(frozen=True)
class SpatialBudget:
    """The rotation x translation budget and how it is searched.

    Attributes:
        max_angle: largest rotation in degrees (both signs).
        max_shift: largest translation per axis in pixels (both signs); 3 px for
            28 px images is the scale of Engstrom et al.'s 24 px on 224 px ImageNet.
        angles: number of grid angles (31 in the paper).
        shifts: number of grid translations per axis (5 in the paper).
        k: number of random draws for worst-of-k (10 in the paper).
    """

    max_angle: float = 30.0
    max_shift: float = 3.0
    angles: int = 31
    shifts: int = 5
    k: int = 10

    def __post_init__(self) -> None:
        for name in ("max_angle", "max_shift"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value >= 0):
                raise InvariscopeError(
                    f"worst-case {name} must be a finite number >= 0, got {value!r}"
                )
        for name in ("angles", "shifts", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise InvariscopeError(f"worst-case {name} must be an integer >= 1, got {value!r}")

    def grid(self) -> np.ndarray:
        """Grid points ``[G, 3]`` (angle deg, tx px, ty px), angle-major."""
        a = np.linspace(-self.max_angle, self.max_angle, self.angles)
        s = np.linspace(-self.max_shift, self.max_shift, self.shifts)
        if self.angles == 1:
            a = np.zeros(1)
        if self.shifts == 1:
            s = np.zeros(1)
        ga, gx, gy = np.meshgrid(a, s, s, indexing="ij")
        return np.stack([ga.ravel(), gx.ravel(), gy.ravel()], axis=1)

    @property
    def points(self) -> int:
        """Number of grid points, ``angles x shifts x shifts`` (without building the grid)."""
        return int(self.angles) * int(self.shifts) ** 2

    def to_dict(self) -> dict[str, Any]:
        """The budget as a plain dictionary (for run configurations)."""
        return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """E.g. ``"+-30 deg, +-3 px, grid 31x5x5, k=10"``."""
        return (
            f"+-{self.max_angle:g} deg, +-{self.max_shift:g} px, grid "
            f"{self.angles}x{self.shifts}x{self.shifts}, k={self.k}"
        )


def _transform(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Rotate then translate ``images`` by ``params`` ``[n, 3]`` (deg, px, px) in one warp."""
    from invariscope.transforms import compose

    h, w = images.shape[-2:]
    params = params.to(images.device, images.dtype)
    return compose(
        images,
        [
            ("rotation", params[:, 0]),
            ("translate_x", params[:, 1] / w),
            ("translate_y", params[:, 2] / h),
        ],
    )


def _evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    params: torch.Tensor,
    num_classes: int,
    forward_batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct [B, P], p_true [B, P])`` for per-image parameters ``params`` ``[B, P, 3]``."""
    b, p = params.shape[:2]
    correct = torch.empty(b, p, dtype=torch.bool, device=x.device)
    p_true = torch.empty(b, p, dtype=torch.float32, device=x.device)
    per = max(1, forward_batch // b)
    for s in range(0, p, per):
        c = min(per, p - s)
        chunk = params[:, s : s + c].transpose(0, 1).reshape(c * b, 3)  # point-major
        images = _transform(x.repeat(c, 1, 1, 1), chunk)
        labels = y.repeat(c)
        logits = check_logits(forward(images), c * b, num_classes, "worst-case spatial search")
        probs = torch.softmax(logits.float(), dim=1)
        pred = probs.topk(1, dim=1).indices[:, 0]  # as the sweep's records
        correct[:, s : s + c] = (pred == labels).reshape(c, b).T
        p_true[:, s : s + c] = probs.gather(1, labels[:, None]).reshape(c, b).T
    return correct, p_true


def worst_case_batch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    budget: SpatialBudget,
    *,
    num_classes: int,
    forward_batch: int = 1024,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-image worst-case table of one batch (call under ``torch.inference_mode``).

    Args:
        forward: the model, or an engine's ``ctx.forward``.
        x: images ``[B, C, H, W]`` in ``[0, 1]`` on the model's device; y: labels ``[B]``;
        idx: dataset indices ``[B]`` (they seed the random draws).

    Returns:
        Columns ``index, label, natural_correct, random_correct, worst_of_k_correct,
        grid_correct, worst_angle, worst_tx_px, worst_ty_px, worst_p_true``.
    """
    b = x.shape[0]
    dev = x.device
    grid = torch.as_tensor(budget.grid(), dtype=torch.float64)
    u = uniform_per_image(seed, idx.cpu().numpy(), 3 * budget.k, stream=1).reshape(b, budget.k, 3)
    lim = np.array([budget.max_angle, budget.max_shift, budget.max_shift])
    draws = torch.as_tensor((2.0 * u - 1.0) * lim, dtype=torch.float64)
    params = torch.cat(
        [torch.zeros(b, 1, 3, dtype=torch.float64), draws, grid.expand(b, -1, -1)], dim=1
    ).to(dev)
    correct, p_true = _evaluate(forward, x, y, params, num_classes, forward_batch)
    k = budget.k
    grid_correct = correct[:, 1 + k :]
    grid_p = p_true[:, 1 + k :]
    worst = grid_p.argmin(dim=1).cpu().numpy()
    g = budget.grid()
    return pd.DataFrame(
        {
            "index": idx.cpu().numpy().astype(np.int64),
            "label": y.cpu().numpy().astype(np.int64),
            "natural_correct": correct[:, 0].cpu().numpy(),
            "random_correct": correct[:, 1].cpu().numpy(),
            "worst_of_k_correct": correct[:, 1 : 1 + k].all(dim=1).cpu().numpy(),
            "grid_correct": grid_correct.all(dim=1).cpu().numpy(),
            "worst_angle": g[worst, 0],
            "worst_tx_px": g[worst, 1],
            "worst_ty_px": g[worst, 2],
            "worst_p_true": grid_p.min(dim=1).values.cpu().numpy().astype(np.float32),
        }
    )


class WorstCaseAnalysis(Analysis):
    """The worst-case search alone, as an engine analysis: one part per batch (``worst-<b>``)."""

    name = "worst_case"
    part_tables = ("worst_case",)
    aggregate_tables = ("worst_case_summary", "classes")

    def __init__(self, budget: SpatialBudget | Mapping[str, Any] | None = None) -> None:
        if budget is None:
            budget = SpatialBudget()
        elif isinstance(budget, Mapping):
            budget = SpatialBudget(**budget)
        elif not isinstance(budget, SpatialBudget):
            raise InvariscopeError(f"budget must be a SpatialBudget or a dict, got {budget!r}")
        self.budget = budget

    def config(self) -> dict[str, Any]:
        return {"worst_case": self.budget.to_dict()}

    def max_forward_batch(self, ctx) -> int:
        return max(len(b) for b in ctx.batches["data"]) * (
            1 + self.budget.k + len(self.budget.grid())
        )

    def work(self, ctx) -> int:
        return len(ctx.indices["data"]) * (1 + self.budget.k + self.budget.points)

    def plan(self, ctx) -> list[Part]:
        return [Part(part_id("worst", b), batch=b) for b in range(len(ctx.batches["data"]))]

    def compute(self, part: Part, ctx, batch: Batch) -> dict[str, pd.DataFrame]:
        table = worst_case_batch(
            ctx.forward,
            batch.x,
            batch.y,
            batch.index,
            self.budget,
            num_classes=ctx.num_classes,
            forward_batch=ctx.forward_batch,
            seed=ctx.seed,
        )
        return {"worst_case": table}

    def aggregate(self, ctx) -> dict[str, pd.DataFrame]:
        from invariscope.measure import aggregate as agg

        names = ctx.classes["data"]
        per_image = ctx.results.read_table(
            "worst_case", columns=["label", *(f"{s}_correct" for s in agg.WORST_CASE_SETTINGS)]
        )
        return {
            "worst_case_summary": agg.worst_case_summary(per_image),
            "classes": pd.DataFrame(
                {"label": np.arange(len(names), dtype=np.int64), "name": names}
            ),
        }

    def summary(self, aggregates, ctx) -> dict[str, Any]:
        wc = aggregates["worst_case_summary"]
        overall = wc[wc["label"] == -1]
        return {
            "num_images": int(len(ctx.indices["data"])),
            "budget": self.budget.describe(),
            "worst_case": {r.setting: float(r.accuracy) for r in overall.itertuples(index=False)},
        }

    @classmethod
    def headline(cls, summary, aggregates, config) -> str:
        table = aggregates.get("worst_case_summary")
        if table is None:
            return super().headline(summary, aggregates, config)
        k = config.get("worst_case", {}).get("k") if isinstance(config, Mapping) else None
        return worst_case_headline(table, summary.get("num_images"), budget_text(config), k)

    @classmethod
    def pivots(cls, aggregates, config) -> dict[str, pd.DataFrame]:
        table = aggregates.get("worst_case_summary")
        if table is None:
            return {}
        return worst_case_pivots(table, aggregates.get("classes"))

    @classmethod
    def section_title(cls, title: str, config) -> str:
        budget = budget_text(config)
        return f"{title} ({budget})" if budget else title


#: The label of the all-classes rows (``aggregate.ALL_CLASSES``; not imported: a cycle).
_ALL_CLASSES = -1

#: How the report names each worst-case setting.
SETTING_NAMES = {
    "natural": "natural (untransformed)",
    "random": "random (one draw in the budget)",
    "worst_of_k": "worst of k random draws",
    "grid": "grid (worst over the whole grid)",
}


def budget_text(config: Mapping[str, Any]) -> str:
    """``"+-30 deg, +-3 px, grid 31x5x5, k=10"`` from a run's ``config["worst_case"]``."""
    budget = config.get("worst_case")
    if not isinstance(budget, Mapping):
        return ""
    try:
        return SpatialBudget(**budget).describe()
    except (TypeError, ValueError, InvariscopeError):
        return ""


def worst_case_headline(
    table: pd.DataFrame, num_images: Any, budget: str = "", k: Any = None
) -> str:
    """The worst-case finding: accuracy per setting (all classes) with 95% intervals."""
    overall = table[table["label"] == _ALL_CLASSES].set_index("setting")
    if overall.empty:
        return ""
    parts = [
        f"{_setting_word(s, k)} {ci(r.accuracy, r.accuracy_low, r.accuracy_high)}"
        for s, r in overall.iterrows()
    ]
    where = f" within {', '.join(budget.split(', ')[:2])}" if budget else ""
    images = f" on {num_images} images" if num_images is not None else ""
    text = f"Top-1 accuracy{images}{where}: " + ", ".join(parts) + " (95% intervals)."
    if {"natural", "grid"} <= set(overall.index):
        drop = float(overall.loc["natural", "accuracy"]) - float(overall.loc["grid", "accuracy"])
        text += (
            f" The worst rotation and shift per image costs {fmt(drop)} of accuracy "
            "against the untransformed images."
        )
    return text


def _setting_word(setting: str, k: Any = None) -> str:
    if setting == "worst_of_k" and isinstance(k, int):
        return f"worst-of-{k}"
    return setting.replace("_", "-")


def worst_case_pivots(
    table: pd.DataFrame, classes: pd.DataFrame | None = None
) -> dict[str, pd.DataFrame]:
    """Accuracy per setting (rows) with intervals; accuracy per class x setting."""
    overall = table[table["label"] == _ALL_CLASSES]
    settings = pd.DataFrame(
        {
            "images": overall["n"].to_numpy(),
            "accuracy (fraction correct)": overall["accuracy"].to_numpy(),
            "95% low": overall["accuracy_low"].to_numpy(),
            "95% high": overall["accuracy_high"].to_numpy(),
        },
        index=pd.Index([SETTING_NAMES.get(s, s) for s in overall["setting"]], name="setting"),
    )
    per_class = table[table["label"] != _ALL_CLASSES]
    out = {"Accuracy under the worst-case search": settings}
    if len(per_class):
        names = {}
        if classes is not None and {"label", "name"} <= set(classes.columns):
            names = dict(zip(classes["label"], classes["name"].astype(str), strict=True))
        pivot = tidy_pivot(per_class, "label", "setting", "accuracy")
        pivot.index = pd.Index([names.get(k, str(k)) for k in pivot.index], name="class")
        pivot.columns = [f"{s.replace('_', '-')} accuracy" for s in pivot.columns]
        out["Accuracy per class and setting (fraction correct)"] = pivot
    return out


register_analysis(
    AnalysisEntry(
        name="worst_case",
        analysis=WorstCaseAnalysis,
        title="Worst-case spatial robustness",
        paper="Engstrom et al. 2019, Exploring the landscape of spatial robustness",
        about=(
            "Each image is rotated and translated within a budget and counted correct only if "
            "the classifier is right for one random draw (random), for all of k random draws "
            "(worst-of-k) or for every point of a grid over the budget (grid). The drop from "
            "natural to grid accuracy is what a small, adversarially chosen rigid motion "
            "costs (intervals: 95% Wilson, over images)."
        ),
        command="worst-case",
        report_tables=("worst_case_summary",),
        figures="invariscope.plots.sweep:render_sweep_run",
        demo="invariscope.demo:worst_case_stage",
        conformance=(
            "--data",
            "digits",
            "--wc-grid",
            "3x3",
            "--wc-k",
            "3",
            "--images",
            "40",
            "--batch-size",
            "8",
        ),
        figure_order=("worst_case",),
        bad_inputs=(
            (("--data", "digits", "--wc-k", "0"), "k must be an integer >= 1"),
            (("--data", "digits", "--wc-grid", "31by5"), "--wc-grid '31by5' must be"),
            (("--data", "digits", "--wc-angle", "nan"), "max_angle must be a finite number"),
        ),
    )
)


@dataclass
class WorstCaseResult:
    """``per_image`` (see :func:`worst_case_batch`) and ``summary`` (``label, setting, n, accuracy``)."""

    per_image: pd.DataFrame
    summary: pd.DataFrame


def worst_case_spatial(
    model: nn.Module,
    dataset: Dataset,
    budget: SpatialBudget | None = None,
    *,
    images: int | Sequence[int] | None = None,
    classes: Sequence[str | int] | None = None,
    batch_size: int = 128,
    forward_batch: int | str | None = "auto",
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool | None = None,
    **engine: Any,
) -> WorstCaseResult:
    """Natural / random / worst-of-k / grid accuracy under rotation x translation.

    Figures: drawn into ``out/figures`` whenever ``out`` is given, unless
    ``figures=False`` (the same default for every analysis function).

    Runs :class:`WorstCaseAnalysis` on the engine (resumable with ``out``, distributable;
    ``engine`` takes the other options of :func:`invariscope.engine.run`).
    """
    result = run_analysis(
        WorstCaseAnalysis(budget),
        {"model": model},
        {"data": dataset},
        images=images,
        classes=classes,
        batch_size=batch_size,
        forward_batch=forward_batch,
        seed=seed,
        device=device,
        out=out,
        overwrite=overwrite,
        figures=figures,
        **engine,
    )
    return WorstCaseResult(result.table("worst_case"), result.aggregates["worst_case_summary"])
