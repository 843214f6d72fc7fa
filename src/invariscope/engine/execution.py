"""How a run executes forward passes: device, forward batch, memory format, autocast.

The pre-flight (:func:`preflight`) runs the model once on the first images and checks
its logits before anything is written. :func:`tune` then times a few forward-batch
sizes and both memory formats on the real model and device and keeps the fastest per
image (``--forward-batch auto``, the default). The choice is an :class:`Execution`,
recorded in the run directory and reused on resume and by every rank, so that a run's
tables do not depend on timing noise.

:class:`Forward` is what analyses call to run a model: it splits the images into
chunks of the forward batch, applies the memory format and autocast, and when a chunk
runs out of GPU memory it retries at half the size and keeps the smaller size for the
rest of the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from invariscope.errors import InvariscopeError, hint

log = logging.getLogger(__name__)

__all__ = [
    "Execution",
    "Forward",
    "check_logits",
    "deterministic_training",
    "is_out_of_memory",
    "model_device",
    "model_fingerprint",
    "resolve_device",
    "tune",
]

#: Forward-batch sizes tried by ``auto`` (capped by what the analysis can use).
CANDIDATES = {"cpu": (4, 8, 16, 32, 64, 128, 256, 512), "cuda": tuple(2**k for k in range(3, 13))}

#: channels_last is kept only when it is at least this much faster than contiguous,
#: so that near-ties (timing noise) do not flip the choice between runs.
CHANNELS_LAST_GAIN = 1.2

#: A larger forward batch is kept only when it is at least this much faster per image.
BATCH_GAIN = 1.03

#: Tuning stops growing the batch once one forward pass takes this long (seconds).
MAX_TUNING_FORWARD = 1.0

#: The batch size at which the two memory formats are compared, per device type.
FORMAT_PROBE = {"cpu": 8, "cuda": 64}

#: Tuning stops trying larger batches once it has taken this fraction of the run's
#: estimated length.
TUNING_BUDGET = 0.05


# ------------------------------------------------------------------------ the model


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable device; unknown names and missing GPUs are one-line errors."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, ValueError, TypeError):
        raise InvariscopeError(
            f"--device '{device}' is not a device; use cpu, cuda, cuda:1 or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvariscopeError(
                "--device cuda asked for, but no CUDA GPU is available; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvariscopeError(
                f"--device {dev} does not exist: this machine has {torch.cuda.device_count()} "
                "GPU(s); use cuda:0 or leave the index out"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvariscopeError("--device mps asked for, but MPS is not available; use cpu")
    elif dev.type != "cpu":
        raise InvariscopeError(f"--device '{device}' is not supported; use cpu, cuda or mps")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class name and ``state_dict`` (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_logits(logits: object, batch: int, num_classes: int, where: str) -> torch.Tensor:
    """Return ``logits`` if it is a finite float tensor ``[batch, num_classes]``, else raise."""
    if not isinstance(logits, torch.Tensor):
        raise InvariscopeError(
            f"the model returned {type(logits).__name__}, not a logits tensor "
            f"[B, {num_classes}]; wrap it so that forward returns the logits only"
        )
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise InvariscopeError(
            f"the model output has shape {list(logits.shape)} for a batch of {batch}; it must be "
            f"logits [B, num_classes] = [{batch}, {num_classes}] (flatten or select the logits)"
        )
    if logits.shape[1] != num_classes:
        raise InvariscopeError(
            f"the model outputs {logits.shape[1]} classes but the dataset has {num_classes}; "
            "use a model trained on this dataset (or a dataset with matching classes)"
        )
    if not torch.isfinite(logits).all():
        bad = "NaN" if torch.isnan(logits).any() else "infinite"
        raise InvariscopeError(
            f"the model returned {bad} logits ({where}); check the model weights and its "
            "input normalisation"
        )
    return logits


def is_out_of_memory(err: BaseException) -> bool:
    """True for the error a device raises when a batch does not fit in its memory."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


# -------------------------------------------------------------------- execution


