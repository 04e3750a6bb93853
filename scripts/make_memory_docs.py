"""Regenerate docs/memory.md and docs/memory.png from kimi_lm.estimate (run after changing the estimator).

    python scripts/make_memory_docs.py [--out docs]

Every number on the page comes from ``kimi_lm.estimate``; the text around them only names the formulas.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

from kimi_lm.estimate import GIB, PREFILL_CHUNK, estimate, fmt_bytes, fmt_tokens, load_source
from kimi_lm.estimate_plot import plot
from kimi_lm.files import write_file
from kimi_lm.memory import tensors

CONTEXTS = [4 << 10, 128 << 10, 1 << 20]
QUANTS = ["bf16", "fp8", "mxfp4", "affine4"]
DEVICES = ["rtx-24gb", "a100-80gb", "h100-80gb", "h200-141gb", "b200-192gb", "mac-64gb", "mac-128gb", "mac-192gb",
           "mac-512gb", "ram-256gb", "ram-1tb", "8xh100", "8xh200", "8xb200"]


def gib(n: int) -> str:
    return f"{n / GIB:,.1f}"


def load_arch(model: str) -> SimpleNamespace:
    """The sizes the page quotes: ``Estimate.arch`` with KDA / MLA layer counts."""
    a = SimpleNamespace(**estimate(model, devices=[]).arch)
    a.n_kda = len(a.kda_layers)
    a.n_mla = a.num_layers - a.n_kda
    return a


def params_section(model: str) -> list[str]:
    a = load_arch(model)
    e = estimate(model, devices=[])
    d, k, E, I = a.hidden_size, a.experts_per_token, a.experts, a.moe_intermediate_size
    w = getattr(load_source(model).config, "expert_hidden_size", d)  # K3's routed experts work in a latent
    n_moe = len(a.moe_layers)
    idle = n_moe * (E - k) * 3 * I * w
    rows = ["| component | parameters | how |", "|---|---:|---|"]
    how = {
        "embeddings": f"vocab {a.vocab_size:,} × hidden {d:,}",
        "kda": f"{a.n_kda} layers × {e.params_by_component['kda'] // max(a.n_kda, 1):,} (q/k/v/o projections, "
               f"convs, gates, A_log, dt_bias, o_norm)",
        "mla": f"{a.n_mla} layers × {e.params_by_component['mla'] // max(a.n_mla, 1):,} (q"
               + (" LoRA down/up + norm" if a.q_lora_rank else "") + ", kv_a, kv_a norm, kv_b, o projections)",
        "dense_mlp": f"{a.num_layers - n_moe} layer(s) × 3 × {a.intermediate_size:,} × {d:,}",
        "router": f"{n_moe} layers × ({E} × {d:,} gate + {E} correction bias)",
        "shared_experts": f"{n_moe} layers × {a.shared_experts} × 3 × {I:,} × {d:,}",
        "experts": f"{n_moe} layers × {E} experts × 3 × {I:,} × {w:,}",
        "latent_moe": f"{n_moe} layers × (down + up projection {w:,} × {d:,} + latent norm {w:,})",
        "norms": f"2 per layer + final, × {d:,}",
        "attn_res": f"4 per layer + output mix, × {d:,} (pseudo-query and key norm of each depth-attention op)",
        "lm_head": f"vocab {a.vocab_size:,} × hidden {d:,} (not tied)",
    }
    rows += [f"| {c} | {n:,} | {how[c]} |" for c, n in e.params_by_component.items() if n]
    rows.append(f"| **total** | **{e.total_params:,}** | |")
    return rows + [
        "",
        f"**Active per token: {e.active_params:,}** = total − the routed experts a token does not use = "
        f"{e.total_params:,} − {n_moe} MoE layers × ({E} − {k}) experts × 3 × {I:,} × {w:,} "
        f"(= {idle:,}). Without the input embedding table (a lookup, not a matmul): "
        f"{e.active_params_no_embeddings:,}.",
    ]


def memory_table(model: str, contexts: list[int]) -> list[str]:
    head = "| weights | bytes/weight format | weights (GiB) | " + " | ".join(
        f"total at {fmt_tokens(T)} (GiB)" for T in contexts) + " |"
    rows = [head, "|---|---|---:|" + "---:|" * len(contexts)]
    for q in QUANTS:
        e = estimate(model, quant=q, context=contexts, devices=[])
        bits = {"bf16": "16 bits", "fp8": "8 bits + fp32 per 128×128 tile", "mxfp4": "4.25 bits (4 + E8M0/32)",
                "affine4": "4.5 bits (4 + bf16 scale & bias / 64)"}[q]
        rows.append(f"| {e.quant} | {bits} | {gib(e.weights_bytes)} | "
                    + " | ".join(gib(r["total_bytes"]) for r in e.per_context) + " |")
    return rows


def cache_lines(model: str) -> list[str]:
    e = estimate(model, context=CONTEXTS, devices=[])
    c = e.comparison
    rows = ["| context | this model | every layer MLA | plain MHA | saved vs all-MLA | saved vs MHA |",
            "|---|---:|---:|---:|---:|---:|"]
    for i, T in enumerate(CONTEXTS):
        rows.append(f"| {fmt_tokens(T)} | {fmt_bytes(c['this_model'][i])} | {fmt_bytes(c['all_mla'][i])} | "
                    f"{fmt_bytes(c['mha'][i])} | {c['saving_vs_all_mla'][i]:.1%} | {c['saving_vs_mha'][i]:.1%} |")
    return rows


def device_table(model: str) -> list[str]:
    """Longest context per device and format; the model's maximum when everything fits."""
    rows = ["| device (usable GiB) | " + " | ".join(QUANTS) + " |", "|---|" + "---:|" * len(QUANTS)]
    per_quant = [estimate(model, quant=q, context=4096, devices=DEVICES).devices for q in QUANTS]
    for name in DEVICES:
        d = per_quant[0][name]
        cells = []
        for dev in per_quant:
            mc = dev[name]["max_context"]
            cells.append("—" if mc == 0 else fmt_tokens(mc))
        rows.append(f"| {d['label']} ({d['usable_bytes'] / GIB:,.0f}) | " + " | ".join(cells) + " |")
    return rows


