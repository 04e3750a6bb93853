"""ctypes bindings of the products with MLX-quantized weights read in their packed bytes (``kernels/quant.c``), part
of the one library ``native.py`` builds; used by the backend's quantized modules (``cpu/quant.py``).

Reference: ``ctypes``; the MLX packings in ``kimi_lm.quant`` (affine, mxfp4, mxfp8, nvfp4).
"""

from __future__ import annotations

import ctypes
import functools
import itertools

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


def expert_rows(counts: list[int], experts: list[int]) -> tuple[ctypes.Array, ctypes.Array]:
    """(first row in the expert-grouped rows, row count) of each of ``experts`` as int64 arrays for the C calls
    (plain Python: a decode step's few experts cost no tensor ops)."""
    firsts = list(itertools.accumulate(counts, initial=0))
    n = len(experts)
    return (ctypes.c_int64 * n)(*(firsts[e] for e in experts)), (ctypes.c_int64 * n)(*(counts[e] for e in experts))


def expert_addresses(part: tuple) -> list:
    """part = (stacked (weight, scales, biases or None), each [E, rows, …] contiguous; first row) -> per tensor
    (address of expert 0's first row, bytes per expert), None for a missing one."""
    tensors, row0 = part
    return [None if t is None else (t.data_ptr() + row0 * t.stride(1) * t.element_size(), t.stride(0) * t.element_size())
            for t in tensors]


def quant_experts_rows(xs: torch.Tensor, counts: list[int], experts: list[int], gate: tuple, up: tuple, down: tuple,
                       specs: tuple[tuple[int, int, int], tuple[int, int, int]], intermediate: int) -> torch.Tensor:
    """``moe_experts_rows`` for MLX-packed experts: ``gate`` / ``up`` / ``down`` = ((weight, scales, biases or None)
    stacked over experts [E, rows, …], contiguous; the part's first row in them: I for up inside a gate|up stack);
    ``specs`` the (mode code, bits, group) of gate|up and of down -> out [rows, hidden], those experts' rows filled.
    Each expert's addresses are computed, not sliced (a decode step's experts in no tensor ops)."""
    n = len(experts)
    starts, sizes = expert_rows(counts, experts)
    out = torch.empty_like(xs)
    at = lambda bases, e: [None if b is None else b[0] + e * b[1] for b in bases]  # noqa: E731
    g, u, d = expert_addresses(gate), expert_addresses(up), expert_addresses(down)
    gate_up = (_P * (6 * n))(*(a for e in experts for a in (*at(g, e), *at(u, e))))
    downs = (_P * (3 * n))(*(a for e in experts for a in at(d, e)))
    scale_bf16 = int(gate[0][1].dtype == torch.bfloat16)
    status = quant_library().quant_experts_rows(
        n, xs.shape[-1], intermediate, _DTYPES[xs.dtype], scale_bf16, (_I * 3)(*specs[0]), (_I * 3)(*specs[1]),
        starts, sizes, gate_up, downs, xs.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError("quant_experts_rows: could not allocate its scratch memory")
    return out
