"""The CPU backend's rotary position embedding: a decode step's rotation of queries' and keys' rope dims in one C
call (``kernels/rope.c`` rope_rotate) instead of ~15 tensor ops, swapped in for an MLA layer's
``kimi_lm.model.rope.RotaryEmbedding`` by ``CpuMultiheadLatentAttention`` (Kimi K2 / DeepSeek-V3; Kimi Linear's MLA
has no rope).

Reference: ``kimi_lm/model/rope.py`` (the oracle; tests compare).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kimi_lm.cpu import native
from kimi_lm.cpu.native import _DTYPES, _F, _I, _L, _P
from kimi_lm.model.rope import RotaryEmbedding

C_MAX_ROWS = 64  # tokens per call up to which the C rotation runs (a decode step's; prefill keeps the tensor ops)


@functools.cache
def _rope_library() -> ctypes.CDLL:
    lib = native.library()
    lib.rope_rotate.argtypes = [_L, _L, _L, _I, _I, _P, _L, _L, _P, _L, _P, _F, _P]
    lib.rope_rotate.restype = None
    return lib


class CpuRotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` whose rotation of a few tokens runs in C; the same tables and factors (adopted)."""

    @classmethod
    def of(cls, rope: RotaryEmbedding) -> CpuRotaryEmbedding:
        new = cls.__new__(cls)
        new.__dict__.update(rope.__dict__)
        new.inv_freq_fp32 = rope.inv_freq.float().contiguous()
        return new

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] or [B, T, heads, dim], positions [B or 1, T] -> rotated x (contiguous), as the plain one."""
        if not (x.dim() in (3, 4) and x.stride(-1) == 1 and x.device.type == "cpu" and x.dtype in _DTYPES
                and positions.dtype == torch.int64 and positions.device.type == "cpu" and positions.dim() == 2
                and x.shape[0] * x.shape[1] <= C_MAX_ROWS and native.library() is not None):
            return super().__call__(x, positions)
        B, T = x.shape[:2]
        if T == 1:
            row_stride = x.stride(0)  # rows (b, t) are the sequences
        elif B == 1 or x.stride(0) == T * x.stride(1):
            row_stride = x.stride(1)
        else:
            return super().__call__(x, positions)
        positions = positions.expand(B, T)  # one row of positions may serve every sequence
        if not positions.is_contiguous():
            positions = positions.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype)
        _rope_library().rope_rotate(B * T, x.shape[2] if x.dim() == 4 else 1, self.dim, int(self.interleaved),
                                    _DTYPES[x.dtype], x.data_ptr(), row_stride, x.stride(2) if x.dim() == 4 else 0,
                                    positions.data_ptr(), 1, self.inv_freq_fp32.data_ptr(), self.cos_sin_factor,
                                    out.data_ptr())
        return out
