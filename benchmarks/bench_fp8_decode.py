"""Decode speed of a Kimi K2-shaped model with FP8 block weights (the official release format) vs the same model in
bf16, all prepared by the CPU backend; and one FP8 product against the bf16 oneDNN product of the same size.

    python benchmarks/bench_fp8_decode.py [--config bench|wide] [--tokens 32] [--repeats 5] [--threads 2]

Random weights (normal, std 0.02). ``bench``: K2's layer structure (MLA with q-LoRA, sigmoid-routed MoE with a
shared expert, first layer dense) at the Kimi Linear bench sizes: 8 layers, hidden 512, 16 experts top-4 of 256;
``wide``: 4 layers, hidden 2048, 16 experts top-8 of 1024. The FP8 copy is made as the release stores it
(``fp8_block.quantize_modules(pack=True)``: every projection except the router and lm_head; embeddings, norms and
the router bf16), activations bf16. Models, measured in interleaved rounds (the box is shared: load from other
processes hits every model alike; the ratio of each round is reported, min..max):

    bf16        the bf16 model (oneDNN / C products)
    fp8         the FP8 model with kernels/fp8.c (CpuFP8BlockLinear, CpuFP8StackedExperts)
    fp8-plain   the FP8 model as prepared before fp8.c: FP8 modules plain (a tile dequantized per call, then BLAS),
                MLA's absorbed halves rebuilt from the fp8 kv_b per call

The product: y = x Wᵀ, W [2048, 7168] (one of K2's expert gate / up shapes), one row, rotated over copies whose
total exceeds the last-level cache (weights read from memory as in a decode step). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from kimi_lm import cpu
from kimi_lm.config import KimiK2Config
from kimi_lm.cpu import fp8
from kimi_lm.cpu.onednn import OneDNNLinear
from kimi_lm.model.kimi_k2 import KimiK2ForCausalLM
from kimi_lm.quant.fp8_block import FP8BlockLinear, quantize_modules


def config(name: str) -> KimiK2Config:
    common = dict(vocab_size=8192, max_position_embeddings=4096, kv_lora_rank=512, qk_nope_head_dim=128,
                  qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                  topk_group=1, num_nextn_predict_layers=0, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    if name == "bench":
        return KimiK2Config(num_hidden_layers=8, hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                            num_key_value_heads=4, q_lora_rank=256, n_routed_experts=16, num_experts_per_tok=4,
                            moe_intermediate_size=256, **common)
    return KimiK2Config(num_hidden_layers=4, hidden_size=2048, intermediate_size=4096, num_attention_heads=16,
                        num_key_value_heads=16, q_lora_rank=768, n_routed_experts=16, num_experts_per_tok=8,
                        moe_intermediate_size=1024, **common)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time: the box's other load left out)


def speeds(model, prompt: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(prefill tok/s of the prompt, decode tok/s of ``tokens`` cached steps after it; two warm-up steps)."""
    ids = torch.tensor([[1]])
    with torch.inference_mode():
        cache = model.make_cache(1)
        t0 = CLOCK()
        model(prompt, cache)
        prefill = prompt.shape[1] / (CLOCK() - t0)
        for _ in range(2):
            model(ids, cache)
        t0 = CLOCK()
        for _ in range(tokens):
            model(ids, cache)
        return prefill, tokens / (CLOCK() - t0)


