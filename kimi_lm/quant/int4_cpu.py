"""MLX affine 4-bit weights on PyTorch's CPU int4 GEMM kernel (``aten._weight_int4pack_mm_for_cpu``).

The packed forward of ``packed.py`` dequantizes a weight tile on every call, which in eager PyTorch costs far more than
the memory it saves when decoding one token at a time. PyTorch ships a CPU kernel that multiplies directly with 4-bit
codes and per-group scale and zero point, w = (q − 8)·scale + zero. MLX's affine form is w = scale·q + bias, the
same line with zero = bias + 8·scale, so an affine 4-bit module can run on it unchanged in meaning.

The kernel wants its own code layout (made by ``aten._convert_weight_to_int4pack_for_cpu``, the same byte count as
MLX's uint32 words, codes reordered in blocks). A converted module keeps its codes only in that layout, so memory does
not grow beyond the small ``scales_zeros`` table ([K/G, N, 2]); ``mlx_codes`` restores MLX's packing when the module
is saved or densified, through the kernel layout's permutation, found by packing index probes with the same op.

Reference: PyTorch ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``; gpt-fast / torchao int4 weight-only quantization.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kimi_lm.quant import affine

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel accepts


def supported(bits: int, group_size: int, out_features: int, in_features: int) -> bool:
    has_op = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return has_op and bits == 4 and group_size in GROUP_SIZES and out_features % 16 == 0 and in_features % 2 == 0


def to_kernel(q: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, dtype: torch.dtype):
    """MLX uint32 codes [N, K/8] + scales, biases [N, K/G] -> (kernel codes uint8 [N, K/2], scales_zeros [K/G, N, 2])."""
    codes = affine.unpack(q, 4)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s, b = scales.float(), biases.float()
    scales_zeros = torch.stack([s, b + 8 * s], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scales_zeros


@lru_cache(maxsize=16)
def _source_index(N: int, K: int) -> torch.Tensor:
    """For every nibble of the kernel layout (low nibble first), the flat index n·K + k of the code it holds."""
    flat = torch.arange(N * K, dtype=torch.int64).view(N, K)
    index = torch.zeros(N * K, dtype=torch.int64)
    digit = 0
    while (1 << (4 * digit)) < N * K:  # one packing per hex digit of the index
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((flat >> (4 * digit)) & 15).to(torch.int32), 1)
        nibbles = torch.stack([p & 15, p >> 4], dim=-1).reshape(-1).to(torch.int64)
        index |= nibbles << (4 * digit)
        digit += 1
    return index


def mlx_codes(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Kernel layout [N, K/2] -> MLX uint32 words [N, K/8] (exact inverse of ``to_kernel``'s code packing)."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int32)
    codes = torch.empty(N * K, dtype=torch.int32)
    codes[_source_index(N, K)] = nibbles
    return affine.pack(codes.view(N, K).to(torch.uint8), 4)


def matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = x Wᵀ for x [..., K] with the kernel; computed in ``scales_zeros``' dtype, returned in x's."""
    N = packed.shape[0]
    flat = x.reshape(-1, x.shape[-1]).to(scales_zeros.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group_size, scales_zeros)
    return y.to(x.dtype).view(*x.shape[:-1], N)