def k3_section() -> list[str]:
    from kimi_lm.memory import make_quant, tensor_bytes

    k3 = "kimi-k3"
    e, a = estimate(k3, devices=[]), load_arch(k3)
    mx, bf = make_quant("mxfp4"), make_quant("bf16")
    release = sum(tensor_bytes(t, mx if t.component == "experts" else bf, 2) for t in tensors(load_source(k3).config))
    return [
        "## Kimi K3",
        "",
        f"{a.num_layers} layers: {a.n_kda} KDA + {a.n_mla} MLA, MoE in {len(a.moe_layers)} ({a.experts} experts, "
        f"top-{a.experts_per_token}, {a.shared_experts} shared, routed experts in a "
        f"{load_source(k3).config.expert_hidden_size:,}-wide latent), Block AttnRes, hidden {a.hidden_size}, max "
        f"context {a.max_context:,}. The text model only (the vision tower is not counted); `A_log` is counted as "
        "stored, zero-padded to 128.",
        "",
        *params_section(k3),
        "",
        f"* KDA state, constant in context: **{fmt_bytes(e.kda_state_bytes)}** per sequence "
        f"({e.kda_state_bytes:,} bytes). MLA latent cache: {a.n_mla} layers × ({a.kv_lora_rank} + {a.qk_rope}) × 2 "
        f"bytes = **{e.mla_cache_bytes_per_token:,} bytes per token**.",
        f"* As released (routed experts MXFP4, everything else bf16, A_log / dt_bias / router bias fp32): "
        f"**{gib(release)} GiB** ({release / 1e12:.2f} TB) of weights.",
        "",
        "### Total memory (GiB)",
        "",
        *memory_table(k3, CONTEXTS),
        "",
        "The mxfp4 and affine4 rows quantize every linear layer (as `convert --quantize` would); the release keeps "
        "all but the routed experts in bf16 (line above).",
        "",
    ]


