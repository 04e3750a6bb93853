"""Decode speed and weight memory of MLX-quantized Kimi Linear models (4-bit, kept packed) vs the same model in bf16.

    python benchmarks/bench_quant_decode.py [--preset bench] [--modes affine,mxfp4] [--tokens 32]

Random weights, the ``bench`` preset (8 layers, 16 experts). Each quantized copy is made with mlx-lm's kimi_linear
policy (every Linear / Embedding / expert stack whose input width divides the group; router at affine 8-bit g64) by
``quant.packed.swap_modules(pack=True)``, then prepared as ``kimi_lm.load`` prepares it (affine 4-bit onto the CPU
int4 kernel). "affine" is mlx-lm's default 4-bit (group 64). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from kimi_lm.config import preset
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.model.moe import StackedExperts, TopkRouter
from kimi_lm.quant.packed import QuantSpec, swap_modules, use_int4_kernels


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


def decode_tok_s(model, tokens: int) -> float:
    cache = model.make_cache(1)
    ids = torch.tensor([[1]])
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 16)), cache)  # prefill
        for _ in range(3):
            model(ids, cache)
        t0 = time.perf_counter()
        for _ in range(tokens):
            model(ids, cache)
        return tokens / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--modes", default="affine,mxfp4", help="comma-separated: affine (4-bit g64), mxfp4")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    dense = KimiLinearForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for prm in dense.parameters():
        prm.normal_(0, 0.02)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    models = {"bf16": dense}
    for mode in args.modes.split(","):
        spec = QuantSpec("mxfp4", 4, 32) if mode == "mxfp4" else QuantSpec("affine", 4, 64)
        packed = copy.deepcopy(dense)
        swap_modules(packed, mlx_policy(packed, spec), pack=True, dtype=torch.bfloat16)
        use_int4_kernels(packed)
        models[f"{mode} 4-bit"] = packed
    best = dict.fromkeys(models, 0.0)
    for _ in range(args.repeats):  # interleaved, best of: load from other processes hits every model alike
        for name, model in models.items():
            best[name] = max(best[name], decode_tok_s(model, args.tokens))
    rows = [(name, nbytes(model) / 2**20, best[name]) for name, model in models.items()]
    print(f"{'weights':<14}{'MiB':>10}{'decode tok/s':>14}{'vs bf16':>9}")
    for name, mib, tps in rows:
        print(f"{name:<14}{mib:>10.1f}{tps:>14.1f}{tps / rows[0][2]:>8.2f}x")
    print(json.dumps({"preset": args.preset, "bf16_mib": round(rows[0][1], 1), "bf16_tok_s": round(rows[0][2], 2),
                      "quantized": [{"mode": n, "mib": round(m, 1), "tok_s": round(t, 2),
                                     "speedup": round(t / rows[0][2], 3)} for n, m, t in rows[1:]]}))

if __name__ == "__main__":
    main()
