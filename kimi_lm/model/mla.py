"""Multi-head Latent Attention: Kimi Linear's full-attention layers (NoPE) and DeepSeek-V3 / Kimi K2's (RoPE + YaRN).

Naive form (prefill): expand each cached latent through ``kv_b_proj`` into per-head keys and values.

    q = q_proj(x)                     [B, T, H, 128 nope + 64 pe]
    c, k_pe = kv_a_proj_with_mqa(x)   [B, T, 512], [B, T, 64]     (k_pe is one key part shared by all heads)
    ĉ = RMSNorm(c)                    (eps 1e-6)
    k_nope, v = kv_b_proj(ĉ)          [B, T, H, 128] each
    o = softmax((q_nope·k_nope + q_pe·k_pe) / sqrt(192)) v

Absorbed form (decode): fold the key half of ``kv_b_proj`` into the query and the value half into the output, so
attention runs directly against the cached 576-wide latent [ĉ | k_pe] and the expanded K/V never exist:

    score = (W_UK,hᵀ q_nope,h) · ĉ_s + q_pe,h · k_pe_s;   o_h = W_UV,h Σ_s softmax(score)_s ĉ_s

The cache holds only [ĉ | k_pe] per token (kv_lora_rank + qk_rope_head_dim values).

With a ``RotaryEmbedding`` (K2 / DeepSeek-V3), q_pe and k_pe are rotated by absolute position before anything else
and the cache stores the *rotated* k_pe, as DeepSeek does, so cached keys never need re-rotating; the softmax scale
gains YaRN's mscale² factor. Without one (Kimi Linear) nothing is rotated.

References: DeepSeek-V2/V3 papers and ``inference/model.py`` (naive vs absorb); spec ``kimi_linear.md`` §4;
``kimi_k2_and_quantization.md`` §2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.cache import MLACache, sequence_pieces
from kimi_lm.config import KimiLinearConfig
from kimi_lm.model.layers import RMSNorm
from kimi_lm.model.rope import RotaryEmbedding

# Queries at or below this many tokens use the absorbed form when attending to a cache.
ABSORB_MAX_QUERY = 16


class MultiheadLatentAttention(nn.Module):
    def __init__(self, config: KimiLinearConfig, rope: RotaryEmbedding | None = None):
        """``config``: any config with the MLA keys (Kimi Linear or K2); ``rope``: None for NoPE."""
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = H = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.pe_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.scale = config.qk_head_dim**-0.5
        self.rope = rope
        if rope is not None:  # YaRN: longer contexts flatten the softmax; m² restores its sharpness
            self.scale = self.scale * rope.softmax_factor
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, H * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.latent_dim + self.pe_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.latent_dim, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, hidden, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> (q_proj(x) or q_a_proj(x), kv_a_proj_with_mqa(x)): the two products that read x."""
        return (self.q_proj if self.q_lora_rank is None else self.q_a_proj)(x), self.kv_a_proj_with_mqa(x)

    def make_cache(self, batch_size: int, dtype: torch.dtype, device) -> MLACache:
        return MLACache(batch_size, self.latent_dim + self.pe_dim, dtype, device)

    def _queries(self, q_in: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q_in = the first output of ``project`` for tokens at ``positions`` [B or 1, T] -> q [B, T, H, 192]
        (q_pe rotated)."""
        q = q_in if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_in))
        q = q.reshape(*q_in.shape[:2], self.num_heads, self.nope_dim + self.pe_dim)  # [B, T, H, 192]
        if self.rope is None:
            return q
        q_nope, q_pe = q.split([self.nope_dim, self.pe_dim], dim=-1)
        return torch.cat([q_nope, self.rope(q_pe, positions)], dim=-1)

    def latent(self, kv_in: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """kv_in = kv_a_proj_with_mqa(x) -> what the cache stores per token: [ĉ | k_pe],
        [B, T, kv_lora_rank + qk_rope_head_dim] (k_pe rotated)."""
        c, k_pe = kv_in.split([self.latent_dim, self.pe_dim], dim=-1)
        if self.rope is not None:
            k_pe = self.rope(k_pe, positions)
        return torch.cat([self.kv_a_layernorm(c), k_pe], dim=-1)

    def forward(self, x: torch.Tensor, cache: MLACache | None = None, positions: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [B, T, hidden] at absolute ``positions`` [B or 1, T] -> [B, T, hidden]. With a cache, the T new tokens
        attend to all cached ones too. ``positions`` default to the tokens following the cached ones (the model passes
        them explicitly: a sliding window stops its cache's length at the window, not the position). A packed
        prefill's cache (``PackedLayerCache``: several sequences side by side in a [1, T] row): the products run over
        all T tokens, the attention per sequence over its own cache."""
        B, T, _ = x.shape
        pieces = sequence_pieces(cache, T)
        if positions is None:  # each sequence's tokens follow its cached ones
            past = [0 if c is None else c.length for c, _, _ in pieces]
            positions = torch.cat([torch.arange(p, p + s1 - s0, device=x.device)
                                   for p, (_, s0, s1) in zip(past, pieces)])[None]
        q_in, kv_in = self.project(x)
        q = self._queries(q_in, positions)
        latent = self.latent(kv_in, positions)
        o = [self._attend(q[:, s0:s1], latent[:, s0:s1], c) for c, s0, s1 in pieces]
        o = o[0] if len(o) == 1 else torch.cat(o, dim=1)
        return self.o_proj(self.output_gate(x, o.reshape(B, T, self.num_heads * self.v_dim)))

    def _attend(self, q: torch.Tensor, latent: torch.Tensor, cache) -> torch.Tensor:
        """q [B, T, H, 192] and the new tokens' latents [B, T, 576] -> o [B, T, H, v], attending over ``cache``'s
        tokens too (and appending these)."""
        T = q.shape[1]
        past = 0 if cache is None else cache.length
        if cache is not None:
            latent = cache.append(latent)  # [B, past + T, 576]
        if isinstance(latent, list):
            # sequences of different lengths decoded together (kimi_lm.batching): each row attends over its own
            # history [S_b, 576], so nothing is padded or copied
            return self.attend_absorbed(q, latent)
        if cache is not None and T <= ABSORB_MAX_QUERY:
            return self.attend_absorbed(q, self.decode_history(cache, latent), past)
        return self.attend_naive(q, latent, past)

    def output_gate(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The heads' output o [B, T, H·v] before o_proj, given the layer input x: unchanged here; Kimi K3's variant
        (model/kimi_k3.py) gates it."""
        return o

    def decode_history(self, cache: MLACache, history: torch.Tensor) -> torch.Tensor:
        """The cached history [B, S, 576] the absorbed form attends over (a backend may pad it; see ``kimi_lm.cpu``)."""
        return history

    def _split_kv_b(self, w: torch.Tensor, contiguous: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b's [H·(nope + v), latent] weight -> (W_UK [H, nope, latent], W_UVᵀ [H, latent, v]), views or copies."""
        w = w.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        w_uk, w_uv_t = w[:, : self.nope_dim], w[:, self.nope_dim :].transpose(1, 2)
        return (w_uk.contiguous(), w_uv_t.contiguous()) if contiguous else (w_uk, w_uv_t)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, latent], W_UVᵀ [H, latent, v]) in ``dtype`` for the absorbed form, cut from kv_b's weight:
        strided views in fp32, contiguous copies in half precision (a half-precision CPU matmul copies a strided
        operand first anyway). A quantized kv_b_proj (kimi_lm.quant) is rebuilt dense on the fly, as DeepSeek's
        reference does (weight_dequant), rather than kept as a second copy."""
        proj = self.kv_b_proj
        w = proj.dense_weight(dtype) if hasattr(proj, "dense_weight") else proj.weight.to(dtype)
        return self._split_kv_b(w, contiguous=dtype != torch.float32)

    def _causal_mask(self, T: int, S: int, past: int, device) -> torch.Tensor | None:
        """Boolean [T, S] mask (True = attend): query i sits at absolute position past + i. None when nothing is
        masked: one query over exactly its history (S may exceed past + T: padding rows are masked too)."""
        if T == 1 and S == past + 1:
            return None
        return torch.arange(S, device=device)[None, :] <= (torch.arange(T, device=device)[:, None] + past)

    def attend_naive(self, q: torch.Tensor, latent: torch.Tensor, past: int) -> torch.Tensor:
        """q [B, T, H, 192], latent [B, S, 576] -> o [B, T, H, v_dim] via expanded keys and values."""
        B, T, H, _ = q.shape
        S = latent.shape[1]
        c, k_pe = latent.split([self.latent_dim, self.pe_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c).view(B, S, H, self.nope_dim + self.v_dim).split([self.nope_dim, self.v_dim], -1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.pe_dim)], dim=-1)
        # Pad v to the q/k head size: the CPU fused (flash) kernel needs equal sizes; otherwise SDPA falls back to
        # the math path, which materialises the [T, S] score matrix per head (and is ~2x slower here).
        pad = self.nope_dim + self.pe_dim - self.v_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, *, D]
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._causal_mask(T, S, past, q.device), scale=self.scale)
        return o.transpose(1, 2)[..., : self.v_dim]

    def attend_absorbed(self, q: torch.Tensor, latent: torch.Tensor | list[torch.Tensor], past: int | None = None
                        ) -> torch.Tensor:
        """q [B, T, H, 192], latent [B, S, 576] (or a list of B histories [S_b, 576] of different lengths, each row's
        T queries being its last T positions) -> o [B, T, H, v_dim], attending in latent space.

        The kv_b absorption runs once for all rows (weights from ``absorbed_weights``); only the attention over each row's own
        history is per row.
        """
        B, T, H, _ = q.shape
        nope, C = self.nope_dim, self.latent_dim
        w_uk, w_uv_t = self.absorbed_weights(latent[0].dtype if isinstance(latent, list) else latent.dtype)
        q_nope, q_pe = q.split([nope, self.pe_dim], dim=-1)
        q_latent = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, nope), w_uk)  # W_UKᵀ q_nope, per head
        q_latent = q_latent.view(H, B, T, C).transpose(0, 1)  # [B, H, T, 512]
        q_full = torch.cat([q_latent, q_pe.transpose(1, 2)], dim=-1).reshape(B, H * T, C + self.pe_dim)
        # Per sequence: each cached row block latent[b] is contiguous while the batch stride of a view into the
        # growing cache buffer is not (bmm would copy the whole cache first), and ragged rows differ in length.
        o_latent = torch.stack([
            self.attend_latent(q_full[b], latent[b], T, latent[b].shape[0] - T if past is None else past)
            for b in range(B)])  # Σ_s p_s ĉ_s: [B, H·T, 512]
        o_latent = o_latent.reshape(B, H, T, C).transpose(0, 1).reshape(H, B * T, C)
        o = torch.bmm(o_latent, w_uv_t)  # W_UV ô: [H, B·T, v_dim]
        return o.reshape(H, B, T, self.v_dim).permute(1, 2, 0, 3)  # [B, T, H, v_dim]

    def attend_latent(self, q_full: torch.Tensor, history: torch.Tensor, T: int, past: int) -> torch.Tensor:
        """One sequence: q_full [H·T, 576] against its history [S, 576] (rows past ``past + T`` are padding)
        -> Σ_s p_s ĉ_s [H·T, 512]."""
        S = history.shape[0]
        # both products take all 576 cached columns: a half-precision CPU matmul would copy a strided operand first
        scores = (q_full @ history.T).view(-1, T, S).float() * self.scale  # [H, T, S]
        if T == 1:  # one query sees all its history: only spare padding rows (if any) are masked, in one fill
            scores[..., past + 1 :] = float("-inf")
        elif (mask := self._causal_mask(T, S, past, q_full.device)) is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).to(history.dtype).view(-1, S)
        return (probs @ history)[:, : self.latent_dim]
