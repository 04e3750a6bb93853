"""Decode speed and weight memory of an MLX-quantized Kimi Linear (4-bit, kept packed) vs the same model in bf16.

    python benchmarks/bench_quant_decode.py [--preset bench] [--mode mxfp4|affine] [--tokens 32]

Random weights, the ``bench`` preset (8 layers, 16 experts). The quantized copy is made with mlx-lm's kimi_linear
policy (every Linear / Embedding / expert stack whose input width divides the group; router at affine 8-bit g64) by
``quant.packed.swap_modules(pack=True)``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from kimi_lm.cache import ModelCache
from kimi_lm.config import preset
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.model.moe import StackedExperts, TopkRouter
from kimi_lm.quant.packed import QuantSpec, swap_modules


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


def decode_tok_s(model, tokens: int, dtype) -> float:
    # the cache is built here, not by model.make_cache(): that reads the dtype off lm_head.weight, uint32 when packed
    cache = ModelCache([layer.self_attn.make_cache(1, dtype, "cpu") for layer in model.model.layers], 1)
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
    p.add_argument("--mode", choices=["mxfp4", "affine"], default="mxfp4")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    dense = KimiLinearForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for prm in dense.parameters():
        prm.normal_(0, 0.02)
    spec = QuantSpec("mxfp4", 4, 32) if args.mode == "mxfp4" else QuantSpec("affine", 4, 64)
    packed = copy.deepcopy(dense)
    swap_modules(packed, mlx_policy(packed, spec), pack=True, dtype=torch.bfloat16)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    rows = []
    for name, model in (("bf16", dense), (f"{args.mode} 4-bit", packed)):
        rows.append((name, nbytes(model) / 2**20, decode_tok_s(model, args.tokens, torch.bfloat16)))
    print(f"{'weights':<14}{'MiB':>10}{'decode tok/s':>14}")
    for name, mib, tps in rows:
        print(f"{name:<14}{mib:>10.1f}{tps:>14.1f}")
    print(json.dumps({"preset": args.preset, "mode": args.mode, "bf16_mib": round(rows[0][1], 1),
                      "quant_mib": round(rows[1][1], 1), "bf16_tok_s": round(rows[0][2], 2),
                      "quant_tok_s": round(rows[1][2], 2), "speedup": round(rows[1][2] / rows[0][2], 3)}))


if __name__ == "__main__":
    main()