def product_speeds(repeats: int, copies: int = 6) -> dict:
    """Median µs of one-row products 7168 -> 2048: fp8 (kernels/fp8.c), bf16 oneDNN, fp8 plain (dequantize + BLAS)."""
    torch.manual_seed(0)
    dense = [torch.nn.Linear(7168, 2048, bias=False).to(torch.bfloat16) for _ in range(copies)]
    plain = [FP8BlockLinear.from_float(d) for d in dense]
    mods = {"fp8": [fp8.CpuFP8BlockLinear(p) for p in plain], "bf16": [OneDNNLinear(d) for d in dense],
            "fp8-plain": plain}
    x = torch.randn(1, 7168).to(torch.bfloat16)
    times = {name: [] for name in mods}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, ms in mods.items():
                calls = 4 * copies if name != "fp8-plain" else copies
                t0 = CLOCK()
                for i in range(calls):
                    ms[i % copies](x)
                times[name].append((CLOCK() - t0) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["bench", "wide"], default="bench")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-product", action="store_true", help="skip the 7168 -> 2048 product comparison")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time (1 thread: robust to a loaded box; more: counts spinning threads)")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = config(args.config)
    dense = KimiK2ForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for prm in dense.parameters():
        prm.normal_(0, 0.02)
    quantized = copy.deepcopy(dense)
    quantize_modules(quantized, lambda name, m: name != "lm_head", pack=True)  # the router is no nn.Linear: kept
    before = copy.deepcopy(quantized)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    sizes = {"bf16": nbytes(dense), "fp8": nbytes(quantized), "fp8-plain": nbytes(quantized)}
    # what prepare did before fp8.c: FP8 modules kept plain, MLA with an fp8 kv_b rebuilding its absorbed halves per
    # call, an fp8 MLP plain
    saved = fp8.swap, fp8.fp8_mlp, cpu.FP8BlockLinear
    fp8.swap = lambda module, check_only=False: False if check_only else None
    fp8.fp8_mlp = lambda module: False
    cpu.FP8BlockLinear = type("NotSwapped", (), {})
    try:
        before = cpu.prepare(before)
    finally:
        fp8.swap, fp8.fp8_mlp, cpu.FP8BlockLinear = saved
    models = {"bf16": cpu.prepare(dense), "fp8": cpu.prepare(quantized), "fp8-plain": before}
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt))
    runs, prefills = {name: [] for name in models}, {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved rounds
        for name, model in models.items():
            steps = args.tokens if name != "fp8-plain" else max(4, args.tokens // 4)  # the plain one is ~10x slower
            prefill, decode = speeds(model, prompt, steps)
            runs[name].append(decode)
            prefills[name].append(prefill)
    ratios = {name: [r / b for r, b in zip(runs[name], runs["bf16"])] for name in models}
    print(f"K2-shaped config {args.config}, {args.threads} threads, prompt {args.prompt}, {args.tokens} decode steps, "
          f"{args.repeats} interleaved rounds, {args.clock} clock, fp8 path {fp8.path()}")
    print(f"{'weights':<11}{'MiB':>8}{'decode best':>12}{'median':>9}{'vs bf16 (median, min..max)':>30}"
          f"{'prefill best':>14}{'vs bf16':>9}")
    rows = []
    for name, decodes in runs.items():
        r = ratios[name]
        print(f"{name:<11}{sizes[name] / 2**20:>8.1f}{max(decodes):>12.1f}{statistics.median(decodes):>9.1f}"
              f"{statistics.median(r):>14.2f}x ({min(r):.2f}..{max(r):.2f})"
              f"{max(prefills[name]):>14.0f}{max(prefills[name]) / max(prefills['bf16']):>8.2f}x")
        rows.append({"weights": name, "mib": round(sizes[name] / 2**20, 1), "decode_tok_s_best": round(max(decodes), 2),
                     "decode_tok_s_median": round(statistics.median(decodes), 2),
                     "vs_bf16_median": round(statistics.median(r), 3), "vs_bf16_min": round(min(r), 3),
                     "vs_bf16_max": round(max(r), 3), "prefill_tok_s_best": round(max(prefills[name]), 1),
                     "prefill_vs_bf16": round(max(prefills[name]) / max(prefills["bf16"]), 3)})
    product = {} if args.no_product else product_speeds(args.repeats)
    if product:
        print("one row, 7168 -> 2048, median µs: " + ", ".join(f"{k} {v:.0f}" for k, v in product.items())
              + f"; fp8 / bf16 time {product['fp8'] / product['bf16']:.2f}")
    print(json.dumps({"benchmark": "fp8_decode", "config": args.config, "threads": args.threads, "clock": args.clock,
                      "prompt": args.prompt, "tokens": args.tokens, "path": fp8.path(), "models": rows,
                      "product_7168x2048_us": {k: round(v, 1) for k, v in product.items()}}))


if __name__ == "__main__":
    main()
