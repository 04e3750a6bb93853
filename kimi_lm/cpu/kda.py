"""The CPU backend's Kimi Delta Attention layer: the six input products as one oneDNN call and everything between
them and o_proj in C (``cpu/native.py``), swapped in for ``kimi_lm.model.kda.KimiDeltaAttention`` by
``kimi_lm.cpu.prepare``. The plain layer is the oracle (tests compare the two).

The six input products are one product: for oneDNN-packed weights one packed matrix (``OneDNNFusedLinear``), for
MLX-quantized ones (or a mix) one C call reading each part's packed bytes in place (``products.FusedProducts``); the
gate products f_b and g_b are read in place by the decode kernel either way (``products.Reader``).

* Decode (one token with a cache): one C call (``kda_decode``) does the conv over the cached tail, SiLU, the q/k L2
  norms, the decay gate (its f_b product read from the packed weight in place), β, the delta-rule step on the state,
  the output gate's g_b product and the gated norm: ~40 fewer tensor ops per token than the PyTorch step.
* Prefill: three calls: conv/norms/gates for all tokens (``kda_prefill_inputs``), the recurrence as a scan with a
  [K, 64] slice of the state in L1 for all T tokens (``kda_scan``: ≈ 3 ms per layer at T = 1024, 4 heads of 128, on 2
  cores, against 15–18 ms for the chunked PyTorch form, which stays for training), and the gated norm. A packed
  prefill (several sequences' tokens in one row, ``PackedLayerCache``) runs its products over all of them at once and
  the conv and scan per sequence, each with its own cache.

Reference: spec ``shared/specs/kimi_linear.md`` §5; fla ``ops/kda`` (naive recurrence, fused gated norm).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.cache import KDACache, PackedLayerCache, sequence_pieces
from kimi_lm.cpu import native
from kimi_lm.cpu.onednn import OneDNNFusedLinear, OneDNNLinear
from kimi_lm.cpu.products import FusedProducts, fusable, reader
from kimi_lm.model.kda import KimiDeltaAttention

INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj")  # the fused product's order
L2_EPS = 1e-6  # inside the sqrt of q's and k's L2 norms, as the plain layer's ``l2_normalize``


def _onednn_fusable(parts: list[nn.Module]) -> bool:
    return all(type(p) is OneDNNLinear for p in parts) and len({p.packed.dtype for p in parts}) == 1


def applies(layer: KimiDeltaAttention) -> bool:
    """Whether the C path can take this layer: input products that fuse (oneDNN-packed, or any mix of products the
    kernels read in place: MLX-quantized, oneDNN with a C reader), gate products the decode kernel reads in place, a
    key dim the scan keeps on its stack, and the kernels built."""
    if native.library() is None or layer.head_dim > native.SCAN_MAX_K:
        return False
    inputs = [getattr(layer, n) for n in INPUT_PROJECTIONS]
    gates = [layer.f_b_proj, layer.g_b_proj]
    if not (_onednn_fusable(inputs) or fusable(inputs)) or any(reader(p) is None for p in gates):
        return False
    dtypes = {p.packed.dtype for p in (*inputs, *gates) if type(p) is OneDNNLinear}
    return len(dtypes) <= 1


class CpuKimiDeltaAttention(KimiDeltaAttention):
    """``KimiDeltaAttention`` for CPU inference (see the module docstring). Adopts the plain layer's parameters under
    the same names; the six input products become one ``in_proj`` (a packed matrix whose state_dict still has the
    six, or ``FusedProducts`` over the six modules kept as they are)."""

    def __init__(self, layer: KimiDeltaAttention):
        nn.Module.__init__(self)
        self.num_heads, self.head_dim, self.conv_width = H, K, W = layer.num_heads, layer.head_dim, layer.conv_width
        self.q_conv1d, self.k_conv1d, self.v_conv1d = layer.q_conv1d, layer.k_conv1d, layer.v_conv1d
        self.A_log, self.dt_bias, self.o_norm = layer.A_log, layer.dt_bias, layer.o_norm
        self.f_b_proj, self.g_b_proj, self.o_proj = layer.f_b_proj, layer.g_b_proj, layer.o_proj
        inputs = {n: getattr(layer, n) for n in INPUT_PROJECTIONS}
        if _onednn_fusable(list(inputs.values())):
            self.in_proj = OneDNNFusedLinear(inputs, "in_proj")
        else:  # quantized parts stay this layer's modules (state_dict unchanged); one C call reads them all
            for name, part in inputs.items():
                setattr(self, name, part)
            self.in_proj = FusedProducts(list(inputs.values()))
        self.f_b_reader, self.g_b_reader = reader(self.f_b_proj), reader(self.g_b_proj)
        # the constants the kernels read, in fp32: conv taps of q | k | v [W, 3D], −exp(A_log) [H, 1], dt_bias
        # [H, K], the gated norm's weight [K]
        taps = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]).view(3 * H * K, W)
        self.register_buffer("taps", taps.T.float().contiguous(), persistent=False)
        self.register_buffer("neg_A", -self.A_log.detach().float().view(H, 1).exp(), persistent=False)
        self.register_buffer("dt_bias_fp32", self.dt_bias.detach().float().view(H, K).contiguous(), persistent=False)
        self.register_buffer("norm_weight", self.o_norm.weight.detach().float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, cache: KDACache | None = None, positions=None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; advances ``cache`` if given (as the plain layer), or each sequence's
        cache of a packed prefill (``PackedLayerCache``)."""
        x = x.contiguous()
        rows = getattr(cache, "rows", None)  # a batched step's per-sequence caches (kimi_lm.batching)
        if rows is not None and x.shape[1] == 1 and all(native.supports(r.conv_state, r.state) for r in rows):
            return self._decode(x, cache, [r.conv_state for r in rows], [r.state for r in rows])
        caches = cache.caches if isinstance(cache, PackedLayerCache) else [cache]
        if any(c is not None and not native.supports(c.conv_state, c.state) for c in caches):
            raise ValueError("a KDA cache for the CPU kernels must be contiguous CPU tensors of the model's dtype "
                             "(conv) and fp32 (state); make it with model.make_cache")
        if isinstance(cache, PackedLayerCache):
            return self._prefill(x, None, cache)
        if cache is not None and x.shape[1] == 1:
            return self._decode(x, cache)
        return self._prefill(x, cache)

    def _decode(self, x: torch.Tensor, cache: KDACache, conv_rows: list | None = None,
                state_rows: list | None = None) -> torch.Tensor:
        """One token per sequence: x [B, 1, hidden] -> [B, 1, hidden]; each sequence's caches where they lie when
        given as rows (a batched step: nothing stacked or copied back)."""
        conv_state = cache.conv_state if conv_rows is None else conv_rows
        state = cache.state if state_rows is None else state_rows
        o = native.kda_decode(self.in_proj(x[:, 0]), conv_state, state, self.taps, self.neg_A,
                              self.dt_bias_fp32, self.f_b_reader, self.g_b_reader, self.norm_weight,
                              self.o_norm.eps, L2_EPS)  # [B, D]
        return self.o_proj(o.unsqueeze(1))

    def _prefill(self, x: torch.Tensor, cache: KDACache | None, packed: PackedLayerCache | None = None
                 ) -> torch.Tensor:
        """T tokens: x [B, T, hidden] -> [B, T, hidden]. ``packed``: a packed prefill's [1, T] row of several
        sequences: the products run over all T tokens at once, the conv and the scan per sequence with its cache."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        D = H * K
        proj = self.in_proj(x)  # [B, T, 3D + 2K + H]: q | k | v | f_a | g_a | b
        f_a, g_a = proj[..., 3 * D : 3 * D + K], proj[..., 3 * D + K : 3 * D + 2 * K]
        f_b = self.f_b_proj(f_a.contiguous()).contiguous()
        outs = []
        for c, s0, s1 in sequence_pieces(cache if packed is None else packed, T):  # a [1, T] row's slice along T stays contiguous
            q, k, v, decay, beta = native.kda_prefill_inputs(proj[:, s0:s1], None if c is None else c.conv_state,
                                                             f_b[:, s0:s1], self.taps, self.neg_A, self.dt_bias_fp32,
                                                             L2_EPS)
            state = x.new_zeros(B, H, K, K, dtype=torch.float32) if c is None else c.state
            outs.append(native.kda_scan(q, k, v, decay, beta, state))  # [B, T_c, H, K] fp32, state advanced in place
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.o_proj(native.gated_rms_norm(o, self.g_b_proj(g_a.contiguous()).contiguous(), self.norm_weight,
                                                 self.o_norm.eps))
