"""Kimi Delta Attention layer: projections, short conv, gates and gated RMSNorm around the KDA recurrence.

    q, k, v = SiLU(causal depthwise conv₄(W_{q,k,v} x))           # per channel, 4 taps, no bias
    q, k    = L2-normalise per head;  q *= K^-1/2
    g       = −exp(A_log) · softplus(f_b(f_a(x)) + dt_bias)         # per head and key channel, fp32
    β       = sigmoid(b_proj(x))                                    # per head, fp32
    o       = KDA(q, k, v, g, β)                                    # ops/kda.py (chunked) or one recurrent step
    out     = o_proj( RMSNorm_head(o) · w · sigmoid(g_b(g_a(x))) )

Parameter names are the official checkpoint's (``q_conv1d``, ``f_a_proj``, ``A_log`` [1,1,H,1], ``dt_bias`` [H·K]).
The conv, the gates, the recurrence and the gated norm run in fp32 whatever the model dtype. This is the plain
PyTorch layer and the oracle of the CPU backend's ``kimi_lm.cpu.kda.CpuKimiDeltaAttention`` (the same math in C).

References: spec ``shared/specs/kimi_linear.md`` §5; fla v0.4.0 ``fla/layers/kda.py``; transformers
``modeling_kimi_linear.py`` (``KimiLinearDeltaAttention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.cache import KDACache, per_sequence
from kimi_lm.config import KimiLinearConfig
from kimi_lm.model.layers import GatedRMSNorm
from kimi_lm.ops.kda import kda_forward, kda_gate, l2_normalize


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

    @per_sequence
    def forward(self, x: torch.Tensor, cache: KDACache | None = None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; advances ``cache`` (conv tail and recurrent state) if given."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        D = H * K
        tails = [None] * 3 if cache is None else cache.conv_state.split(D, dim=-1)  # q, k, v: [B, W − 1, D]
        q = self._short_conv(self.q_proj(x), self.q_conv1d, tails[0])
        k = self._short_conv(self.k_proj(x), self.k_conv1d, tails[1])
        v = self._short_conv(self.v_proj(x), self.v_conv1d, tails[2])
        q, k, v = (t.view(B, T, H, K) for t in (q, k, v))
        q = l2_normalize(q, scale=K**-0.5)
        k = l2_normalize(k)
        g = self.log_decay(x)
        beta = torch.sigmoid(self.b_proj(x).float())  # [B, T, H]
        o, final_state = kda_forward(q, k, v, g, beta, initial_state=None if cache is None else cache.state)
        if cache is not None:
            cache.state.copy_(final_state)
        z = self.output_gate(x).view(B, T, H, K)
        return self.o_proj(self.o_norm(o, z, x.dtype).reshape(B, T, D))

    # the two gates, as methods: Kimi K3's variant (model/kimi_k3.py) replaces them and nothing else
    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> g [B, T, H, K] fp32, the per-step log decay."""
        H, K = self.num_heads, self.head_dim
        f = self.f_b_proj(self.f_a_proj(x)).view(*x.shape[:2], H, K)
        return kda_gate(f, self.A_log.view(H, 1), self.dt_bias.view(H, K))

    def output_gate(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> z [B, T, H·K], the gate of the output norm (sigmoid applied there)."""
        return self.g_b_proj(self.g_a_proj(x))
