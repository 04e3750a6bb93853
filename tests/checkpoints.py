"""Tiny random Kimi Linear checkpoints for tests, written by the reference implementation itself.

``transformers.KimiLinearForCausalLM`` (5.23) builds and saves the model, so the files have exactly the tensor names
and config keys transformers writes; ``to_official_layout`` rewrites such a directory into the official remote-code
layout (nested ``linear_attn_config`` config, dense layer 0 as ``mlp.*``, sharded with an index).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kimi_lm.config import KimiLinearConfig


def hf_config_kwargs(cfg: KimiLinearConfig) -> dict:
    """Our config -> keyword arguments of transformers' KimiLinearConfig."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_token,
        n_shared_experts=cfg.num_shared_experts, routed_scaling_factor=cfg.routed_scaling_factor,
        linear_head_dim=cfg.kda_head_dim, linear_num_heads=cfg.kda_num_heads,
        layer_types=["linear_attention" if cfg.is_kda_layer(i) else "full_attention" for i in range(cfg.num_hidden_layers)],
        mlp_layer_types=["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_hidden_layers)],
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        rms_norm_eps=cfg.rms_norm_eps,
    )


def build_reference(cfg: KimiLinearConfig, seed: int = 0):
    """A transformers KimiLinearForCausalLM (fp32, eval) with random weights and a non-zero router bias."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.KimiLinearConfig(**hf_config_kwargs(cfg))
    model = transformers.KimiLinearForCausalLM(hf_cfg).eval()
    return randomize_(model)


@torch.no_grad()
def randomize_(model, router_bias: float = 0.3):
    """Random weights in realistic ranges, in place, for any Kimi model (kimi-lm's or transformers'): KDA gates
    as fla initialises them (so the recurrent state matters), norms near 1, matrices scaled by 1/sqrt(fan-in), and a
    router correction bias large enough that choosing by biased scores differs from choosing by raw scores."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty_like(p).uniform_(1, 16).log())
        elif name.endswith("dt_bias"):
            p.copy_(torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1)))
        elif "norm" in name:
            p.copy_(1 + 0.1 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
        if router_bias and name.endswith("e_score_correction_bias"):
            b.copy_(router_bias * torch.randn_like(b))
    return model


def save_reference(model, out: Path) -> Path:
    """transformers layout: its own config.json keys, a single model.safetensors."""
    model.save_pretrained(out)
    return out


def to_official_layout(src: Path, dst: Path, n_shards: int = 3) -> Path:
    """Rewrite a transformers-written directory into the official remote-code layout, sharded with an index."""
    dst.mkdir(parents=True, exist_ok=True)
    raw = json.loads((src / "config.json").read_text())
    cfg = KimiLinearConfig.from_dict(raw)
    (dst / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tensors = load_file(src / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and not cfg.is_moe_layer(int(layer)):
            name = name.replace(".block_sparse_moe.", ".mlp.")
        renamed[name] = t
    names = sorted(renamed)
    weight_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: renamed[n].contiguous() for n in names[s::n_shards]}
        save_file(part, dst / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return dst
