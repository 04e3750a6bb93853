"""Kimi Delta Attention fast paths: chunkwise-parallel prefill (WY/UT form) and a one-token decode step.

Both compute exactly the recurrence of ``kda_naive.kda_recurrent_naive`` (the oracle the tests compare against),
always in fp32 whatever the model dtype: the decays compound over up to 1M tokens and narrowing them collapses
decays close to 1 (spec §8.3).

Chunked form (chunk C = 64, Kimi Linear tech report Eqs. 2–9; spec §5.7). Inside a chunk, with G_i the cumulative
log-decay of positions ≤ i and Γ_i = exp(G_i):

    M_ij  = β_i Σ_d k_i[d] exp(G_i[d] − G_j[d]) k_j[d]       (j < i)
    A_ij  =     Σ_d q_i[d] exp(G_i[d] − G_j[d]) k_j[d]       (j ≤ i)
    (I + M) [W | U] = [diag(β)(Γ ⊙ K) | diag(β) V]           (UT transform: one unit-triangular solve)
    V_new = U − W S;   O = (Q ⊙ Γ) S + A V_new;   S ← diag(Γ_C) S + (exp(G_C − G) ⊙ K)ᵀ V_new

The pairwise decay exp(G_i − G_j) is never formed as exp(G_i)·exp(−G_j) over a whole chunk (exp(−G_j) overflows
for fast-decaying channels), nor as the [C, C, K] tensor a direct implementation builds. It is factored through the
start r of each 16-token sub-chunk: rows get exp(G_i − G_r) ≤ 1, earlier sub-chunks a table of sub-chunk-to-sub-chunk
decays ≤ 1, and keys exp(G_r' − G_j) relative to their own sub-chunk start, which stays below e^80 (exact in fp32)
unless a channel decays by more than 80 nats within 16 tokens. Then the blocks below the diagonal take keys relative
to the end of their own sub-chunk instead (all factors ≤ 1), and the 16×16 diagonal blocks are factored through the
sub-chunk's midpoint (factors ≤ e^80 up to 160 nats), or beyond that formed pair by pair ([C/16, 16, 16, K]).
All three paths are tested against the oracle.

Shapes legend: B batch, T tokens, H heads, K key dim, V value dim, N chunks, C chunk size, M sub-chunks, S sub size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
SUB_CHUNK = 16
# exp(±80) is well inside fp32 range (±88.7): factors up to e^80 keep full relative precision.
_SAFE_SPAN = 80.0


def l2_normalize(x: torch.Tensor, eps: float = 1e-6, scale: float = 1.0) -> torch.Tensor:
    """scale · x / sqrt(Σx² + eps) over the last dim (eps inside the sqrt, as fla's kernel, not F.normalize's clamp).

    Computed as one fused RMSNorm: x / sqrt(Σx² + eps) = rms_norm(x, eps / D) / sqrt(D) for D = x.shape[-1].
    """
    D = x.shape[-1]
    return F.rms_norm(x, (D,), eps=eps / D) * (scale / math.sqrt(D))


def decay_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for log-decays x ≤ 0 (−inf allowed), computed as exp(x/2)².

    PyTorch's CPU exp leaves its vector path for arguments below ≈ −87 (results in or under fp32's denormal range)
    and runs 8–20× slower there, and a 64-token chunk of a fast-decaying channel puts most of its elements there
    (measured on a 2 MB tensor: 0.5 ms for arguments in [−1, 0], 2–4.5 ms in [−400, 0]). With x/2 clamped at −87
    every exp stays on the fast path; the square is the same value to ≈ 2 ulp (1.8e-7 relative, denormal results
    rounded by the multiply), and below −174 it underflows to 0 exactly as exp(x) does.
    """
    half = x.clamp_min(-174.0) * 0.5
    if torch.is_grad_enabled() and half.requires_grad:
        return half.exp().square()
    return half.exp_().square_()


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log decay g = −exp(A_log) · softplus(f + dt_bias) in fp32.

    f [B, T, H, K] (any dtype); A_log broadcastable as [H, 1]; dt_bias [H, K]. Returns [B, T, H, K] fp32 (≤ 0).
    """
    return -A_log.float().exp() * F.softplus(f.float() + dt_bias.float())


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay-weighted q·k and k·k inside each chunk.

    q, k, G: [B, H, N, C, K] fp32. Returns (A_qk with j ≤ i, A_kk with j < i), each [B, H, N, C, C].

    Rows of sub-chunk a are taken relative to r = its first position: exp(G_i − G_r) ≤ 1 for i ≥ r. Columns j < r
    get exp(G_r − G_j) ≤ 1, so every block below the diagonal is one matmul with bounded factors. Columns inside
    the row's own sub-chunk get exp(G_r − G_j) ≥ 1; that is exact as long as no channel decays by more than
    ``_SAFE_SPAN`` (in log space) within one sub-chunk, which holds for nearly all real inputs. Otherwise the
    diagonal blocks are computed separately: through each sub-chunk's midpoint up to twice that span, pair by pair
    beyond.
    """
    C = q.shape[-2]
    M = C // sub
    dev = q.device
    Gs, qs, ks = (x.unflatten(-2, (M, sub)) for x in (G, q, k))  # [B, H, N, M, S, K]
    G_ref = G[..., ::sub, :]  # [B, H, N, M, K]: G at the first position of each sub-chunk
    row_decay = decay_exp(Gs - G_ref.unsqueeze(-2))  # exp(G_i − G_r) ≤ 1, [B, H, N, M, S, K]

    span = (G_ref - Gs[..., -1, :]).amax().item() if G.numel() else 0.0  # largest decay inside a sub-chunk
    explicit_diag = span > _SAFE_SPAN
    if not explicit_diag:
        # exp(G_r(a) − G_j) = exp(G_r(a) − G_r(b)) · exp(G_r(b) − G_j) for j in sub-chunk b ≤ a: one [M, M, K] table
        # of sub-chunk-to-sub-chunk decays (≤ 1) times keys taken relative to their own sub-chunk start (≤ e^span).
        k_rel = ks * (G_ref.unsqueeze(-2) - Gs).exp()  # [B, H, N, M, S, K]
        later = torch.ones(M, M, dtype=torch.bool, device=dev).triu(1)[..., None]  # b > a: not a column of row a
        between = decay_exp((G_ref.unsqueeze(-2) - G_ref.unsqueeze(-3)).masked_fill(later, float("-inf")))  # [M, M, K]
        k_col = between.unsqueeze(-2) * k_rel.unsqueeze(-4)  # [B, H, N, M, M, S, K]
        k_col_t = k_col.flatten(-3, -2).transpose(-1, -2)  # [B, H, N, M, K, C]
    else:  # only the blocks strictly below the diagonal, through the END e of each key sub-chunk b < a:
        # exp(G_r(a) − G_j) = exp(G_r(a) − G_e(b)) · exp(G_e(b) − G_j), both factors ≤ 1 whatever the decay
        G_end = Gs[..., -1, :]  # [B, H, N, M, K]
        k_end = ks * decay_exp(G_end.unsqueeze(-2) - Gs)  # [B, H, N, M, S, K]
        earlier = torch.ones(M, M, dtype=torch.bool, device=dev).tril(-1)[..., None]  # b < a
        between = decay_exp((G_ref.unsqueeze(-2) - G_end.unsqueeze(-3)).masked_fill(~earlier, float("-inf")))
        k_col_t = (between.unsqueeze(-2) * k_end.unsqueeze(-4)).flatten(-3, -2).transpose(-1, -2)  # [.., M, K, C]
    qk = ((qs * row_decay) @ k_col_t).flatten(-3, -2)  # [B, H, N, C, C]
    kk = ((ks * row_decay) @ k_col_t).flatten(-3, -2)

    if explicit_diag:  # add the S×S diagonal blocks, j ≤ i inside one sub-chunk
        if span <= 2 * _SAFE_SPAN:
            # through the sub-chunk's midpoint m = (G_first + G_last) / 2: exp(G_i − m) · exp(m − G_j), each factor
            # within e^±span/2, so a matmul per block. Pairs j > i may overflow to inf/nan: tril drops them first.
            mid = (Gs[..., :1, :] + Gs[..., -1:, :]) * 0.5  # [B, H, N, M, 1, K]
            k_mid = (ks * (mid - Gs).exp()).transpose(-1, -2)  # [B, H, N, M, K, S]
            to_mid = (Gs - mid).exp()
            diag_qk, diag_kk = ((qs * to_mid) @ k_mid).tril(), ((ks * to_mid) @ k_mid).tril()
        else:  # > 160 nats in 16 tokens: form exp(G_i − G_j) pair by pair, [.., S, S, K]
            tri = torch.ones(sub, sub, dtype=torch.bool, device=dev).tril()
            pair = decay_exp((Gs.unsqueeze(-2) - Gs.unsqueeze(-3)).masked_fill(~tri[..., None], float("-inf")))
            k_pair = pair * ks.unsqueeze(-3)  # [B, H, N, M, S, S, K]
            diag_qk, diag_kk = (qs.unsqueeze(-2) * k_pair).sum(-1), (ks.unsqueeze(-2) * k_pair).sum(-1)
        eye_m = torch.eye(M, dtype=q.dtype, device=dev)[:, None, :, None]  # place block a at (a, a)
        for_blocks = lambda d: (d.unsqueeze(-2) * eye_m).flatten(-4, -3).flatten(-2, -1)  # noqa: E731
        qk = qk + for_blocks(diag_qk)
        kk = kk + for_blocks(diag_kk)
    return qk.tril(), kk.tril(-1)


