"""Block Attention Residuals: each sublayer reads a softmax over depth instead of the running residual sum.

Every attention and every MLP/MoE module is one *sublayer* l = 0 … L−1 (L = 2 · num_hidden_layers). The sublayers
are cut into contiguous blocks of S; block n's representation b_n is the plain sum of its sublayers' outputs and
b_0 is the token embedding. Before sublayer l (the i-th of block n) and once more before the final norm:

    sources V = [b_0, …, b_{n−1}]               (first sublayer of a block: no partial sum, never a zero vector)
              = [b_0, …, b_{n−1}, b_n^{i−1}]    (later sublayers: plus the partial sum of the block so far)
    h_l       = Σ_j softmax_j( w_lᵀ RMSNorm(V_j) ) · V_j        # per token, fp32, over the depth axis only
    b_n^i     = b_n^{i−1} + f_l(h_l)                            # f_l includes the sublayer's own pre-norm
    output    = Σ_j softmax_j( w_outᵀ RMSNorm(V_j) ) · V_j  over [b_0, …, b_N]  ->  final norm  ->  lm_head

The pseudo-queries w (``*_res_proj.weight`` [1, hidden]) start at zero, so every op starts as the mean of its
sources: a scaled copy of the standard residual stream, which each pre-norm undoes, so a fresh AttnRes model
computes the same function as the baseline (up to RMSNorm's eps). Blocks are cut by sublayer index, so any S works,
including odd S (a boundary between a layer's attention and its MLP) and L not divisible by S (the last block is
shorter). S = 1 is Full AttnRes.

Units: ``config.attn_res_block_size`` counts Transformer layers, as in the Kimi K3 config (12 there); S = 2 × that.
Key names are K3's: ``model.layers.N.{self_attention,mlp}_res_{proj,norm}``, ``model.output_attn_res_{proj,norm}``.
The RMSNorm gain is folded into the query (K3): logit_j = (g ⊙ w)ᵀ V_j / rms(V_j).

References: Attention Residuals, Kimi Team, arXiv 2603.15031 (§3.2, Fig. 2); spec ``shared/specs/attention_residuals.md``
§2; torchtitan ``models/kimi_k3`` (``_apply_attention_residual``, ``hf_key_map.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.model.layers import RMSNorm


def new_depth_attention(hidden_size: int, eps: float) -> tuple[nn.Linear, RMSNorm]:
    """The (pseudo-query projection, key norm) pair of one AttnRes op; the query starts at zero."""
    proj = nn.Linear(hidden_size, 1, bias=False)
    nn.init.zeros_(proj.weight)
    return proj, RMSNorm(hidden_size, eps)


def depth_attention(sources: list[torch.Tensor], proj: nn.Linear, norm: RMSNorm) -> torch.Tensor:
    """The plain reference: softmax over depth of wᵀ RMSNorm(V_j), applied to the raw V_j; n × [B, T, D] -> [B, T, D].

    ``BlockAttnRes`` computes the same thing faster (norms of completed blocks computed once); tests compare them."""
    if len(sources) == 1:  # softmax over one source is that source (the network's very first sublayer)
        return sources[0]
    V = torch.stack(sources).float()  # [n, B, T, D]; the whole op in fp32 (K3)
    logits = norm(V) @ proj.weight[0].float()  # [n, B, T]
    weights = logits.softmax(dim=0)
    return torch.einsum("nbt,nbtd->btd", weights, V).to(sources[0].dtype)


class BlockAttnRes:
    """The depth state carried from sublayer to sublayer: completed blocks b_0 … b_{n−1} and the partial sum b_n.

        state = BlockAttnRes(embedding, block_size, eps)
        for each sublayer l:  out = f_l(state.input(proj_l, norm_l));  state.add(out)
        h = state.output(proj_out, norm_out)

    A completed block is read by every later op, so its fp32 copy and 1/rms are computed once, when it closes;
    logit_j = (V_j · (g ⊙ w)) / rms(V_j) never forms the normalised [B, T, D] keys (K3 folds the gain the same way).
    """

    def __init__(self, embedding: torch.Tensor, block_size: int, eps: float):
        if block_size < 1:
            raise ValueError(f"Block AttnRes needs a block size of at least one sublayer, got {block_size}")
        self.block_size, self.eps, self.dtype = block_size, eps, embedding.dtype
        self.blocks = [self._key(embedding)]  # b_0 = the token embedding, exactly once: (fp32 value, 1/rms)
        self.partial: torch.Tensor | None = None  # b_n^i; None at a block start (never a zero source)
        self.sublayer = 0

    def _key(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = v.float()
        return v, torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.eps)

    def sources(self) -> list[torch.Tensor]:
        return [v for v, _ in self.blocks] + ([] if self.partial is None else [self.partial])

    def _mix(self, proj: nn.Linear, norm: RMSNorm) -> torch.Tensor:
        keys = self.blocks + ([] if self.partial is None else [self._key(self.partial)])
        if len(keys) == 1:  # softmax over one source is that source
            return keys[0][0].to(self.dtype)
        query = norm.weight.float() * proj.weight[0].float()  # [D]
        logits = torch.stack([(v @ query).unsqueeze(-1) * inv_rms for v, inv_rms in keys])  # [n, B, T, 1]
        weights = logits.softmax(dim=0)
        out = keys[0][0] * weights[0]
        for (v, _), w in zip(keys[1:], weights[1:]):
            out = out + v * w
        return out.to(self.dtype)

    def input(self, proj: nn.Linear, norm: RMSNorm) -> torch.Tensor:
        """h_l for the next sublayer; closes the current block first when sublayer l opens a new one."""
        if self.sublayer % self.block_size == 0 and self.partial is not None:
            self.blocks.append(self._key(self.partial))
            self.partial = None
        return self._mix(proj, norm)

    def add(self, out: torch.Tensor) -> None:
        """Record f_l(h_l): it joins the partial sum of the current block."""
        self.partial = out if self.partial is None else self.partial + out
        self.sublayer += 1

    def output(self, proj: nn.Linear, norm: RMSNorm) -> torch.Tensor:
        """The final mix over [b_0, …, b_N] (the last block possibly partial), fed to the final norm."""
        return self._mix(proj, norm)


def block_size_in_sublayers(attn_res_block_size: float) -> int:
    """``attn_res_block_size`` (Transformer layers, K3's unit) -> S in sublayers; 1.5 layers -> 3 sublayers."""
    S = 2 * attn_res_block_size
    if S != int(S) or S < 1:
        raise ValueError(
            f"attn_res_block_size must be a positive multiple of 0.5 layers (one sublayer); got {attn_res_block_size}"
        )
    return int(S)
