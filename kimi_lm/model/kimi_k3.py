"""Kimi K3's text model: Kimi Linear (KDA + NoPE MLA, MoE) with SiTU, gated mixers, a latent MoE and Block AttnRes.

    h = embed(ids);  Block AttnRes over depth (attnres.py; blocks of attn_res_block_size layers, final output mix)
    Mixer_i = KDA if (i + 1) ∈ kda_layers else MLA                          (1-based lists)
      KDA: g   = lb · sigmoid(exp(A_log[:H]) · (f_b(f_a(x)) + dt_bias))     lower-bounded decay, not a clamp (fp32)
           out = o_proj( RMSNorm_head(o) · sigmoid(g_proj(x)) )             full-rank output gate
      MLA: NoPE with q-LoRA;  out = o_proj( o · sigmoid(g_proj(x)) )          sigmoid output gate
    FFN_i = SiTU MLP for layer 0, else the latent MoE:
      w, e = top-k router(x)                                                on the full hidden x (fp32)
      r    = Σ_k w_k · Expert_e_k(routed_expert_down_proj(x))               experts in the latent, fp32 combine
      out  = routed_expert_up_proj(RMSNorm(r)) + SharedExperts(x)           shared experts on the full hidden x
    SiTU(a, b) = β·tanh(a/β)·sigmoid(a) · β_lin·tanh(b/β_lin)                fp32 (β 4, β_lin 25 in the release)

``self_attn.g_proj`` names both mixers' output gates (same shape in the release): each layer type builds its own
class, so the name never decides the meaning. Every K3 layer is its own class (``K3DeltaAttention``,
``K3LatentAttention``, ``SiTUMLP``, ``SiTUExperts``, ``LatentMoE``): the CPU backend swaps modules by exact type, so
Kimi Linear's kernels never run K3 math. KDA and MLA reuse Kimi Linear's layers through two small hooks (the KDA
gates, the MLA output gate); caches, absorbed MLA decode and chunked KDA are theirs.

Checkpoint names are the release's under ``language_model.`` (the name table, ``kimi_lm.names``); ``A_log`` is
stored zero-padded to the head dim ([128] for 96 heads).

References: spec ``shared/specs/kimi_k3_and_int4.md`` §A2 (every difference from Kimi Linear), §A3 (tensors);
mlx-lm 0.32.2 ``models/kimi_k3.py`` (the parity oracle in tests/test_kimi_k3.py); llama.cpp ``src/models/kimi-k3.cpp``.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.config_k3 import KimiK3Config
from kimi_lm.model.attnres import new_depth_attention
from kimi_lm.model.causal_lm import CausalLM
from kimi_lm.model.kda import KimiDeltaAttention
from kimi_lm.model import kimi_linear
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM, KimiLinearModel
from kimi_lm.model.layers import RMSNorm
from kimi_lm.model.mla import MultiheadLatentAttention
from kimi_lm.model.moe import StackedExperts, TopkRouter


def situ(gate: torch.Tensor, up: torch.Tensor, beta: float, linear_beta: float | None) -> torch.Tensor:
    """β·tanh(a/β)·sigmoid(a) · β_lin·tanh(b/β_lin) in fp32, rounded once to the input dtype."""
    a, b = gate.float(), up.float()
    act = beta * torch.tanh(a / beta) * torch.sigmoid(a)
    if linear_beta is not None:
        b = linear_beta * torch.tanh(b / linear_beta)
    return (act * b).to(gate.dtype)


def situ_betas(config: KimiK3Config) -> tuple[float, float | None]:
    return config.activation_situ_beta or 1.0, config.activation_situ_linear_beta


class SiTUMLP(nn.Module):
    """down(SiTU(gate(x), up(x))); the dense first layer and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, betas: tuple[float, float | None]):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.beta, self.linear_beta = betas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(situ(self.gate_proj(x), self.up_proj(x), self.beta, self.linear_beta))


class SiTUExperts(StackedExperts):
    """The routed experts (w1 gate, w3 up, w2 down; stacked on load) with SiTU instead of SwiGLU."""

    def __init__(self, num_experts: int, width: int, intermediate_size: int, betas: tuple[float, float | None]):
        super().__init__(num_experts, width, intermediate_size)
        self.beta, self.linear_beta = betas

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(e, x).chunk(2, dim=-1)
        return self.down(e, situ(gate, up, self.beta, self.linear_beta))


class LatentMoE(nn.Module):
    """Router and shared experts on the full hidden x; routed experts in a narrower latent (``block_sparse_moe``)."""

    def __init__(self, config: KimiK3Config):
        super().__init__()
        D, L, betas = config.hidden_size, config.expert_hidden_size, situ_betas(config)
        self.gate = TopkRouter(D, config.num_experts, config.num_experts_per_token, config.num_expert_group,
                               config.topk_group, config.moe_renormalize, config.routed_scaling_factor)
        self.latent = config.routed_expert_hidden_size is not None
        if self.latent:
            self.routed_expert_down_proj = nn.Linear(D, L, bias=False)
            self.routed_expert_up_proj = nn.Linear(L, D, bias=False)
        self.routed_expert_norm = RMSNorm(L, config.rms_norm_eps) if config.latent_moe_use_norm else None
        self.experts = SiTUExperts(config.num_experts, L, config.moe_intermediate_size, betas)
        S = config.num_shared_experts
        self.shared_experts = SiTUMLP(D, config.moe_intermediate_size * S, betas) if S else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        weights, idx = self.gate(flat)  # router on the full hidden, fp32
        u = self.routed_expert_down_proj(flat) if self.latent else flat  # [N, L]
        r = self.experts(u, idx, weights)  # Σ_k w_k · expert(u), combined in fp32, cast back
        if self.routed_expert_norm is not None:
            r = self.routed_expert_norm(r)
        y = self.routed_expert_up_proj(r) if self.latent else r
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(x.shape)


class K3DeltaAttention(KimiDeltaAttention):
    """KDA with K3's lower-bounded decay gate, zero-padded ``A_log`` [max(H, K)] and full-rank output gate."""

    def __init__(self, config: KimiK3Config):
        super().__init__(config)
        self.lower_bound = config.kda_gate_lower_bound
        self.A_log = nn.Parameter(torch.zeros(config.a_log_size))  # first H entries used, the rest stored as 0
        if config.kda_full_rank_gate:
            del self.g_a_proj, self.g_b_proj
            self.g_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """g [B, T, H, K] fp32: lb · sigmoid(exp(A_log)·(f + dt_bias)) ∈ (lb, 0), or Kimi Linear's form without lb."""
        H, K = self.num_heads, self.head_dim
        f = self.f_b_proj(self.f_a_proj(x)).view(*x.shape[:2], H, K).float()
        a, dt = self.A_log[:H].float().exp().view(H, 1), self.dt_bias.float().view(H, K)
        if self.lower_bound is None:
            return -a * torch.nn.functional.softplus(f + dt)
        return self.lower_bound * torch.sigmoid(a * (f + dt))

    def output_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_proj(x) if hasattr(self, "g_proj") else super().output_gate(x)


class K3LatentAttention(MultiheadLatentAttention):
    """NoPE MLA (q-LoRA or not) with an optional sigmoid output gate ``g_proj`` [H·v, hidden] on the layer input."""

    def __init__(self, config: KimiK3Config):
        super().__init__(config)
        if config.mla_use_output_gate:
            self.g_proj = nn.Linear(config.hidden_size, self.num_heads * self.v_dim, bias=False)

    def output_gate(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return o * torch.sigmoid(self.g_proj(x)) if hasattr(self, "g_proj") else o


class DecoderLayer(kimi_linear.DecoderLayer):
    """K3's sublayers in Kimi Linear's layer (its ``attention`` / ``feed_forward`` / plain-residual ``forward``)."""

    def __init__(self, config: KimiK3Config, layer_idx: int):
        nn.Module.__init__(self)  # the parts are K3's own; only the methods are Kimi Linear's
        D = config.hidden_size
        self.is_kda = config.is_kda_layer(layer_idx)
        self.input_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.self_attn = K3DeltaAttention(config) if self.is_kda else K3LatentAttention(config)
        self.post_attention_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.block_sparse_moe = LatentMoE(config)
        else:
            self.mlp = SiTUMLP(D, config.intermediate_size, situ_betas(config))
        if config.attn_res_block_size:  # one depth-attention op before each sublayer
            self.self_attention_res_proj, self.self_attention_res_norm = new_depth_attention(D, config.rms_norm_eps)
            self.mlp_res_proj, self.mlp_res_norm = new_depth_attention(D, config.rms_norm_eps)


class KimiK3ForCausalLM(KimiLinearForCausalLM):
    """The text model; its decoder stack (Block AttnRes over the layers' ``attention`` / ``feed_forward``) is Kimi
    Linear's."""

    def __init__(self, config: KimiK3Config):
        CausalLM.__init__(self, config, KimiLinearModel(config, DecoderLayer))
