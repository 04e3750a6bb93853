"""Kimi K2 / DeepSeek-V3: MLA with q-LoRA and YaRN RoPE in every layer, a dense first FFN, then MoE FFNs.

    h = embed(ids)
    for each layer i:  h = h + MLA_i(RMSNorm(h));  h = h + FFN_i(RMSNorm(h))
        MLA_i: c_q = RMSNorm(q_a_proj(x)), q = q_b_proj(c_q); [ĉ | k_pe] = kv_a_proj_with_mqa(x) (ĉ normed);
               q_pe, k_pe rotated (interleaved pairs, YaRN), softmax scale 1/sqrt(192) · mscale²
        FFN_i = SwiGLU MLP if i < first_k_dense_replace (or off the moe_layer_freq grid)
                else Σ_top-k w_e · Expert_e(x) + SharedExpert(x)  (sigmoid router, selection-only bias, group-limited)
    logits = lm_head(RMSNorm(h))

Kimi K2 is this architecture with ``model_type`` ``kimi_k2`` (384 experts, 64 heads, one dense layer, n_group 1).
Module and parameter names follow the checkpoints (``model.layers.N.self_attn.*``, ``model.layers.N.mlp.*``); the
per-expert matrices are stacked on load (the name table, ``kimi_lm.names``). FP8 checkpoints load with their projections
swapped for ``kimi_lm.quant.fp8_block`` modules; this file knows nothing about it.

Notable features: absorbed MLA decode over a 576-wide cache of [latent | rotated k_pe]; grouped expert dispatch
shared with Kimi Linear; ``make_cache`` returning per-layer state objects that report ``nbytes``.
Plain PyTorch, single device: the CPU backend (``kimi_lm.cpu.prepare``) and quantization swap modules from outside.

References: DeepSeek-V3 technical report and ``inference/model.py``; transformers ``modeling_deepseek_v3.py`` (the
parity oracle in tests/test_kimi_k2.py); spec ``shared/specs/kimi_k2_and_quantization.md`` §1–§3.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.config import KimiK2Config
from kimi_lm.model.causal_lm import CausalLM
from kimi_lm.model.layers import MLP, RMSNorm
from kimi_lm.model.mla import MultiheadLatentAttention
from kimi_lm.model.moe import SparseMoE
from kimi_lm.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: KimiK2Config, layer_idx: int, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiheadLatentAttention(config, rope)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = SparseMoE(
                config.hidden_size, config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                config.n_shared_experts, config.n_group, config.topk_group, config.norm_topk_prob,
                config.routed_scaling_factor,
            )
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, D] at absolute ``positions`` [B or 1, T] (rotary MLA needs them) -> [B, T, D]."""
        h = h + self.self_attn(self.input_layernorm(h), cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class KimiK2Model(nn.Module):
    def __init__(self, config: KimiK2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rope = RotaryEmbedding.from_config(config)  # one frequency table, shared by every layer
        self.layers = nn.ModuleList(DecoderLayer(config, i, rope) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class KimiK2ForCausalLM(CausalLM):
    def __init__(self, config: KimiK2Config):
        super().__init__(config, KimiK2Model(config))
