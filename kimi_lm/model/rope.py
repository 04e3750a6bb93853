"""Rotary position embedding for MLA's rope dims, as DeepSeek-V3 / Kimi K2 use it: interleaved pairs and YaRN.

Layout: the r rope dims hold r/2 *consecutive pairs* (x[2i], x[2i+1]), pair i rotated by pos·θ'_i (DeepSeek's
``view_as_complex``; transformers' ``rope_interleave=True``). ``rope_interleave=False`` configs use the NeoX layout
(x[i], x[i + r/2]) instead. Rotation runs in fp32 and is cast back.

YaRN (spec §2.4), D = r, b = rope_theta, s = factor, L0 = original_max_position_embeddings:

    θ_i  = b^(−2i/D)                                   i = 0 … D/2 − 1
    c(ρ) = D · ln(L0 / (2πρ)) / (2 ln b)               the dim index that makes ρ full turns over L0 tokens
    low  = max(⌊c(beta_fast)⌋, 0),  high = min(⌈c(beta_slow)⌉, D − 1)     (high += 0.001 if equal)
    ramp = clamp((i − low) / (high − low), 0, 1)
    θ'_i = θ_i · (1 − ramp) + θ_i / s · ramp            fast dims keep θ, slow dims are interpolated
    m(s, μ) = 0.1 · μ · ln s + 1  (1 if s ≤ 1)
    softmax scale ×= m(s, mscale_all_dim)²;  cos, sin ×= m(s, mscale) / m(s, mscale_all_dim)  (1 for K2 and V3)

YaRN is applied at every position, as transformers, vLLM and mlx-lm do (DeepSeek's reference only switches it on
when its max_seq_len exceeds L0, which its default does).

References: DeepSeek-V3 ``inference/model.py`` (precompute_freqs_cis, apply_rotary_emb); transformers
``modeling_rope_utils._compute_yarn_parameters`` and ``deepseek_v3`` (``yarn_get_mscale``); YaRN, Peng et al. 2023.
"""

from __future__ import annotations

import math

import torch


def yarn_correction_range(dim: int, base: float, original_max: int, beta_fast: float, beta_slow: float) -> tuple[int, int]:
    """(low, high) dim indices between which YaRN ramps from keeping θ to dividing it by the factor."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    return max(math.floor(correction_dim(beta_fast)), 0), min(math.ceil(correction_dim(beta_slow)), dim - 1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """θ'_i for i < dim/2, fp32 on the CPU (explicitly: models are built on the meta device)."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    theta = 1.0 / pos_freqs
    if scaling is None:
        return theta
    low, high = yarn_correction_range(
        dim, base, scaling["original_max_position_embeddings"], scaling["beta_fast"], scaling["beta_slow"]
    )
    if low == high:
        high += 0.001  # avoid 0/0; the ramp becomes a step
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    return 1.0 / (scaling["factor"] * pos_freqs) * ramp + theta * (1 - ramp)


class RotaryEmbedding:
    """Rotates the rope dims of queries and keys by absolute position; holds no learned state.

    Not an ``nn.Module``: the frequency table is derived from the config, never part of a checkpoint (checkpoints'
    ``rotary_emb.inv_freq`` tensors are skipped on load).
    """

    def __init__(self, dim: int, base: float, scaling: dict | None = None, interleaved: bool = True):
        self.dim, self.interleaved = dim, interleaved
        self.inv_freq = inv_frequencies(dim, base, scaling)  # [dim/2]
        self.cos_sin_factor = 1.0  # transformers' attention_factor
        self.softmax_factor = 1.0  # multiplies 1/sqrt(d_qk)
        if scaling is not None:
            s, mscale, mscale_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
            if scaling.get("attention_factor") is not None:
                self.cos_sin_factor = float(scaling["attention_factor"])
            elif mscale and mscale_all:
                self.cos_sin_factor = yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all)
            else:
                self.cos_sin_factor = yarn_mscale(s)
            if mscale_all:
                self.softmax_factor = yarn_mscale(s, mscale_all) ** 2

    @classmethod
    def from_config(cls, config) -> "RotaryEmbedding":
        return cls(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling, config.rope_interleave)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, ..., dim] for tokens at absolute ``positions`` [B or 1, T] -> rotated x, same shape and dtype."""
        angles = positions.to(x.device, torch.float32)[..., None] * self.inv_freq.to(x.device)  # [B or 1, T, dim/2]
        shape = angles.shape[:2] + (1,) * (x.dim() - 3) + (self.dim // 2,)
        cos = (angles.cos() * self.cos_sin_factor).view(shape)
        sin = (angles.sin() * self.cos_sin_factor).view(shape)
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
