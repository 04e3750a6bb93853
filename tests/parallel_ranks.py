"""One rank of the split-model checks in test_parallel.py, launched by ``torchrun --standalone --nproc-per-node 2``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/parallel_ranks.py OUT CKPT:TP:EP ... \
        [-- GENERATE ARGS]

For each CKPT:TP:EP job: load this rank's slices (``kimi_lm.distributed.load``) in fp32, then (1) logits of IDS in one forward,
(2) a cached run: prefill IDS[:PREFILL], then GREEDY steps feeding each argmax back. Rank 0 writes the logits and
tokens to ``OUT/JOB.safetensors``; every rank writes its resident parameter and cache bytes to ``OUT/JOB.rankR.json``.
Then, after ``--``, ``kimi-lm generate ARGS`` runs in the same process group (it prints on rank 0 only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

PREFILL, GREEDY = 7, 6


def ids_for(vocab: int) -> torch.Tensor:
    return (torch.arange(11) * 37 + 5)[None] % vocab  # [1, 11]


def resident_bytes(model) -> int:
    """Bytes of this rank's distinct parameters and buffers (a tied lm_head counted once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def run(out: Path, job: str) -> None:
    from kimi_lm.distributed.load import load_sharded
    from kimi_lm.distributed.parallel import Plan

    ckpt, tp, ep = job.rsplit(":", 2)
    rank = dist.get_rank()
    model = load_sharded(ckpt, Plan(int(tp), int(ep), rank), dtype=torch.float32)
    ids = ids_for(model.config.vocab_size)
    with torch.no_grad():
        full = model(ids.clone())
        cache = model.make_cache(1)
        logits = model(ids[:, :PREFILL].clone(), cache=cache)[:, -1]
        tokens, steps = [], [logits]
        for _ in range(GREEDY):
            tokens.append(int(logits.argmax(-1)))
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1]
            steps.append(logits)
    name = f"{Path(ckpt).name}-tp{tp}-ep{ep}"
    if rank == 0:
        save_file({"full": full.contiguous(), "steps": torch.cat(steps).contiguous(),
                   "tokens": torch.tensor(tokens)}, out / f"{name}.safetensors")
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(
        {"param_bytes": resident_bytes(model), "cache_bytes": cache.nbytes}))


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    jobs, generate = (argv[1:], None) if "--" not in argv else (argv[1 : argv.index("--")], argv[argv.index("--") + 1 :])
    try:
        for job in jobs:
            run(Path(argv[0]), job)
        if generate is not None:
            from kimi_lm import cli

            assert cli.main(["generate", *generate]) == 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
