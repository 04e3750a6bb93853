"""Kimi Delta Attention layer: projections, short conv, gates and gated RMSNorm around the KDA recurrence.

    q, k, v = SiLU(causal depthwise conv₄(W_{q,k,v} x))           # per channel, 4 taps, no bias
    q, k    = L2-normalise per head;  q *= K^-1/2
    g       = −exp(A_log) · softplus(f_b(f_a(x)) + dt_bias)         # per head and key channel, fp32
    β       = sigmoid(b_proj(x))                                    # per head, fp32
    o       = KDA(q, k, v, g, β)                                    # ops/kda.py (chunked) or one recurrent step
    out     = o_proj( RMSNorm_head(o) · w · sigmoid(g_b(g_a(x))) )

Parameter names are the official checkpoint's (``q_conv1d``, ``f_a_proj``, ``A_log`` [1,1,H,1], ``dt_bias`` [H·K]).
The conv, the gates, the recurrence and the gated norm run in fp32 whatever the model dtype. A loaded CPU model
decodes one token with everything between its input products and o_proj in one C call (``_decode_native``,
ops/kernels.c), and prefills with three (``_forward_native``: conv/norms/gates, the recurrence as a scan, the gated
norm); ``_decode`` and the rest of ``forward`` are the same math in PyTorch, their reference and fallback.

References: spec ``shared/specs/kimi_linear.md`` §5; fla v0.4.0 ``fla/layers/kda.py``; transformers
``modeling_kimi_linear.py`` (``KimiLinearDeltaAttention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.cache import KDACache
from kimi_lm.config import KimiLinearConfig
from kimi_lm.model.layers import GatedRMSNorm, rms_norm
from kimi_lm.ops import native
from kimi_lm.ops.kda import kda_forward, kda_gate, kda_step, l2_normalize


class ShortConv(nn.Module):
    """Holds a depthwise conv's taps under the checkpoint name ``*_conv1d.weight`` [D, 1, W]."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width))


