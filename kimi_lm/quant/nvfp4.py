"""NVFP4 as MLX stores it: E2M1 nibbles with one E4M3 (fp8) scale per 16 weights, no tensor-wide scale.

Format (``mx.quantize(w, mode="nvfp4")``, mlx 0.32.4; mlx-lm 0.32.2 writes it with ``--q-mode nvfp4`` and, without
``global_scale``, no per-tensor scale):

    weight  uint32 [..., K/8]    8 E2M1 codes per word, element i in bits 4·(i mod 8) … 4·(i mod 8)+3
    scales  uint8  [..., K/16]   an E4M3 float; no biases
    w = E2M1[code] · E4M3(scale)

Quantizing as mlx 0.32.4 does on CPU: s = E4M3(amax / 6) rounded to *nearest* (not up, unlike MXFP4, so elements
may exceed 6 and saturate), then each w / s (an fp32 division: multiplying by 1 / s instead
moves exact ties such as 3.5 off the midpoint and flips ~0.5% of codes) takes the nearest E2M1 value with ties to the
smaller magnitude, as in ``mxfp4``; a zero scale makes every code 0. Nibble packing and the E2M1 table are ``mxfp4``'s.

``dequantize_reference`` (table lookup, scales repeated per weight) is the oracle for ``dequantize``.
"""

from __future__ import annotations

import torch

from kimi_lm.quant.affine import pack, unpack, unpack_reference
from kimi_lm.quant.mxfp4 import E2M1

GROUP = 16
BITS = 4
E4M3_MAX = 448.0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., K] float (K a multiple of 16) -> (packed uint32 [..., K/8], scales uint8 E4M3 [..., K/16])."""
    if w.shape[-1] % GROUP:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of the NVFP4 group size {GROUP}")
    g = w.float().unflatten(-1, (-1, GROUP))  # [..., K/16, 16]
    ratio = g.abs().amax(-1, keepdim=True) / 6.0
    if w.dtype == torch.float16:  # mlx rounds amax / 6 to fp16 before E4M3 (a double rounding in fp16 subnormals)
        ratio = ratio.half().float()
    s8 = ratio.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)  # mlx saturates large scales to 448
    s = s8.float()
    x = torch.where(s > 0, g / s, torch.zeros_like(g))
    codes = (x.unsqueeze(-1) - E2M1).abs().argmin(-1).flatten(-2)
    return pack(codes, BITS), s8.view(torch.uint8).squeeze(-1)


def _scale(scales: torch.Tensor) -> torch.Tensor:
    return scales.contiguous().view(torch.float8_e4m3fn).float()


def dequantize_reference(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    values = E2M1[unpack_reference(q, BITS).long()]
    return (values * _scale(scales).repeat_interleave(GROUP, dim=-1)).to(dtype)


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    values = E2M1[unpack(q, BITS).long()].unflatten(-1, (-1, GROUP))
    return values.mul_(_scale(scales).unsqueeze(-1)).flatten(-2).to(dtype)
