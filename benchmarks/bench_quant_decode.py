"""Decode and prefill speed of MLX-quantized Kimi Linear models (kept packed) vs the same model in bf16, all prepared
by the CPU backend as ``kimi_lm.load`` prepares them.

    python benchmarks/bench_quant_decode.py [--config bench|real-layers] [--modes mxfp4,affine4,...] [--tokens 32]

Random weights; ``--config`` as in bench_kimi_linear.py (``bench``: 8 layers, hidden 512, 16 experts top-4;
``real-layers``: Kimi-Linear-48B's layer sizes in 4 layers). Each quantized copy is made with mlx-lm's kimi_linear
policy (every Linear / Embedding / expert stack whose input width divides the group; router at affine 8-bit g64) by
``quant.packed.swap_modules(pack=True)``, then ``kimi_lm.cpu.prepare``. Modes: mxfp4, nvfp4, mxfp8, affine<bits>
(group 64; affine4 on quant.c), affine4-int4 (affine 4-bit on PyTorch's int4 kernel). Models are measured in
interleaved rounds (best of ``--repeats``): load from other processes hits every model alike. ``ops/step``: the
PyTorch ops one decode step runs (per-op overhead; the C calls are not counted). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kimi_lm import cpu
from kimi_lm.config import preset
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.model.moe import StackedExperts, TopkRouter
from kimi_lm.quant.packed import QuantSpec, swap_modules, use_int4_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kimi_linear import real_layers_config  # noqa: E402


def mlx_policy(model, spec: QuantSpec) -> dict:
    """mlx-lm's quant_predicate for kimi_linear, as packed-module keys -> spec."""
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, TopkRouter):
            specs[name] = QuantSpec("affine", 8, 64)
        elif isinstance(m, StackedExperts):
            if m.gate_up_proj.shape[-1] % spec.group_size == 0 and m.down_proj.shape[-1] % spec.group_size == 0:
                specs[f"{name}.gate_up_proj"] = specs[f"{name}.down_proj"] = spec
        elif isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.shape[-1] % spec.group_size == 0:
            specs[name] = spec
    return specs


def spec_of(mode: str) -> QuantSpec:
    if mode in ("mxfp4", "mxfp8", "nvfp4"):
        return QuantSpec(mode, 8 if mode == "mxfp8" else 4, 16 if mode == "nvfp4" else 32)
    return QuantSpec("affine", int(mode.removeprefix("affine").removesuffix("-int4")), 64)


class _CountOps(TorchDispatchMode):
    """Counts the PyTorch ops (aten calls) run under it: a decode step's per-op overhead, the C calls not counted."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(model, prompt: torch.Tensor) -> int:
    """aten ops of one cached decode step after a short prompt."""
    with torch.inference_mode():
        cache = model.make_cache(1)
        model(prompt[:, :16], cache)
        with _CountOps() as counter:
            model(torch.tensor([[1]]), cache)
    return counter.ops


def speeds(model, prompt: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(prefill tok/s of the prompt, decode tok/s of ``tokens`` steps after it)."""
    ids = torch.tensor([[1]])
    with torch.inference_mode():
        cache = model.make_cache(1)
        t0 = time.perf_counter()
        model(prompt, cache)
        prefill = prompt.shape[1] / (time.perf_counter() - t0)
        for _ in range(2):
            model(ids, cache)
        t0 = time.perf_counter()
        for _ in range(tokens):
            model(ids, cache)
        return prefill, tokens / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["bench", "real-layers"], default="bench")
    p.add_argument("--modes", default="mxfp4,affine4,affine4-int4,affine8,mxfp8,nvfp4")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = preset("bench") if args.config == "bench" else real_layers_config()
    dense = KimiLinearForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for prm in dense.parameters():
        prm.normal_(0, 0.02)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    models, int4_default = {}, cpu.INT4_KERNEL
    for mode in args.modes.split(","):
        packed = copy.deepcopy(dense)
        swap_modules(packed, mlx_policy(packed, spec_of(mode)), pack=True, dtype=torch.bfloat16)
        if mode.endswith("-int4"):
            use_int4_kernels(packed)
        cpu.INT4_KERNEL = mode.endswith("-int4")
        models[mode] = cpu.prepare(packed)
    cpu.INT4_KERNEL = int4_default
    sizes = {"bf16": nbytes(dense)} | {m: nbytes(model) for m, model in models.items()}
    models = {"bf16": cpu.prepare(dense)} | models
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt))
    best = {name: [0.0, 0.0] for name in models}
    for _ in range(args.repeats):  # interleaved, best of
        for name, model in models.items():
            best[name] = [max(a, b) for a, b in zip(best[name], speeds(model, prompt, args.tokens))]
    ops = {name: ops_per_step(model, prompt) for name, model in models.items()}
    bf_pre, bf_dec = best["bf16"]
    print(f"config {args.config}, {args.threads} threads, prompt {args.prompt}, {args.tokens} decode steps")
    print(f"{'weights':<14}{'MiB':>9}{'decode tok/s':>14}{'vs bf16':>9}{'prefill tok/s':>15}{'vs bf16':>9}"
          f"{'ops/step':>10}")
    rows = []
    for name, (pre, dec) in best.items():
        print(f"{name:<14}{sizes[name] / 2**20:>9.1f}{dec:>14.1f}{dec / bf_dec:>8.2f}x{pre:>15.0f}{pre / bf_pre:>8.2f}x"
              f"{ops[name]:>10}")
        rows.append({"mode": name, "mib": round(sizes[name] / 2**20, 1), "ops_per_step": ops[name],
                     "decode_tok_s": round(dec, 2),
                     "decode_vs_bf16": round(dec / bf_dec, 3), "prefill_tok_s": round(pre, 1),
                     "prefill_vs_bf16": round(pre / bf_pre, 3)})
    print(json.dumps({"benchmark": "quant_decode", "config": args.config, "threads": args.threads,
                      "prompt": args.prompt, "tokens": args.tokens, "models": rows}))


if __name__ == "__main__":
    main()