def page() -> str:
    kl, k2 = "kimi-linear-48b-a3b", "kimi-k2"
    e_kl, e_k2 = estimate(kl, devices=[]), estimate(k2, devices=[])
    a_kl, a_k2 = load_arch(kl), load_arch(k2)
    k2_scales = sum(math.ceil(t.shape[0] / 128) * math.ceil(t.shape[1] / 128) * t.count  # FP8 tiles
                    for t in tensors(load_source(k2).config) if t.kind == "linear")
    lines = [
        "# Memory: what fits where",
        "",
        "Generated by `python scripts/make_memory_docs.py` from `kimi_lm/estimate.py`; do not edit by hand. The same "
        "numbers for any config, quantization, context and batch: `kimi-lm estimate MODEL [--quant Q] [--context "
        "4k,128k,1M] [--batch B] [--json] [--plot FILE.png]`.",
        "",
        "GiB = 2³⁰ bytes; k = 1024 tokens, 1M = 1,048,576. Batch 1. Totals are weights + cache + the activation "
        f"peak of a {PREFILL_CHUNK}-token prefill chunk (an estimate: residual stream + the largest layer "
        "working set, or "
        "the chunk's logits). Weights, KDA state and MLA cache are exact.",
        "",
        "## Kimi-Linear-48B-A3B",
        "",
        f"{a_kl.num_layers} layers: {a_kl.n_kda} KDA + {a_kl.n_mla} MLA (3:1), MoE in {len(a_kl.moe_layers)} of them "
        f"({a_kl.experts} experts, top-{a_kl.experts_per_token}, {a_kl.shared_experts} shared), hidden "
        f"{a_kl.hidden_size}, max context {a_kl.max_context:,}. The total matches the official checkpoint "
        "(49,122,681,728 in 20,493 tensors, 91.50 GB in bf16).",
        "",
        *params_section(kl),
        "",
        "### State and cache per sequence",
        "",
        f"* KDA state, constant in context: {a_kl.n_kda} layers × ({a_kl.kda_heads} heads × {a_kl.kda_head_dim} × "
        f"{a_kl.kda_head_dim} fp32 recurrent state + 3 × {a_kl.kda_heads * a_kl.kda_head_dim} channels × "
        f"{a_kl.conv_kernel - 1} bf16 conv tail) = **{fmt_bytes(e_kl.kda_state_bytes)}** "
        f"({e_kl.kda_state_bytes:,} bytes).",
        f"* MLA latent cache: {a_kl.n_mla} layers × ({a_kl.kv_lora_rank} + {a_kl.qk_rope}) × 2 bytes = "
        f"**{e_kl.mla_cache_bytes_per_token:,} bytes per token** ({fmt_bytes(e_kl.mla_cache_bytes_per_token << 20)} "
        "per 1M tokens).",
        "",
        "Cache of this model against the same model with every layer MLA, and with plain multi-head attention in "
        "every layer (per-head K of 192 and V of 128, what the HF remote code's expanded cache holds):",
        "",
        *cache_lines(kl),
        "",
        f"Only {a_kl.n_mla} of {a_kl.num_layers} layers grow with context, so the saving against all-MLA tends to "
        f"1 − {a_kl.n_mla}/{a_kl.num_layers} = {1 - a_kl.n_mla / a_kl.num_layers:.1%} (the model page's \"~75 %\"); "
        "the constant KDA state lowers it at short contexts.",
        "",
        "### Total memory (GiB)",
        "",
        *memory_table(kl, CONTEXTS),
        "",
        "What stays unquantized: in FP8 the embeddings, lm_head, router, norms and KDA convs stay bf16; in the MLX "
        "formats the router is affine 8-bit (group 64) as mlx-lm's Kimi Linear predicate sets it, norms and convs "
        "stay bf16; A_log, dt_bias and e_score_correction_bias are fp32 everywhere.",
        "",
        "### Longest context that fits (batch 1)",
        "",
        *device_table(kl),
        "",
        f"1M is the model's maximum: on those devices every context fits. The MXFP4 weights are "
        f"{estimate(kl, quant='mxfp4', devices=[]).weights_bytes / 1e9:.1f} GB in decimal units (the mlx-community "
        "MXFP4 model card says \"roughly 26–29 GB\").",
        "",
        "![memory against context](memory.png)",
        "",
        "## Kimi K2 (Instruct)",
        "",
        f"{a_k2.num_layers} MLA layers (q-LoRA {a_k2.q_lora_rank}, {a_k2.heads} heads), MoE in "
        f"{len(a_k2.moe_layers)} ({a_k2.experts} experts, top-{a_k2.experts_per_token}, {a_k2.shared_experts} shared), "
        f"hidden {a_k2.hidden_size}, max context {a_k2.max_context:,}; shipped as FP8 blocks.",
        "",
        *params_section(k2),
        "",
        f"Against the published numbers: **\"1T total\"** is {e_k2.total_params / 1e12:.3f} T. The checkpoint "
        f"listing's 1,026,470,731,056 counts every stored element: {e_k2.total_params:,} weights + {k2_scales:,} "
        f"FP8 scales (one per 128×128 tile) + {a_k2.num_layers} × 56 `rotary_emb.inv_freq` values "
        f"= {e_k2.total_params + k2_scales + a_k2.num_layers * 56:,}. **\"32B activated\"** is "
        f"{e_k2.active_params / 1e9:.2f} B rounded down, embedding table and lm_head included "
        f"({e_k2.active_params_no_embeddings / 1e9:.2f} B without the embedding table). K2 has no multi-token "
        "prediction layer (`num_nextn_predict_layers` = 0), so nothing is left out on that account.",
        "",
        f"MLA cache: {a_k2.num_layers} layers × ({a_k2.kv_lora_rank} + {a_k2.qk_rope}) × 2 bytes = "
        f"**{e_k2.mla_cache_bytes_per_token:,} bytes per token**; no recurrent state.",
        "",
        "### Total memory (GiB)",
        "",
        *memory_table(k2, CONTEXTS),
        "",
        f"1M is beyond K2's maximum of {a_k2.max_context:,} tokens; shown for comparison. In FP8 (as shipped) the "
        "embeddings, lm_head, router and norms stay bf16; in MLX formats K2's router (not an nn.Linear in mlx-lm) "
        "stays bf16, embeddings and lm_head are quantized.",
        "",
        "### Longest context that fits (batch 1)",
        "",
        *device_table(k2),
        "",
        "128k is K2's maximum: on those devices every context fits.",
        "",
        *k3_section(),
        "## Assumptions",
        "",
        "* Usable memory: 90 % of a GPU (CUDA context, allocator), 75 % of Apple unified memory (the default GPU "
        "wired limit; `sudo sysctl iogpu.wired_limit_mb` raises it), 90 % of RAM. A node of 8 GPUs counts as one pool.",
        "* MLA prefill attention runs in a fused kernel (absorbed form or flash-style), so it never builds a "
        "tokens × context score "
        "matrix; the cache is the latent form (576 values per token and layer).",
        "* Given a checkpoint directory, the estimator reads its recorded quantization and sums the tensor bytes in "
        "its safetensors headers instead of computing them.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    out = Path(p.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "memory.md", page())
    plot("kimi-linear-48b-a3b", out / "memory.png", quant="mxfp4",
             devices=["rtx-24gb", "a100-40gb", "h100-80gb", "h200-141gb", "mac-64gb", "mac-128gb", "mac-512gb"])
    print(f"wrote {out / 'memory.md'} and {out / 'memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
