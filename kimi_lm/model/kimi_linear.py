"""Kimi Linear (Kimi-Linear-48B-A3B): a 3:1 hybrid of Kimi Delta Attention and NoPE MLA layers with an MoE FFN.

    h = embed(ids)                                                  # no positional encoding anywhere
    for each layer i:  h = h + Mixer_i(RMSNorm(h));  h = h + FFN_i(RMSNorm(h))
        Mixer_i = KDA if (i + 1) ∈ kda_layers else MLA;   FFN_i = dense SwiGLU if i < first_k_dense_replace else MoE
    logits = lm_head(RMSNorm(h))

With ``attn_res_block_size`` set (Block Attention Residuals, ``attnres.py``), each sublayer instead reads a softmax
over depth of the embedding, the completed block sums and the current partial sum, and a last such mix feeds the
final norm; without it the forward is the plain residual stream above, unchanged.

Module and parameter names follow the official checkpoint (``model.layers.N.self_attn.*``,
``model.layers.N.block_sparse_moe.*``, ``model.layers.0.mlp.*``); the few differences (stacked experts) are in the
name table (``kimi_lm.names``).

Notable features: chunked KDA prefill and recurrent decode in fp32; absorbed MLA decode over a 576-wide latent
cache; grouped expert dispatch; ``make_cache`` returning per-layer state objects that report ``nbytes``.
Plain PyTorch, single device: the CPU backend (``kimi_lm.cpu.prepare``) and quantization swap modules from outside.

Reference: spec ``shared/specs/kimi_linear.md`` §3–§6; transformers ``modeling_kimi_linear.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.cache import ModelCache
from kimi_lm.config import KimiLinearConfig
from kimi_lm.model.attnres import BlockAttnRes, block_size_in_sublayers, new_depth_attention
from kimi_lm.model.causal_lm import CausalLM
from kimi_lm.model.kda import KimiDeltaAttention
from kimi_lm.model.layers import MLP, RMSNorm
from kimi_lm.model.mla import MultiheadLatentAttention
from kimi_lm.model.moe import SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.is_kda = config.is_kda_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = KimiDeltaAttention(config) if self.is_kda else MultiheadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.block_sparse_moe = SparseMoE(
                config.hidden_size, config.num_experts, config.num_experts_per_token, config.moe_intermediate_size,
                config.num_shared_experts, config.num_expert_group, config.topk_group, config.moe_renormalize,
                config.routed_scaling_factor,
            )
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        if config.attn_res_block_size:  # Block AttnRes: one depth-attention op before each sublayer (K3 names)
            self.self_attention_res_proj, self.self_attention_res_norm = new_depth_attention(
                config.hidden_size, config.rms_norm_eps)
            self.mlp_res_proj, self.mlp_res_norm = new_depth_attention(config.hidden_size, config.rms_norm_eps)

    def attention(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        """The mixer sublayer f(h), pre-norm included."""
        return self.self_attn(self.input_layernorm(h), cache)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The FFN sublayer f(h), pre-norm included."""
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return ffn(self.post_attention_layernorm(h))

    def forward(self, h: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, D] -> [B, T, D]; ``positions`` unused: KDA and NoPE MLA encode no positions."""
        h = h + self.attention(h, cache)
        return h + self.feed_forward(h)


class KimiLinearModel(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_class: type[nn.Module] | None = None):
        """``layer_class``: the decoder layer (Kimi K3 passes its own); Kimi Linear's ``DecoderLayer`` by default."""
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layer_class = layer_class or DecoderLayer
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.attn_res_block_size:
            self.output_attn_res_proj, self.output_attn_res_norm = new_depth_attention(
                config.hidden_size, config.rms_norm_eps)


class KimiLinearForCausalLM(CausalLM):
    def __init__(self, config: KimiLinearConfig):
        super().__init__(config, KimiLinearModel(config))

    def decoder_stack(self, h: torch.Tensor, cache: ModelCache | None, positions: torch.Tensor) -> torch.Tensor:
        """The layers, or with Block AttnRes: embedding [B, T, D] -> input of the final norm [B, T, D]."""
        if not self.config.attn_res_block_size:
            return super().decoder_stack(h, cache, positions)
        state = BlockAttnRes(h, block_size_in_sublayers(self.config.attn_res_block_size), self.config.rms_norm_eps)
        for i, layer in enumerate(self.model.layers):
            x = state.input(layer.self_attention_res_proj, layer.self_attention_res_norm)
            state.add(layer.attention(x, None if cache is None else cache[i]))
            x = state.input(layer.mlp_res_proj, layer.mlp_res_norm)
            state.add(layer.feed_forward(x))
        return state.output(self.model.output_attn_res_proj, self.model.output_attn_res_norm)