@dataclass(frozen=True)
class Execution:
    """How forward passes run (recorded in ``meta.json`` as ``execution``).

    Attributes:
        forward_batch: most images per forward pass.
        channels_last: run the model and its inputs in ``torch.channels_last``.
        amp: autocast (float16 on CUDA, bfloat16 on the CPU).
        tuned: True when forward_batch / memory format were chosen by timing.
        ms_per_image: the timings behind the choice, ``{"<format>@<batch>": ms}``.
        tuning_seconds: how long the timing took.
    """

    forward_batch: int
    channels_last: bool = False
    amp: bool = False
    tuned: bool = False
    ms_per_image: dict | None = None
    tuning_seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Execution:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _as_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _time_forward(model: nn.Module, x: torch.Tensor, amp: bool, repeats: int = 2) -> float:
    """Best wall time of ``repeats`` forward passes (after one warm-up), in seconds."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.inference_mode(), _autocast(x.device, amp):
        model(x)
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            best = min(best, time.perf_counter() - t0)
    return best


def tune(
    model: nn.Module,
    sample: torch.Tensor,
    *,
    forward_batch: int | str = "auto",
    memory_format: str = "auto",
    amp: bool = False,
    cap: int | None = None,
    work: int | None = None,
) -> Execution:
    """Choose the forward batch and memory format by timing ``model`` on ``sample``.

    First both memory formats are timed at one small batch (8 images on the CPU, 64 on
    a GPU); ``channels_last`` is kept only when it is :data:`CHANNELS_LAST_GAIN` times
    faster. Then, in that format, the next smaller batch and larger batches are timed
    while each gains at least :data:`BATCH_GAIN` per image, and while the time spent
    tuning stays within :data:`TUNING_BUDGET` of the run's estimated length (``work``
    images at the per-image time of the first batch), so that tuning never costs more
    than it wins.

    Args:
        sample: real images ``[b, C, H, W]`` on the run's device (repeated to each size).
        forward_batch: ``"auto"`` or a fixed size (then only the format is timed).
        memory_format: ``"auto"``, ``"contiguous"`` or ``"channels_last"``.
        cap: the most images a forward pass of the analysis can hold (sizes above are
            not tried). work: about how many images the run forwards (None: unknown,
            no time budget).
    """
    device = sample.device
    fixed = None if forward_batch == "auto" else int(forward_batch)
    formats = {"auto": (False, True), "contiguous": (False,), "channels_last": (True,)}[
        memory_format
    ]
    if sample.dim() != 4:
        formats = (False,)
    if fixed is not None and len(formats) == 1:
        return Execution(fixed, formats[0], amp, tuned=False)
    if fixed is not None:
        sizes = [fixed]
    else:
        sizes = list(CANDIDATES.get(device.type, CANDIDATES["cpu"]))
        if cap is not None:
            sizes = sorted({s for s in sizes if s < cap} | {cap})
        # the format probe first, then the smaller sizes (nearest first), then the larger
        first = min(FORMAT_PROBE.get(device.type, 8), sizes[-1])
        smaller = sorted((s for s in sizes if s < first), reverse=True)
        sizes = [first, *smaller[:1], *(s for s in sizes if s > first)]
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def per_image(size: int, channels_last: bool) -> float | None:
        """Seconds per image at ``size`` in that format; None when it does not fit."""
        reps = -(-size // sample.shape[0])
        x = _as_format(sample.repeat(reps, 1, 1, 1)[:size], channels_last)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            seconds = _time_forward(model, x, amp)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            if channels_last:
                model.to(memory_format=torch.contiguous_format)
        name = "channels_last" if channels_last else "contiguous"
        timings[f"{name}@{size}"] = round(seconds / size * 1e3, 4)
        return seconds / size

    # 1. the memory format, at the first size
    size = sizes[0]
    probe = {cl: per_image(size, cl) for cl in formats}
    fits = {cl: t for cl, t in probe.items() if t is not None}
    if not fits:
        raise InvariscopeError(
            f"the model ran out of memory on a forward batch of {size} images; use a smaller "
            "--forward-batch or another device"
        )
    use_cl = True in fits and (False not in fits or fits[True] * CHANNELS_LAST_GAIN <= fits[False])
    best = (fits[use_cl], size)
    # 2. the forward batch, in that format, within the time budget
    budget = float("inf") if work is None else TUNING_BUDGET * work * best[0]
    stale = 0
    for size in sizes[1:]:
        # a probe costs a warm-up and two timed passes: start it only if it fits the budget
        if time.perf_counter() - started + 3 * size * best[0] > budget:
            break
        t = per_image(size, use_cl)
        if t is None:
            break
        if size < sizes[0]:  # the one smaller size: kept if it gains, never a reason to stop
            if t * BATCH_GAIN < best[0]:
                best = (t, size)
            continue
        if t * BATCH_GAIN < best[0]:
            best, stale = (t, size), 0
        else:
            stale += 1
        if stale >= 2 or t * size > MAX_TUNING_FORWARD:
            break
    return Execution(
        fixed if fixed is not None else best[1],
        use_cl,
        amp,
        tuned=True,
        ms_per_image=timings,
        tuning_seconds=round(time.perf_counter() - started, 3),
    )


class Forward:
    """Runs the models of a run the way its :class:`Execution` says.

    ``forward(images, model="model")`` returns the float32 outputs of ``images`` (any
    number), computed in chunks of at most ``forward_batch`` images. A chunk that runs
    out of device memory is retried at half the size; the smaller size is kept.
    """

    def __init__(self, models: dict[str, nn.Module], execution: Execution) -> None:
        self.models = models
        self.execution = execution
        self.forward_batch = execution.forward_batch
        self.retries = 0

    def __call__(self, images: torch.Tensor, model: str = "model") -> torch.Tensor:
        net = self.models[model]
        n = images.shape[0]
        outputs: list[torch.Tensor] = []
        start = 0
        while start < n:
            chunk = images[start : start + self.forward_batch]
            try:
                with _autocast(images.device, self.execution.amp):
                    out = net(_as_format(chunk, self.execution.channels_last))
            except Exception as err:
                if not is_out_of_memory(err) or self.forward_batch == 1:
                    raise
                self.forward_batch = max(1, self.forward_batch // 2)
                self.retries += 1
                log.warning(
                    "out of memory at a forward batch of %d images; retrying at %d",
                    chunk.shape[0],
                    self.forward_batch,
                )
                if images.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            outputs.append(out.float() if isinstance(out, torch.Tensor) else out)
            start += chunk.shape[0]
        if len(outputs) == 1 or not all(isinstance(o, torch.Tensor) for o in outputs):
            return outputs[0] if len(outputs) == 1 else outputs
        return torch.cat(outputs)

    def set_format(self, channels_last: bool) -> None:
        """Put the models into the execution's memory format (True) or back (False)."""
        if not self.execution.channels_last:
            return
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for model in self.models.values():
            model.to(memory_format=fmt)


@contextlib.contextmanager
def deterministic_training() -> Iterator[None]:
    """Use deterministic kernels inside the block; restore the previous settings after.

    Sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a
    deterministic implementation warns once instead of failing), cuDNN's deterministic
    mode without autotuning, and oneDNN's (mkldnn) deterministic mode.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        getattr(torch.backends.mkldnn, "deterministic", None),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("once", message=".*deterministic.*")
        try:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            if saved[4] is not None:
                torch.backends.mkldnn.deterministic = True
            yield
        finally:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
            if saved[4] is not None:
                torch.backends.mkldnn.deterministic = saved[4]


def optimiser_step(opt: torch.optim.Optimizer, loss: torch.Tensor, what: str) -> float:
    """One training step on ``loss`` (zero the gradients, backward, step); returns its value.

    A non-finite loss stops training with a one-line error naming ``what`` was trained
    (``"training <what> diverged (loss nan); lower --lr"``), before anything is updated.
    """
    if not torch.isfinite(loss):
        raise InvariscopeError(
            f"training {what} diverged (loss {loss.item()}); lower {hint('lr', '--lr')}"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
