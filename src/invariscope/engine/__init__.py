"""One engine for every analysis: plan -> parts -> store -> ranks -> aggregate -> figures.

An analysis (:class:`Analysis`) says what one part computes; :func:`run` owns the run
directory and resume, the ranks under ``torchrun``, the device, the forward batch and
memory format, the progress bar, aggregation, figures and finalize. Analyses register
themselves (:func:`register_analysis`) with their command, figures, report section and
demo stage.
"""

from invariscope.engine.analysis import Analysis, Batch, Part, PartOutput
from invariscope.engine.context import Context, MemoryStore
from invariscope.engine.execution import Execution, check_logits, model_fingerprint
from invariscope.engine.random import uniform_per_image
from invariscope.engine.registry import (
    AnalysisEntry,
    get_analysis,
    list_analyses,
    register_analysis,
)
from invariscope.engine.runner import RunResult, run
from invariscope.runs.store import part_id

__all__ = [
    "Analysis",
    "AnalysisEntry",
    "Batch",
    "Context",
    "Execution",
    "MemoryStore",
    "Part",
    "PartOutput",
    "RunResult",
    "check_logits",
    "get_analysis",
    "list_analyses",
    "model_fingerprint",
    "part_id",
    "register_analysis",
    "run",
    "uniform_per_image",
]