class KimiDeltaAttention(nn.Module):
    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = H = config.kda_num_heads
        self.head_dim = K = config.kda_head_dim
        self.conv_width = W = config.conv_kernel_size
        D = H * K
        self.q_proj = nn.Linear(hidden, D, bias=False)
        self.k_proj = nn.Linear(hidden, D, bias=False)
        self.v_proj = nn.Linear(hidden, D, bias=False)
        self.q_conv1d = ShortConv(D, W)
        self.k_conv1d = ShortConv(D, W)
        self.v_conv1d = ShortConv(D, W)
        self.f_a_proj = nn.Linear(hidden, K, bias=False)
        self.f_b_proj = nn.Linear(K, D, bias=False)
        self.A_log = nn.Parameter(torch.zeros(1, 1, H, 1))
        self.dt_bias = nn.Parameter(torch.zeros(D))
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, K, bias=False)
        self.g_b_proj = nn.Linear(K, D, bias=False)
        self.o_norm = GatedRMSNorm(K, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(D, hidden, bias=False)
        self.in_proj = None  # inference: the six products of x as one (ops/onednn.py), outputs in this order

    INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj")

    def fuse_projections(self) -> None:
        """Inference set-up (the loader, once weights are final): fuse the input products, keep fp32 constants and,
        where the C kernels can read both gate products' packed weights (ops/native.py), those two readers."""
        from kimi_lm.ops.onednn import fuse

        gemvs = [getattr(m, "gemv", None) for m in (self.f_b_proj, self.g_b_proj)]
        if fuse(self, "in_proj", self.INPUT_PROJECTIONS) and None not in gemvs:
            self.__dict__["_native_gates"] = tuple(gemvs)
        self.__dict__["_decode_constants"] = self._constants()

    def _constants(self) -> tuple[torch.Tensor, ...]:
        """What the decode step uses, in fp32: conv taps of q | k | v [W, 3D], −exp(A_log) [H, 1], dt_bias [H, K],
        the [2, 1, 1] factors after the q/k rms_norm: q gets K^-1/2 / sqrt(K) = 1/K, k 1/sqrt(K) (l2_normalize), and
        the gated norm's weight [K]."""
        H, K = self.num_heads, self.head_dim
        taps = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]).view(3 * H * K, -1)
        qk_scale = torch.tensor([K**-0.5 / math.sqrt(K), 1 / math.sqrt(K)], device=self.A_log.device).view(2, 1, 1)
        return (taps.T.float().contiguous(), -self.A_log.float().view(H, 1).exp(), self.dt_bias.float().view(H, K),
                qk_scale, self.o_norm.weight.float().contiguous())

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, hidden] -> q, k, v [B, T, D], f_a, g_a [B, T, K], b [B, T, H] (before conv, gates, norms)."""
        if self.in_proj is not None:
            return self.in_proj(x).split(self.in_proj.sizes, dim=-1)
        return tuple(getattr(self, name)(x) for name in self.INPUT_PROJECTIONS)

    def make_cache(self, batch_size: int, dtype: torch.dtype, device) -> KDACache:
        D = self.num_heads * self.head_dim
        return KDACache(batch_size, 3 * D, self.conv_width, self.num_heads, self.head_dim, self.head_dim, dtype, device)

    def _short_conv(self, x: torch.Tensor, conv: ShortConv, history: torch.Tensor | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU in fp32. x [B, T, D]; history [B, W − 1, D] (updated in place) or None.

        Written as W shifted multiply-adds over the [B, T, D] layout: ~3x faster on CPU than a grouped conv1d,
        which also needs the [B, D, T] layout (two transposes).
        """
        B, T, D = x.shape
        W = self.conv_width
        past = x.new_zeros(B, W - 1, D) if history is None else history.to(x.dtype)
        window = torch.cat([past, x], dim=1).float()  # [B, W − 1 + T, D]
        if history is not None:
            history.copy_(window[:, T:])
        taps = conv.weight.view(D, W).float().T  # [W, D]; tap W − 1 multiplies the current token
        y = window[:, W - 1 :] * taps[W - 1]
        for i in range(W - 1):
            y.addcmul_(window[:, i : i + T], taps[i])
        return F.silu(y)

    def forward(self, x: torch.Tensor, cache: KDACache | None = None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; advances ``cache`` (conv tail and recurrent state) if given."""
        if cache is not None and x.shape[1] == 1:
            if "_native_gates" in self.__dict__ and self._native_applies(x, cache):
                return self._decode_native(x, cache)
            return self._decode(x, cache)
        if "_native_gates" in self.__dict__ and self._native_applies(x, cache) and self.head_dim <= native.SCAN_MAX_K:
            return self._forward_native(x, cache)
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        D = H * K
        q, k, v, f_a, g_a, b = self._project(x)
        tails = [None] * 3 if cache is None else cache.conv_state.split(D, dim=-1)  # q, k, v: [B, W − 1, D]
        q = self._short_conv(q, self.q_conv1d, tails[0])
        k = self._short_conv(k, self.k_conv1d, tails[1])
        v = self._short_conv(v, self.v_conv1d, tails[2])
        q, k, v = (t.view(B, T, H, K) for t in (q, k, v))
        q = l2_normalize(q, scale=K**-0.5)
        k = l2_normalize(k)
        g = kda_gate(self.f_b_proj(f_a).view(B, T, H, K), self.A_log.view(H, 1), self.dt_bias.view(H, K))
        beta = torch.sigmoid(b.float())  # [B, T, H]
        o, final_state = kda_forward(q, k, v, g, beta, initial_state=None if cache is None else cache.state)
        if cache is not None:
            cache.state.copy_(final_state)
        z = self.g_b_proj(g_a).view(B, T, H, K)
        return self.o_proj(self.o_norm(o, z, x.dtype).reshape(B, T, H * K))

    def _native_applies(self, x: torch.Tensor, cache: KDACache | None) -> bool:
        if cache is None:
            return native.supports(x)
        return (cache.conv_state.dtype == x.dtype and cache.state.shape[-1] == self.head_dim
                and native.supports(x, cache.conv_state, cache.state))

    def _forward_native(self, x: torch.Tensor, cache: KDACache | None) -> torch.Tensor:
        """``forward`` for T tokens with the small-tensor work in three C calls (ops/native.py): conv, norms and gates
        (``kda_prefill_inputs``), the recurrence (``kda_scan``, state in place), the gated norm. The products stay
        on oneDNN. x [B, T, hidden] -> [B, T, hidden]."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        D = H * K
        taps, neg_A, dt_bias, _, norm_weight = self.__dict__["_decode_constants"]
        proj = self.in_proj(x)  # [B, T, 3D + 2K + H]
        f_a, g_a = proj[..., 3 * D : 3 * D + K], proj[..., 3 * D + K : 3 * D + 2 * K]
        q, k, v, decay, beta = native.kda_prefill_inputs(proj, None if cache is None else cache.conv_state,
                                                         self.f_b_proj(f_a), taps, neg_A, dt_bias, 1e-6)
        state = x.new_zeros(B, H, K, K, dtype=torch.float32) if cache is None else cache.state
        o = native.kda_scan(q, k, v, decay, beta, state)  # [B, T, H, K] fp32
        z = self.g_b_proj(g_a)  # [B, T, D]
        return self.o_proj(native.gated_rms_norm(o, z, norm_weight, self.o_norm.eps))

    def _decode_native(self, x: torch.Tensor, cache: KDACache) -> torch.Tensor:
        """``_decode`` with everything between the input products and o_proj in one C call (ops/native.py): the
        same math and roundings, ~40 fewer tensor ops per token. x [B, 1, hidden] -> [B, 1, hidden]."""
        taps, neg_A, dt_bias, _, norm_weight = self.__dict__["_decode_constants"]
        f_b, g_b = self.__dict__["_native_gates"]
        o = native.kda_decode(self.in_proj(x[:, 0]), cache.conv_state, cache.state, taps, neg_A, dt_bias, f_b, g_b,
                              norm_weight, self.o_norm.eps, 1e-6)  # [B, D]
        return self.o_proj(o.unsqueeze(1))

    def _decode(self, x: torch.Tensor, cache: KDACache) -> torch.Tensor:
        """One token per sequence: the same math as ``forward`` in as few tensor ops as possible (a decode step is
        dominated by per-op overhead). x [B, 1, hidden] -> [B, 1, hidden]."""
        B = x.shape[0]
        H, K = self.num_heads, self.head_dim
        D = H * K
        if self.in_proj is not None:  # q | k | v arrive side by side: no concatenation
            qkv, f_a, g_a, b = self.in_proj(x[:, 0]).split([3 * D, K, K, H], dim=-1)
        else:
            q, k, v, f_a, g_a, b = self._project(x[:, 0])
            qkv = torch.cat([q, k, v], dim=-1)
        # causal conv over the last W inputs of q | k | v at once; conv_state [B, W − 1, 3D] slides by one
        taps, neg_A, dt_bias, qk_scale, _ = self.__dict__.get("_decode_constants") or self._constants()
        window = torch.cat([cache.conv_state, qkv.unsqueeze(1).to(cache.conv_state.dtype)], dim=1)  # [B, W, 3D]
        cache.conv_state.copy_(window[:, 1:])
        qkv = F.silu((window.float() * taps).sum(1)).view(B, 3, H, K)
        # L2 norm of q and k in one call: x / sqrt(Σx² + eps) = rms_norm(x, eps / K) / sqrt(K); q also × K^-1/2
        qk = rms_norm(qkv[:, :2], None, 1e-6 / K) * qk_scale
        g = neg_A * F.softplus(self.f_b_proj(f_a).float().view(B, H, K) + dt_bias)  # kda_gate
        o = kda_step(qk[:, 0], qk[:, 1], qkv[:, 2], g, torch.sigmoid(b.float()), cache.state)  # [B, H, K]
        z = self.g_b_proj(g_a).view(B, H, K)
        return self.o_proj(self.o_norm(o, z, x.dtype).view(B, 1, D))
