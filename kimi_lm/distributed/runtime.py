"""Process-group set-up for runs launched by ``torchrun`` (or any launcher that sets its environment).

torchrun exports ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init()`` reads them
and starts the default process group once: gloo on CPU, NCCL when the run's device is CUDA. A plain one-process
run (no ``WORLD_SIZE``) gets ``World(rank=0, size=1)`` and no process group, so callers need no special case.
Reference: https://pytorch.org/docs/stable/elastic/run.html (environment variables),
https://pytorch.org/docs/stable/distributed.html (backends).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kimi_lm.errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a torchrun-launched process (its environment names the world size)."""
    return "WORLD_SIZE" in os.environ


def init(device: str = "cpu") -> World:
    """Start (once) the default process group from torchrun's environment; one process -> World(0, 1)."""
    if not launched():
        return World(0, 1)
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise UsageError(f"torchrun environment incomplete or malformed ({exc}); expected integer RANK, WORLD_SIZE "
                         f"and LOCAL_RANK") from None
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank, size, local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print_main(*args, file=None, **kwargs) -> None:
    """print() on rank 0 only, so N ranks do not repeat every line."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, file=file or sys.stdout, **kwargs)
