"""MXFP8 (OCP Microscaling) as MLX stores it: one E4M3 byte per weight with one E8M0 power-of-two scale per 32.

Format (``mx.quantize(w, mode="mxfp8")``, mlx 0.32.4; mlx-lm 0.32.2 writes it with ``--q-mode mxfp8``):

    weight  uint32 [..., K/4]    4 E4M3 bytes per word, element i in bits 8·(i mod 4) … 8·(i mod 4)+7
    scales  uint8  [..., K/32]   biased exponent e + 127; no biases
    w = E4M3(byte) · 2^(scale − 127)

Quantizing as mlx 0.32.4 does on CPU: e = clamp(⌈log2(amax / 448)⌉, −127, 127) (rounded *up*, so no element
saturates; a block whose amax / 448 is 0 gets e = 0; for fp16 input amax / 448 is first rounded to fp16), then each w / 2^e is cast to E4M3 with round-half-to-even (subnormals
included), which is what ``torch.float8_e4m3fn`` does. The byte stream is the 8-bit case of ``affine.pack``.

``dequantize_reference`` (bytes read through ``unpack_reference``, scales repeated per weight) is the oracle for
``dequantize`` (per-group broadcast); the modules that use them are in ``kimi_lm.quant.packed``.
"""

from __future__ import annotations

import torch

from kimi_lm.quant.affine import pack, unpack_reference

GROUP = 32
BITS = 8
E4M3_MAX = 448.0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., K] float (K a multiple of 32) -> (packed uint32 [..., K/4], scales uint8 [..., K/32])."""
    if w.shape[-1] % GROUP:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of the MXFP8 group size {GROUP}")
    g = w.float().unflatten(-1, (-1, GROUP))  # [..., K/32, 32]
    ratio = g.abs().amax(-1, keepdim=True) / E4M3_MAX
    if w.dtype == torch.float16:  # mlx rounds amax / 448 to fp16 first: below 2^-14 (fp16 subnormal) that moves e
        ratio = ratio.half().float()
    e = torch.where(ratio > 0, torch.ceil(torch.log2(ratio)), torch.zeros_like(ratio)).clamp(-127, 127)
    # exact division (power-of-two scale); the clamp only matters when e hit its −127 floor, where mlx saturates
    x = (g / torch.exp2(e)).clamp(-E4M3_MAX, E4M3_MAX)
    codes = x.to(torch.float8_e4m3fn).view(torch.uint8).flatten(-2)
    return pack(codes, BITS), (e.squeeze(-1) + 127).to(torch.uint8)


def _e4m3(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.uint8).view(torch.float8_e4m3fn).float()


def dequantize_reference(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    values = _e4m3(unpack_reference(q, BITS))
    return (values * torch.exp2(scales.float() - 127).repeat_interleave(GROUP, dim=-1)).to(dtype)


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    # four bytes per little-endian word are exactly the uint8 view of the words: no shifts needed
    values = q.contiguous().view(torch.uint8).view(torch.float8_e4m3fn).float().unflatten(-1, (-1, GROUP))
    return values.mul_(torch.exp2(scales.float() - 127).unsqueeze(-1)).flatten(-2).to(dtype)
