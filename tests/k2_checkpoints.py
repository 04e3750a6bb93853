"""Tiny random Kimi K2 / DeepSeek-V3 checkpoints for tests, written by the reference implementation itself.

``transformers.DeepseekV3ForCausalLM`` (5.23) builds and saves the model (its config keys, one file);
``to_official_layout`` rewrites that into the official Kimi K2 layout (``model_type`` kimi_k2, ``rope_scaling`` /
``rope_theta`` / ``torch_dtype`` keys, two shards + index, plus the tensors loaders must skip: an MTP layer and
``rotary_emb.inv_freq``); ``to_fp8_layout`` additionally block-quantizes every projection as the official FP8 release
does (embeddings, lm_head, norms and the router stay float).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from checkpoints import randomize_
from kimi_lm.config import FP8_BLOCK_CONFIG, KimiK2Config
from kimi_lm.quant.fp8_block import dequantize, quantize

# Projections the official FP8 release stores as fp8 blocks (spec §2.6).
FP8_WEIGHT = re.compile(r".*(_proj|_proj_with_mqa)\.weight$")


def hf_config(cfg: KimiK2Config):
    import transformers

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta,
                **{k: v for k, v in cfg.rope_scaling.items() if k != "type"}}
    return transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_group, topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace, norm_topk_prob=cfg.norm_topk_prob,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope, rope_interleave=cfg.rope_interleave, num_mtp_layers=0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def build_reference(cfg: KimiK2Config, seed: int = 0):
    """A transformers DeepseekV3ForCausalLM (fp32, eval) with random weights and a non-zero router bias."""
    import transformers

    torch.manual_seed(seed)
    # the bias is large enough that choosing by biased scores (and by group) differs from plain top-k
    return randomize_(transformers.DeepseekV3ForCausalLM(hf_config(cfg)).eval())


def to_official_layout(src: Path, dst: Path, tensors: dict | None = None, quantization: dict | None = None) -> Path:
    """transformers-written ``src`` -> official K2 layout in ``dst``: 2 shards + index, MTP layer, inv_freq."""
    dst.mkdir(parents=True, exist_ok=True)
    raw = json.loads((src / "config.json").read_text())
    cfg = KimiK2Config.from_dict(raw)
    official = cfg.to_dict()
    official.update(model_type="kimi_k2", num_nextn_predict_layers=1)
    if quantization is not None:
        official["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(official, indent=2))
    tensors = dict(load_file(src / "model.safetensors") if tensors is None else tensors)
    n, h = cfg.num_hidden_layers, cfg.hidden_size
    for i in range(n):  # what official shards carry and loaders ignore
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg.qk_rope_head_dim // 2)
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.randn(h, 2 * h)  # MTP module (DeepSeek-V3 layer 61)
    tensors[f"model.layers.{n}.enorm.weight"] = torch.ones(h)
    names = sorted(tensors)
    weight_map = {}
    for s in range(2):
        shard = f"model-{s + 1:05d}-of-00002.safetensors"
        part = {k: tensors[k].contiguous() for k in names[s::2]}
        save_file(part, dst / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return dst


def fp8_tensors(src: Path) -> tuple[dict, dict]:
    """(checkpoint tensors with every projection block-quantized, the dequantized fp32 state of the same model)."""
    tensors, dequantized = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if FP8_WEIGHT.fullmatch(name):
            q, s = quantize(t)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            dequantized[name] = dequantize(q, s)
        else:
            tensors[name] = dequantized[name] = t
    return tensors, dequantized


def to_fp8_layout(src: Path, dst: Path) -> tuple[Path, dict]:
    tensors, dequantized = fp8_tensors(src)
    return to_official_layout(src, dst, tensors, dict(FP8_BLOCK_CONFIG)), dequantized



def write_random_fp8_checkpoint(cfg: KimiK2Config, dst: Path, n_shards: int = 2) -> Path:
    """An FP8 release-style checkpoint of random weights for ``cfg`` (no reference model: for memory tests)."""
    from kimi_lm.model.kimi_k2 import KimiK2ForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in KimiK2ForCausalLM(cfg).state_dict().items()}
    torch.manual_seed(0)
    tensors = {}

    def add_fp8(name, shape):
        tensors[name], tensors[name + "_scale_inv"] = quantize(torch.randn(shape) * 0.02)

    for name, shape in shapes.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):  # official per-expert names
            for e in range(shape[0]):
                add_fp8(f"{base}.{e}.gate_proj.weight", (shape[1] // 2, shape[2]))
                add_fp8(f"{base}.{e}.up_proj.weight", (shape[1] // 2, shape[2]))
        elif name.endswith("experts.down_proj"):
            for e in range(shape[0]):
                add_fp8(f"{base}.{e}.down_proj.weight", shape[1:])
        elif FP8_WEIGHT.fullmatch(name) and name != "lm_head.weight":
            add_fp8(name, shape)
        else:  # embeddings, lm_head, norms, router: bf16 (the router bias fp32), as in the release
            tensors[name] = torch.randn(shape).to(torch.float32 if "bias" in name else torch.bfloat16)
    return write_sharded(dst, cfg.to_dict(), tensors, n_shards)


def write_sharded(dst: Path, config: dict, tensors: dict, n_shards: int) -> Path:
    """config.json, ``tensors`` dealt round-robin (by name) into ``n_shards`` safetensors files, and the index."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config))
    names, weight_map = sorted(tensors), {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names[i::n_shards]}, dst / shard)
        weight_map.update({k: shard for k in names[i::n_shards]})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst
