"""Kimi Delta Attention: the plain token-by-token recurrence, the executable spec every fast path is tested against.

Per head, with state S ∈ R^{K×V} (key-major, fp32) and for each token t:

    S ← diag(exp(g_t)) S                       # channel-wise decay (g_t ≤ 0 is a log decay per key channel)
    S ← S + β_t k_t (v_t − Sᵀ k_t)ᵀ            # delta-rule write; the prediction uses the decayed state
    o_t = Sᵀ q_t                               # read after the write: the token sees itself

q and k arrive already L2-normalised and q already scaled by K^-1/2 (see ``kda.prepare_qk``).

References: Kimi Linear tech report Eq. (1); fla v0.4.0 ``fla/ops/kda/naive.py`` and ``fused_recurrent.py``;
``shared/specs/kimi_linear.md`` §5.5.
"""

from __future__ import annotations

import torch


def kda_recurrent_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence in fp32.

    Shapes: q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; initial_state [B, H, K, V] or None.
    Returns (o [B, T, H, V] fp32, final state [B, H, K, V] fp32).
    """
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float().clone()
    out = q.new_empty(B, T, H, V)
    for t in range(T):
        S = S * g[:, t].exp()[..., None]  # decay rows (key channels)
        prediction = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        delta = beta[:, t, :, None] * (v[:, t] - prediction)
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        out[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return out, S
