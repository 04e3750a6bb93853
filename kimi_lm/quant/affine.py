"""MLX affine quantization: b-bit codes (b = 2, 3, 4, 5, 6, 8) with a scale and a bias per group of g weights.

Format (``mx.quantize(w, group_size=g, bits=b)``, mlx 0.32.4; spec ``kimi_k2_and_quantization.md`` §5.3): along the
last axis, each group of g consecutive weights w_i is stored as codes q_i ∈ [0, 2^b − 1] with

    w_i ≈ scale · q_i + bias                       scale, bias in the model dtype, one per group

    N = 2^b − 1; scale = max((w_max − w_min) / N, 1e−7)
    edge = w_min if |w_min| > |w_max| else w_max (and then scale is made negative)
    q0 = round(edge / scale); if q0 ≠ 0: scale = edge / q0, bias = edge, else bias = 0
    q_i = clamp(round((w_i − bias) / scale), 0, N)      (round half to even, as mlx's CPU backend)

so the larger-magnitude end of the range is exact and scales may be negative. The codes form one little-endian bit
stream per row (element i at bit offset i·b) stored as uint32 words, [..., K] -> [..., K·b/32].

Notable features:
* ``pack`` / ``unpack`` are the fast bit-stream codec (8 codes = b whole bytes, decoded with shifts);
  ``unpack_reference`` reads the stream bit by bit and is the oracle (tests/test_mlx_quant.py).
* ``dequantize_reference`` expands scales per weight with ``repeat_interleave``; ``dequantize`` broadcasts per group.
  Modules that use them live in ``kimi_lm.quant.packed`` (shared by every MLX mode).
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def check(bits: int, group_size: int, where: str = "affine quantization") -> None:
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"{where}: bits must be one of {BITS} and group size one of {GROUP_SIZES}; "
                         f"found bits={bits}, group_size={group_size}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., K] (integers < 2^bits, K·bits a multiple of 32) -> uint32 words [..., K·bits/32]."""
    *lead, K = codes.shape
    if K * bits % 32:
        raise ValueError(f"cannot pack {K} codes of {bits} bits into whole uint32 words")
    # 8 codes fill exactly `bits` bytes: build each 8-code chunk as one 64-bit integer, then split it into bytes
    chunk = codes.to(torch.int64).reshape(*lead, K // 8, 8) << (torch.arange(8) * bits)
    word = chunk.sum(-1, keepdim=True)  # [..., K/8, 1], at most 64 bits
    octets = (word >> (torch.arange(bits) * 8)) & 0xFF  # little-endian bytes of the chunk
    return octets.to(torch.uint8).reshape(*lead, K * bits // 8).view(torch.uint32)


def unpack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 words [..., W] -> codes [..., W·32/bits] as int32 (fast path of ``unpack_reference``)."""
    *lead, W = q.shape
    octets = q.contiguous().view(torch.uint8).reshape(*lead, W * 4 // bits, bits).to(torch.int64)
    chunk = (octets << (torch.arange(bits) * 8)).sum(-1, keepdim=True)  # 8 codes as one 64-bit integer
    codes = (chunk >> (torch.arange(8) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, W * 32 // bits).to(torch.int32)


def unpack_reference(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The oracle: every bit of the little-endian stream, then code i = Σ_j bit[i·b + j] · 2^j."""
    *lead, W = q.shape
    octets = q.contiguous().view(torch.uint8).to(torch.int32)  # [..., 4W]
    stream = (octets.unsqueeze(-1) >> torch.arange(8)) & 1  # [..., 4W, 8]: bit j of byte k = stream bit 8k + j
    stream = stream.reshape(*lead, W * 32 // bits, bits)
    return (stream << torch.arange(bits)).sum(-1).to(torch.int32)


def quantize(w: torch.Tensor, bits: int = 4, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [..., K] float -> (packed uint32 [..., K·b/32], scales [..., K/g], biases [..., K/g]) in W's dtype."""
    check(bits, group_size)
    if w.shape[-1] % group_size:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of the group size {group_size}")
    n = float((1 << bits) - 1)
    g = w.float().unflatten(-1, (-1, group_size))  # [..., K/g, g]
    w_max, w_min = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    scale = ((w_max - w_min) / n).clamp_min(1e-7)
    use_min = w_min.abs() > w_max.abs()
    scale = torch.where(use_min, scale, -scale)
    edge = torch.where(use_min, w_min, w_max)
    q0 = torch.round(edge / scale)
    nonzero = q0 != 0
    scale = torch.where(nonzero, edge / torch.where(nonzero, q0, 1.0), scale)
    bias = torch.where(nonzero, edge, torch.zeros_like(edge))
    codes = torch.round((g - bias) / scale).clamp(0, n).to(torch.int32).flatten(-2)
    return pack(codes, bits), scale.squeeze(-1).to(w.dtype), bias.squeeze(-1).to(w.dtype)


def dequantize_reference(q, scales, biases, bits: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """W = scale · q + bias with scale and bias repeated for every weight of their group."""
    codes = unpack_reference(q, bits).float()
    s = scales.float().repeat_interleave(group_size, dim=-1)
    b = biases.float().repeat_interleave(group_size, dim=-1)
    return (codes * s + b).to(dtype)


def dequantize(q, scales, biases, bits: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """Fast path of ``dequantize_reference``: codes viewed as [..., K/g, g] and scaled per group in place."""
    codes = unpack(q, bits).float().unflatten(-1, (-1, group_size))
    return codes.mul_(scales.float().unsqueeze(-1)).add_(biases.float().unsqueeze(-1)).flatten(-2).to(dtype)
