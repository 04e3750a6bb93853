"""The CPU backend's Multi-head Latent Attention: the query and latent products of x as one oneDNN call, the absorbed
form's two halves of kv_b kept contiguous, and decode shapes chosen for the CPU's matmul libraries. Swapped in for
``kimi_lm.model.mla.MultiheadLatentAttention`` by ``kimi_lm.cpu.prepare``; the plain layer is the oracle.

* ``project``: q_proj (or q_a_proj) and kv_a_proj_with_mqa read the same x: one packed product (each oneDNN call
  costs ≈ 15–20 µs of set-up in a decode step); quantized, one C call reading both in place (``FusedProducts``).
* ``absorbed_weights``: W_UK and W_UVᵀ cut once from kv_b's weight as contiguous copies (one extra copy of kv_b), so
  each decode product reads exactly its half; a quantized kv_b is rebuilt per call by the plain layer instead.
* ``decode_history``: bf16/fp16 matmuls run on oneDNN, which JIT-builds a kernel for every new shape (≈ 0.5 ms here),
  and a decode step's history grows by one token per step; rounding the history up to a multiple of 64 tokens with
  spare (masked) buffer rows lets one kernel serve 64 steps. fp32 runs on MKL, which builds nothing per shape.
* ``attend_absorbed``: one query per sequence (a decode step) runs in one C call (``kernels/mla.c`` mla_decode: the
  kv_b absorption, scores, softmax, the weighted history and the W_UV product, the same roundings) instead of ~45
  tensor ops per layer; the history is read once per group of heads (up to 8 MiB of it per sequence: ~7k tokens in
  bf16, where it stays in the caches). Other shapes take the plain layer's path.
* ``attend_latent``: an fp32 decode over exactly its history goes through SDPA's fused CPU kernel, which reads the
  history once per block for both products instead of twice (4 heads at 1k tokens: 515 -> 421 µs; 32 heads:
  3.3 -> 2.9 ms at 4k, 30 -> 21 ms at 32k). In bf16 it is slower than the two matmuls, so fp32 only.

Reference: DeepSeek-V3 ``inference/model.py`` (absorb); PyTorch ``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.cache import MLACache
from kimi_lm.cpu import native
from kimi_lm.cpu.native import _DTYPES
from kimi_lm.cpu.onednn import OneDNNFusedLinear, OneDNNLinear
from kimi_lm.cpu.products import FusedProducts, fusable
from kimi_lm.cpu.rope import CpuRotaryEmbedding
from kimi_lm.model.mla import MultiheadLatentAttention

DECODE_BUCKET = 64  # tokens: half-precision decode histories are padded to a multiple of this
# Histories up to this many bytes per sequence decode in C (mla.c reads one twice, from the caches while it fits in
# them); longer ones take the plain path, whose two products stream it once each on all threads.
C_DECODE_MAX_HISTORY = 8 << 20
SPLIT_ROWS = 64  # history rows per thread below which a one-sequence decode step is not split


class CpuMultiheadLatentAttention(MultiheadLatentAttention):
    """``MultiheadLatentAttention`` for CPU inference (see the module docstring). Adopts the plain layer's modules
    under the same names; a fused ``in_proj`` writes its parts back under their own names in state_dict."""

    def __init__(self, layer: MultiheadLatentAttention):
        nn.Module.__init__(self)
        for name in ("num_heads", "nope_dim", "pe_dim", "v_dim", "latent_dim", "scale", "rope", "q_lora_rank"):
            setattr(self, name, getattr(layer, name))
        if self.rope is not None and native.library() is not None:  # a decode step's rotation in one C call
            self.rope = CpuRotaryEmbedding.of(self.rope)
        for name, module in layer.named_children():
            setattr(self, name, module)
        q_name = "q_proj" if self.q_lora_rank is None else "q_a_proj"
        parts = {q_name: getattr(layer, q_name), "kv_a_proj_with_mqa": layer.kv_a_proj_with_mqa}
        self.in_proj = None
        if all(type(p) is OneDNNLinear for p in parts.values()) and len({p.packed.dtype for p in parts.values()}) == 1:
            self.in_proj = OneDNNFusedLinear(parts, "in_proj")
            for name in parts:
                delattr(self, name)
        elif fusable(list(parts.values())):  # quantized: one C call reads both, the parts stay this layer's modules
            self.in_proj = FusedProducts(list(parts.values()))
        kv_b = layer.kv_b_proj
        kept = None
        if type(kv_b) in (nn.Linear, OneDNNLinear):  # a plain weight: keep the two halves (quantized: per call)
            weight = kv_b.weight.detach() if type(kv_b) is nn.Linear else kv_b.dense_weight()
            kept = self._split_kv_b(weight, contiguous=True)
        self.register_buffer("w_uk", None if kept is None else kept[0], persistent=False)
        self.register_buffer("w_uv_t", None if kept is None else kept[1], persistent=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.in_proj is None:
            return super().project(x)
        return self.in_proj(x).split(self.in_proj.sizes, dim=-1)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w_uk is not None and self.w_uk.dtype == dtype:
            return self.w_uk, self.w_uv_t
        return super().absorbed_weights(dtype)

    def decode_history(self, cache: MLACache, history: torch.Tensor) -> torch.Tensor:
        if history.dtype == torch.float32 or not hasattr(cache, "padded"):
            return history
        padded = cache.padded(DECODE_BUCKET)
        return history if padded is None else padded

    def attend_absorbed(self, q: torch.Tensor, latent, past: int | None = None) -> torch.Tensor:
        """q [B, 1, H, nope + pe] against latent [B, S, C + pe] (rows past ``past`` + 1 are padding), or against each
        sequence's own history (a list of B [S_b, C + pe]: a batched step of caches of their own), in one C call;
        other shapes (several queries) as the plain layer."""
        if isinstance(latent, torch.Tensor):
            histories = None if past is None else [latent[b, : past + 1] for b in range(latent.shape[0])]
        else:
            histories = latent
        if (q.shape[1] != 1 or histories is None or q.device.type != "cpu" or q.dtype not in _DTYPES
                or native.library() is None or not all(h.dtype == q.dtype and h.stride(-1) == 1 and h.stride(0) == h.shape[1]
                           and h.numel() * h.element_size() <= C_DECODE_MAX_HISTORY for h in histories)):
            return super().attend_absorbed(q, latent, past)  # the C call copies a strided query once, below
        B, _, H, _ = q.shape
        w_uk, w_uv_t = (w.contiguous() for w in self.absorbed_weights(q.dtype))
        q = q.contiguous()
        out = torch.empty(B, 1, H, self.v_dim, dtype=q.dtype)
        threads = torch.get_num_threads()
        lengths = [h.shape[0] for h in histories]
        # fewer sequences than threads: each history split into row ranges (at least SPLIT_ROWS each) read by
        # different threads, so that every thread has work at batch 1 (mla.c splits the per-head work by head)
        splits = max(1, min(-(-threads // B), min(lengths) // SPLIT_ROWS))
        if _mla_library().mla_decode(B, H, self.nope_dim, self.pe_dim, self.latent_dim, self.v_dim,
                                     int(q.dtype == torch.bfloat16), q.data_ptr(),
                                     (ctypes.c_void_p * B)(*(h.data_ptr() for h in histories)),
                                     (ctypes.c_int64 * B)(*lengths), w_uk.data_ptr(), w_uv_t.data_ptr(), self.scale,
                                     out.data_ptr(), splits, threads):
            raise MemoryError("mla_decode: could not allocate its scratch memory")
        return out

    def attend_latent(self, q_full: torch.Tensor, history: torch.Tensor, T: int, past: int) -> torch.Tensor:
        if T == 1 and history.shape[0] == past + 1 and history.dtype == torch.float32:
            o = F.scaled_dot_product_attention(q_full[None, None], history[None, None], history[None, None],
                                               scale=self.scale)
            return o[0, 0, :, : self.latent_dim]
        return super().attend_latent(q_full, history, T, past)


@functools.cache
def _mla_library() -> ctypes.CDLL:
    lib = native.library()
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.mla_decode.argtypes = [L, L, L, L, L, L, I, P, P, P, P, P, ctypes.c_float, P, L, I]
    lib.mla_decode.restype = I
    return lib
