"""Prefill and cached-decode speed of kimi-lm vs transformers' CPU path, same weights, same process.

Config (``--config``): ``bench``, the preset of that name (8 layers 3:1 KDA:MLA, hidden 512, 16 experts top-4,
vocab 8192; ~66M parameters, ~29M active per token), where a decode step is dominated by per-op overhead; or
``real-layers``, Kimi-Linear-48B-A3B's own layer sizes (hidden 2304, 32 heads of 128, experts of 1024 top-8, dense
first layer) in 4 layers (3 KDA + 1 MLA) with 16 experts and vocab 32768 (723M parameters), where a decode step
streams what the real model's layers stream and memory bandwidth decides. Both models are loaded from one
checkpoint directory written by transformers. For each
dtype: prefill ``--prompt`` tokens, then ``--decode`` single-token steps with the cache. Reports the best of
``--repeats`` runs and the speed ratio kimi-lm / transformers, plus the max relative logit difference.

Decode roofline: a decode step must stream the weights it uses (every weight but the embedding table, the shared
experts and top-k of the routed ones: the active parameters) plus the recurrent state and caches it reads and
writes (each KDA layer's fp32 state read and written; each MLA layer's latent cache read, at the prompt's length).
``copy bandwidth`` is measured here, the best of several ``dst.copy_(src)`` of 512 MiB (bytes read per second) on
the same threads; roofline tok/s = bandwidth / bytes per step, and the fraction of it each run reaches is printed.

Prints a table, then one JSON line.

    python benchmarks/bench_kimi_linear.py [--config bench] [--prompt 1024] [--decode 32] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kimi_lm  # noqa: E402
from checkpoints import build_reference, save_reference  # noqa: E402
from kimi_lm.config import KimiLinearConfig, preset  # noqa: E402


def run_ours(model, prompt, steps):
    def prefill():
        cache = model.make_cache(batch_size=prompt.shape[0])
        return model(prompt, cache=cache), cache

    def decode(cache):
        logits = None
        for t in range(steps.shape[1]):
            logits = model(steps[:, t : t + 1], cache=cache)
        return logits

    return prefill, decode


def run_transformers(model, prompt, steps):
    from transformers import DynamicCache

    def prefill():
        cache = DynamicCache(config=model.config)
        out = model(prompt, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    def decode(cache):
        logits = None
        for t in range(steps.shape[1]):
            logits = model(steps[:, t : t + 1], past_key_values=cache, use_cache=True).logits
        return logits

    return prefill, decode


def measure(ours, theirs, prompt, steps, repeats):
    """Best-of-``repeats`` prefill and decode times for both, interleaved so that load from other processes on a
    shared machine hits both implementations alike. Returns {name: (t_prefill, t_decode, prefill logits)}."""
    runners = {"ours": run_ours(ours, prompt, steps), "transformers": run_transformers(theirs, prompt, steps)}
    best = {name: [float("inf"), float("inf"), None] for name in runners}
    for _ in range(repeats):
        for name, (prefill, decode) in runners.items():
            t0 = time.perf_counter()
            logits, cache = prefill()
            t1 = time.perf_counter()
            decode(cache)
            t2 = time.perf_counter()
            b = best[name]
            b[0], b[1], b[2] = min(b[0], t1 - t0), min(b[1], t2 - t1), logits
    return best


def error_stats(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """(max, median) over positions of max |Δ| / max |reference|, and the top-1 agreement, for batch row 0."""
    a, b = logits.float()[0], reference.float()[0]
    per_pos = (a - b).abs().amax(-1) / b.abs().amax(-1)
    return per_pos.max().item(), per_pos.median().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def decode_bytes(ref, cfg: KimiLinearConfig, dtype: torch.dtype, history: int) -> int:
    """Bytes one batch-1 decode step at ``history`` cached tokens must stream (see the module docstring): active
    weights at ``dtype``, the KDA states (fp32, read and written) and the MLA latent caches (read)."""
    size = torch.empty(0, dtype=dtype).element_size()
    weights = 0
    for name, p in ref.named_parameters():
        if "embed_tokens" in name:
            continue  # one row of it per token
        share = cfg.num_experts_per_token / cfg.num_experts if ".experts." in name else 1.0
        weights += int(p.numel() * share) * size
    lac = cfg.linear_attn_config
    kda_state = len(lac["kda_layers"]) * lac["num_heads"] * lac["head_dim"] ** 2 * 4 * 2
    mla_cache = len(lac["full_attn_layers"]) * history * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    return weights + kda_state + mla_cache


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second a ``copy_`` of ``nbytes`` reads (best of ``repeats``, pages touched first), on torch's
    threads: the decode roofline's bandwidth here and in bench_llama_cpp.py (half of STREAM's "copy" figure, which
    counts the writes too)."""
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    dst.copy_(src)  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def real_layers_config() -> KimiLinearConfig:
    """Kimi-Linear-48B-A3B's layer dimensions in 4 layers (3 KDA + 1 MLA, dense first), 16 experts, vocab 32768."""
    base = preset("kimi-linear-48b-a3b")
    lac = dict(base.linear_attn_config, kda_layers=[1, 2, 3], full_attn_layers=[4])
    return dataclasses.replace(base, num_hidden_layers=4, linear_attn_config=lac, num_experts=16, vocab_size=32768,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["bench", "real-layers"], default="bench")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = preset("bench") if args.config == "bench" else real_layers_config()
    ref = build_reference(cfg)
    n_params = sum(p.numel() for p in ref.parameters())
    # removed when the script ends (the checkpoint is up to 2.7 GB with --config real-layers)
    tmp_dir = tempfile.TemporaryDirectory(prefix="kimi-bench-")
    tmp = Path(tmp_dir.name)
    save_reference(ref, tmp)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g)
    steps = torch.randint(0, cfg.vocab_size, (1, args.decode), generator=g)

    with torch.inference_mode():
        reference = ref(prompt).logits  # fp32, before any cast
    bandwidth = copy_bandwidth()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours = kimi_lm.load(tmp, dtype=dtype)
        theirs = ref.to(dtype)
        with torch.inference_mode():
            best = measure(ours, theirs, prompt, steps, args.repeats)
        (o_pre, o_dec, o_logits), (t_pre, t_dec, t_logits) = best["ours"], best["transformers"]
        # Both against transformers in fp32 (the exact reference). Per position: max |Δ| / max |logit|. The max
        # over positions is dominated by MoE routing ties that one rounding flips (random weights make near-ties
        # common), so the median and the top-1 agreement are shown too.
        ours_err, theirs_err = error_stats(o_logits, reference), error_stats(t_logits, reference)
        step_bytes = decode_bytes(ref, cfg, dtype, args.prompt + args.decode // 2)
        rows.append({
            "decode_bytes_per_step": step_bytes, "roofline_tok_s": bandwidth / step_bytes,
            "roofline_fraction": args.decode / o_dec / (bandwidth / step_bytes),
            "dtype": dtype_name,
            "prefill_tok_s": args.prompt / o_pre, "prefill_tok_s_transformers": args.prompt / t_pre,
            "prefill_speedup": t_pre / o_pre,
            "decode_tok_s": args.decode / o_dec, "decode_tok_s_transformers": args.decode / t_dec,
            "decode_speedup": t_dec / o_dec,
            "max_rel_logit_diff": ours_err[0], "median_rel_logit_diff": ours_err[1], "top1_agreement": ours_err[2],
            "transformers_median_rel_logit_diff": theirs_err[1], "transformers_top1_agreement": theirs_err[2],
        })
        del ours

    print(f"{args.config} config: {n_params / 1e6:.1f}M parameters, prompt {args.prompt}, decode {args.decode}, "
          f"{args.threads} threads, best of {args.repeats}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'dtype':<9} {'prefill tok/s':>14} {'(tf)':>9} {'ratio':>6}   {'decode tok/s':>12} {'(tf)':>8} {'ratio':>6}"
          f"   {'vs fp32 reference: Δ max / median, top-1 (transformers: median, top-1)'}")
    for r in rows:
        print(f"{r['dtype']:<9} {r['prefill_tok_s']:>14.1f} {r['prefill_tok_s_transformers']:>9.1f} "
              f"{r['prefill_speedup']:>5.2f}x   {r['decode_tok_s']:>12.1f} {r['decode_tok_s_transformers']:>8.1f} "
              f"{r['decode_speedup']:>5.2f}x   {r['max_rel_logit_diff']:.1e} / {r['median_rel_logit_diff']:.1e}, "
              f"{r['top1_agreement']:.1%}  ({r['transformers_median_rel_logit_diff']:.1e}, "
              f"{r['transformers_top1_agreement']:.1%})")
    for r in rows:
        print(f"{r['dtype']:<9} decode roofline: {r['decode_bytes_per_step'] / 2**20:.1f} MiB per step -> "
              f"{r['roofline_tok_s']:.0f} tok/s; kimi-lm at {r['roofline_fraction']:.0%} of it")
    print(json.dumps({"benchmark": "kimi_linear_cpu_vs_transformers", "config": args.config, "params": n_params,
                      "copy_bandwidth_gb_s": bandwidth / 1e9, "prompt": args.prompt, "decode": args.decode, "threads": args.threads, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