def kda_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel KDA for any T and batch. Differentiable (used for training).

    Shapes as the oracle: q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state [B, H, K, V].
    Returns (o [B, T, H, V] fp32, final state [B, H, K, V] fp32).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    N = (T + pad) // C

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] -> [B, H, N, C, D] fp32. Padded tokens have k = v = 0, g = 0, β = 0: S stays unchanged."""
        x = x.float()
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4).contiguous()

    q, k, v, g = (to_chunks(x) for x in (q, k, v, g))
    beta = to_chunks(beta.unsqueeze(-1))  # [B, H, N, C, 1]

    G = g.cumsum(-2)
    decay = decay_exp(G)  # Γ_i: decay from the chunk start to position i
    A_qk, A_kk = _intra_chunk_scores(q, k, G, min(SUB_CHUNK, C))
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    # UT transform: T = (I + diag(β) A_kk)^-1 (unit lower triangular), then W = T diag(β)(Γ ⊙ K), U = T diag(β) V.
    L = torch.addcmul(eye, A_kk, beta)
    T_beta = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False, unitriangular=True) * beta.transpose(-1, -2)
    W = T_beta @ (decay * k)
    U = T_beta @ v
    # W and Γ ⊙ Q (each position reads the chunk-start state decayed to it) both multiply S: one product per chunk.
    # (B, H) is flattened into one batch dimension for the per-chunk products: [B·H, N, ...].
    WQ = torch.cat([W, q * decay], dim=-2).flatten(0, 1)  # [B·H, N, 2C, K]
    U, A_qk = U.flatten(0, 1), A_qk.flatten(0, 1)
    k_to_end_t = (k * decay_exp(G[..., -1:, :] - G)).transpose(-1, -2).flatten(0, 1)  # keys decayed to the chunk end
    chunk_decay = decay[..., -1, :].unsqueeze(-1).flatten(0, 1)  # [B·H, N, K, 1]

    S = q.new_zeros(B * H, K, V) if initial_state is None else initial_state.float().reshape(B * H, K, V)
    outs = []
    for n in range(N):  # sequential over chunks only: T / 64 steps
        WS, QS = (WQ[:, n] @ S).split(C, dim=1)  # [B·H, C, V] each
        v_new = U[:, n] - WS
        outs.append(torch.baddbmm(QS, A_qk[:, n], v_new))  # Γ⊙Q S + A_qk V_new
        S = torch.baddbmm(S * chunk_decay[:, n], k_to_end_t[:, n], v_new)
    o = torch.stack(outs, dim=1).view(B, H, N, C, V).permute(0, 2, 3, 1, 4)  # [B, N, C, H, V]
    return o.reshape(B, N * C, H, V)[:, :T], S.view(B, H, K, V)


def kda_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KDA over T tokens with ``kda_chunked``'s contract: one token (a decode step) takes the recurrent step (the
    chunked form would pad it to a whole chunk), more take the chunked form. Neither changes ``initial_state``."""
    if q.shape[1] != 1:
        return kda_chunked(q, k, v, g, beta, initial_state)
    B, _, H, K = k.shape
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float().clone()
    o = kda_step(q[:, 0].float(), k[:, 0].float(), v[:, 0], g[:, 0].float(), beta[:, 0].float(), state)
    return o.unsqueeze(1), state


def kda_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One decode token, updating ``state`` [B, H, K, V] fp32 in place.

    q, k, g [B, H, K] fp32; v [B, H, V]; beta [B, H]. Returns o [B, H, V] fp32.
    """
    B, H, K, V = state.shape
    state.mul_(g.exp().unsqueeze(-1))
    S = state.view(B * H, K, V)  # batched over (sequence, head): three small bmm, no temporaries of S's size
    prediction = torch.bmm(k.reshape(B * H, 1, K), S)  # kᵀS, [B·H, 1, V]
    delta = beta.reshape(B * H, 1, 1) * (v.float().reshape(B * H, 1, V) - prediction)
    S.baddbmm_(k.reshape(B * H, K, 1), delta)  # S += k ⊗ δ
    return torch.bmm(q.reshape(B * H, 1, K), S).view(B, H, V)
