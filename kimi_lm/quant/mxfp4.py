"""MXFP4 (OCP Microscaling) as MLX stores it: E2M1 nibbles with one E8M0 power-of-two scale per 32 weights.

Format (``mx.quantize(w, mode="mxfp4")``, mlx 0.32.4; spec ``kimi_k2_and_quantization.md`` §5.1–§5.2):

    weight  uint32 [..., K/8]    8 E2M1 codes per word, element i in bits 4·(i mod 8) … 4·(i mod 8)+3
    scales  uint8  [..., K/32]   biased exponent e + 127; no biases
    w = E2M1[code] · 2^(byte − 127),   E2M1 = 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives (code 8 + m)

Quantizing as mlx 0.32.4 does on CPU: e = clamp(⌈log2(amax / 6)⌉, −127, 127) (round *up*, so nothing saturates; an
all-zero block gets e = 0), then each w / 2^e takes the nearest E2M1 value with ties going to the first entry of the
table (the smaller magnitude, and −0.25 -> +0). The nibble stream is the 4-bit case of ``affine.pack``.

``dequantize_reference`` (table lookup, scales repeated per weight) is the oracle for ``dequantize`` (per-group
broadcast); the modules that use them are in ``kimi_lm.quant.packed``.
"""

from __future__ import annotations

import torch

from kimi_lm.quant.affine import pack, unpack, unpack_reference

GROUP = 32
BITS = 4
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., K] float (K a multiple of 32) -> (packed uint32 [..., K/8], scales uint8 [..., K/32])."""
    if w.shape[-1] % GROUP:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of the MXFP4 group size {GROUP}")
    g = w.float().unflatten(-1, (-1, GROUP))  # [..., K/32, 32]
    ratio = g.abs().amax(-1, keepdim=True) / 6.0
    if w.dtype == torch.float16:  # mlx rounds amax / 6 to fp16 first: below 2^-14 (fp16 subnormal) that moves e
        ratio = ratio.half().float()
    e = torch.where(ratio > 0, torch.ceil(torch.log2(ratio)), torch.zeros_like(ratio)).clamp(-127, 127)
    x = g / torch.exp2(e)  # exact: a power-of-two scale
    # argmin returns the first minimum: ties go to the earlier (smaller-magnitude, positive) table entry, like mlx
    codes = (x.unsqueeze(-1) - E2M1).abs().argmin(-1).flatten(-2)
    return pack(codes, BITS), (e.squeeze(-1) + 127).to(torch.uint8)


def dequantize_reference(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    values = E2M1[unpack_reference(q, BITS).long()]
    return (values * torch.exp2(scales.float() - 127).repeat_interleave(GROUP, dim=-1)).to(dtype)


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    values = E2M1[unpack(q, BITS).long()].unflatten(-1, (-1, GROUP))
    return values.mul_(torch.exp2(scales.float() - 127).unsqueeze(-1)).flatten(-2).to(dtype)
