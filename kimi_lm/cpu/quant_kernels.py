"""ctypes bindings of the products with MLX-quantized weights read in their packed bytes (``kernels/quant.c``), part
of the one library ``native.py`` builds; used by the backend's quantized modules (``cpu/quant.py``).

Reference: ``ctypes``; the MLX packings in ``kimi_lm.quant`` (affine, mxfp4, mxfp8, nvfp4).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kimi_lm.cpu.native import _DTYPES, _I, _L, _P, library

QUANT_MODES = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}


@functools.cache
def quant_library() -> ctypes.CDLL | None:
    """``library()`` with the quantized products bound (``kernels/quant.c``), or None."""
    lib = library()
    if lib is None:
        return None
    lib.quant_matmul.argtypes = [_I, _I, _L, _L, _L, _P, _P, _P, _I, _L, _P, _I, _P, _I]
    lib.quant_matmul.restype = _I
    lib.quant_experts_rows.argtypes = [_L, _L, _L, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I]
    lib.quant_experts_rows.restype = _I
    lib.quant_dequantize.argtypes = [_I, _I, _L, _L, _L, _P, _P, _P, _I, _P, _I, _I]
    lib.quant_dequantize.restype = None
    lib.quant_use_generic.argtypes = [_I]
    lib.quant_use_generic.restype = None
    return lib


def quant_matmul(x: torch.Tensor, mode: str, bits: int, group: int, weight: torch.Tensor, scales: torch.Tensor,
                 biases: torch.Tensor | None, threads: int) -> torch.Tensor:
    """y = x Wᵀ with W in an MLX packing (``kimi_lm.quant``: weight uint32 [O, I·bits/32], scales [O, I/group]
    uint8 or the affine dtype, biases likewise) read in place: x [..., I] contiguous (fp32 / bf16) -> [..., O] in
    x's dtype; fp32 sums, one rounding; output rows shared among ``threads``."""
    O, I = weight.shape[0], scales.shape[-1] * group
    y = torch.empty(*x.shape[:-1], O, dtype=x.dtype)
    if quant_library().quant_matmul(QUANT_MODES[mode], bits, group, O, I, weight.data_ptr(), scales.data_ptr(),
                                    0 if biases is None else biases.data_ptr(), int(scales.dtype == torch.bfloat16),
                                    x.numel() // I, x.data_ptr(), _DTYPES[x.dtype], y.data_ptr(), threads):
        raise MemoryError("quant_matmul: could not allocate its scratch memory")
    return y


def quant_dequantize(mode: str, bits: int, group: int, weight: torch.Tensor, scales: torch.Tensor,
                     biases: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The dense [O, I] weight in ``dtype`` (fp32 / bf16) of an MLX packing (as ``quant_matmul``'s), rows shared among
    torch's threads: what ``kimi_lm.quant``'s dequantize gives, in one pass."""
    O, I = weight.shape[0], scales.shape[-1] * group
    out = torch.empty(O, I, dtype=dtype)
    quant_library().quant_dequantize(QUANT_MODES[mode], bits, group, O, I, weight.data_ptr(), scales.data_ptr(),
                                     0 if biases is None else biases.data_ptr(), int(scales.dtype == torch.bfloat16),
                                     out.data_ptr(), _DTYPES[dtype], torch.get_num_threads())
    return out


def quant_experts_rows(xs: torch.Tensor, counts: list[int], experts: list[int], gate: tuple, up: tuple, down: tuple,
                       specs: tuple[tuple[int, int, int], tuple[int, int, int]], intermediate: int) -> torch.Tensor:
    """``moe_experts_rows`` for MLX-packed experts: ``gate`` / ``up`` / ``down`` = (weight, scales, biases or None),
    each a function of the expert index giving its [out, …] tensors; ``specs`` the (mode code, bits, group) of gate|up
    and of down -> out [rows, hidden], those experts' rows filled."""
    n = len(experts)
    starts = torch.tensor([0] + counts[:-1]).cumsum(0)[experts].contiguous()
    sizes = torch.tensor([counts[e] for e in experts])
    out = torch.empty_like(xs)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    gate_up = (_P * (6 * n))(*(ptr(t) for e in experts for t in (*gate(e), *up(e))))
    downs = (_P * (3 * n))(*(ptr(t) for e in experts for t in down(e)))
    scale_bf16 = int(gate(experts[0])[1].dtype == torch.bfloat16)
    status = quant_library().quant_experts_rows(
        n, xs.shape[-1], intermediate, _DTYPES[xs.dtype], scale_bf16, (_I * 3)(*specs[0]), (_I * 3)(*specs[1]),
        starts.data_ptr(), sizes.data_ptr(), gate_up, downs, xs.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError("quant_experts_rows: could not allocate its scratch memory")
    return out
