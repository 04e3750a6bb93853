"""``--tp N`` / ``--ep N`` on the command line: checks, process group, this rank's model; rank 0 alone talks.

    torchrun --nproc-per-node 2 -m kimi_lm generate --model DIR --tp 2 --prompt "..."

``kimi_lm.cli_args`` adds the flags (``add_parallel_args``) to ``generate`` and ``serve`` and hands loading here when
they ask for more than one process, or when torchrun started several. What this module guarantees:

* bad input fails before any weight is read, with one line naming the flag: ``--tp`` / ``--ep`` below 1, both above
  1 but different, no torchrun (or a world size other than the split), a model whose heads / experts / intermediate
  sizes the value does not divide (``parallel.check``), a split that would cut FP8 blocks or packed quantization
  groups (``parallel.check_blocks`` / ``check_groups``), and torchrun around a command that runs in one process
  (``chat``, ``cache-prompt``);
* every rank samples alike: rank 0's seed is broadcast and seeds every rank's generator, the logits are identical
  on every rank after the all-reduces, and the model broadcasts rank 0's tokens before each forward anyway;
* ``serve`` runs its scheduler in lockstep on every rank and HTTP on rank 0 (``kimi_lm.distributed.serve``);
* only rank 0 prints: the other ranks' stdout and stderr go to /dev/null (their failures still end the run:
  torchrun reports each failed rank's exit code).

Reference: torchrun's environment (``kimi_lm.distributed.runtime``); mlx-lm's ``mlx.launch`` / ``pipeline_generate``
(rank 0 prints, the others follow).
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import sys

import torch
import torch.distributed as dist

from kimi_lm.distributed import runtime
from kimi_lm.errors import UsageError

COMMANDS = ("kimi-lm generate", "kimi-lm serve")  # commands that run split; the others refuse --tp / --ep > 1


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor parallel: split attention heads and dense products over "
                   "this many processes started by torchrun (--nproc-per-node N)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel: split the routed experts over this many "
                   "processes started by torchrun (with --tp: equal to it)")
    p.set_defaults(parallel_command=p.prog)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if runtime.launched() else 1


def wanted(args) -> bool:
    """True when the command line asks for a split run, or torchrun started more than one process."""
    return getattr(args, "tp", 1) != 1 or getattr(args, "ep", 1) != 1 or world_size() > 1


def check_args(args) -> tuple[int, int]:
    """(tp, ep) once every check that needs no model has passed; UsageError naming the flag otherwise."""
    tp, ep = getattr(args, "tp", 1), getattr(args, "ep", 1)
    command = getattr(args, "parallel_command", None)
    for flag, value in (("--tp", tp), ("--ep", ep)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    n, world = max(tp, ep), world_size()
    if command not in COMMANDS:
        name = command or "this command"
        raise UsageError(f"{name} runs in one process: --tp / --ep and torchrun are supported by `kimi-lm generate` "
                         f"and `kimi-lm serve` (got --tp {tp} --ep {ep}, {world} process(es))")
    if "-" in (getattr(args, "prompt", None), getattr(args, "prompt_file", None)):
        raise UsageError("a split run reads the prompt on every rank: give it with --prompt TEXT or --prompt-file FILE, "
                         "not stdin ('-')")
    if getattr(args, "prompt_cache_file", None):
        raise UsageError("--prompt-cache-file holds one process's whole state; it cannot continue a split run "
                         "(--tp / --ep): drop one or the other")
    if tp > 1 and ep > 1 and tp != ep:
        raise UsageError(f"--tp {tp} --ep {ep}: combined, the two must be equal (they split the same processes: "
                         f"attention and dense products by head, routed experts by expert)")
    if not runtime.launched():
        raise UsageError(f"--tp {tp} --ep {ep} needs {n} processes started by torchrun: "
                         f"torchrun --nproc-per-node {n} -m kimi_lm {command.removeprefix('kimi-lm ')} ... --tp {tp} "
                         f"--ep {ep}")
    if world != n:
        hint = f"--tp {world} or --ep {world}" if n == 1 else f"torchrun --nproc-per-node {n}"
        raise UsageError(f"torchrun started {world} processes but --tp {tp} --ep {ep} splits the model {n} way(s); "
                         f"use {hint}")
    return tp, ep


def quiet_other_ranks() -> None:
    """Rank 0 prints; the others' stdout and stderr go to /dev/null (set before anything could print)."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def shared_seed(seed: int | None, device=None) -> int:
    """Rank 0's seed (``seed``, or a fresh one) on every rank, which seeds torch's default generator there: samplers
    without a seed of their own then draw the same numbers on every rank. ``device``: the run's (NCCL sends CUDA
    tensors only)."""
    t = torch.tensor([seed if seed is not None else random.SystemRandom().randrange(2**62)], dtype=torch.int64,
                     device=device)
    dist.broadcast(t, src=0)
    torch.manual_seed(int(t))
    return int(t)


def load_parallel(args):
    """(this rank's split model, tokenizer) for a split run of ``args`` (``--model``, ``--dtype``, ``--device``,
    ``--tp``, ``--ep``, ``--seed``)."""
    from kimi_lm.distributed.load import load_sharded
    from kimi_lm.distributed.parallel import Plan
    from kimi_lm.hub import resolve
    from kimi_lm.tokenizer import load_tokenizer

    if runtime.launched():
        quiet_other_ranks()
    tp, ep = check_args(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index)
    world = runtime.init(device.type)
    atexit.register(runtime.shutdown)
    if not world.is_main:  # rank 0 downloads a Hub model (and asks first); the others find it in the cache
        dist.barrier()
    path = resolve(args.model, confirm=not args.yes)
    if world.is_main:
        dist.barrier()
    tokenizer = load_tokenizer(path, getattr(args, "chat_template", None))
    model = load_sharded(path, Plan(tp, ep, world.rank), dtype=args.dtype, device=device)
    shared_seed(getattr(args, "seed", None), device)
    return model, tokenizer
