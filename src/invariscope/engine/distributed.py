"""How the ranks of a distributed run meet: ``torch.distributed`` under ``torchrun``
(``gloo`` on the CPU, ``nccl`` on GPUs), or the run directory alone.

Used by :mod:`invariscope.engine.runner` only; analyses never see ranks.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence

import torch

from invariscope.errors import InvariscopeError

__all__ = ["RankGroup", "init_distributed", "rank_device", "wait_for_parts"]


def rank_device(device: torch.device, rank: int, world_size: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a bare ``cuda`` in a distributed job.

    One process per GPU, as ``torchrun`` starts them: ``LOCAL_RANK`` (set by torchrun;
    ``rank`` modulo the number of GPUs without it) picks the GPU. An explicit index
    (``cuda:1``) and other devices are kept; a GPU index that does not exist is an error.
    """
    if device.type != "cuda" or world_size <= 1 or device.index is not None:
        return device
    count = torch.cuda.device_count()
    local = os.environ.get("LOCAL_RANK", "")
    index = int(local) if local.strip().isdigit() else rank % max(count, 1)
    if index >= count:
        raise InvariscopeError(
            f"rank {rank} needs GPU cuda:{index} (LOCAL_RANK) but this machine has {count}; "
            f"start at most {count} processes per node (torchrun --nproc_per_node {count})"
        )
    return torch.device("cuda", index)


def init_distributed(device: torch.device, *, timeout: float = 1800.0) -> bool:
    """Start ``torch.distributed`` for a ``torchrun`` launch; True when this call started it.

    Only when the environment describes a job of several processes (``WORLD_SIZE > 1``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` set, as torchrun does) and no process group
    exists yet: ``nccl`` for a CUDA ``device`` (made the current device first), ``gloo``
    otherwise. ``timeout`` (seconds) bounds every collective, i.e. how long a rank waits
    for the slowest one. Whoever gets True calls
    ``torch.distributed.destroy_process_group()`` at the end.
    """
    import torch.distributed as dist

    from invariscope.runs.store import rank_from_env

    info = rank_from_env()
    if info.world_size <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        return False  # not a torchrun launch: the ranks meet through the run directory
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return True


class RankGroup:
    """How the ranks of a distributed sweep meet.

    With an initialised ``torch.distributed`` process group of ``world_size`` processes
    (``collective`` True) :meth:`failed_ranks` is a collective (an ``all_reduce``, i.e. a
    barrier that also tells every rank which ranks failed). Without one (``collective``
    False) it is local: the ranks meet only through the run directory, where rank 0
    waits for the other ranks' parts (:func:`wait_for_parts`).

    Args:
        rank, world_size: this process's place in the job.
        device: the sweep's device (the collectives of an ``nccl`` group run there).
    """

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size = rank, world_size
        self.collective = False
        self._device = torch.device("cpu")
        if world_size <= 1:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise InvariscopeError(
                f"rank={rank}, world_size={world_size} do not match the torch.distributed "
                f"process group (rank {dist.get_rank()} of {dist.get_world_size()}); leave "
                "rank and world_size unset under torchrun"
            )
        self.collective = True
        if "nccl" in str(dist.get_backend()).lower():
            self._device = (
                device
                if device.type == "cuda"
                else torch.device("cuda", torch.cuda.current_device())
            )

    def failed_ranks(self, failed: bool) -> list[int]:
        """The ranks that report ``failed`` (every rank must call it: a barrier)."""
        if not self.collective:
            return [self.rank] if failed else []
        import torch.distributed as dist

        flags = torch.zeros(self.world_size, dtype=torch.int64, device=self._device)
        flags[self.rank] = int(failed)
        dist.all_reduce(flags)
        return [int(r) for r in torch.nonzero(flags.cpu()).flatten()]


def wait_for_parts(store, part_ids: Sequence[str], *, timeout: float, poll: float = 0.2) -> None:
    """Rank 0 without a process group: wait until every part of ``part_ids`` is done.

    ``timeout`` counts seconds without progress: the clock restarts whenever another
    part is done, so a long sweep does not time out while the ranks still make headway.
    A timeout is an :class:`InvariscopeError` naming the first missing part (the run
    stays incomplete; running the same command again resumes it).
    """
    missing = store.pending(part_ids)
    deadline = time.monotonic() + timeout
    while missing:
        if time.monotonic() > deadline:
            raise InvariscopeError(
                f"rank 0 waited {timeout:g} s without a new part from the other ranks: "
                f"{len(missing)} of {len(part_ids)} parts are not done (first: {missing[0]}); "
                "check the other ranks' errors, then run the same command again on all ranks "
                "to resume"
            )
        time.sleep(poll)
        now_missing = store.pending(missing)
        if len(now_missing) < len(missing):
            deadline = time.monotonic() + timeout
        missing = now_missing
