"""Products the C kernels read in place, whatever packed them: a ``Reader`` per product module (oneDNN-packed
``OneDNNLinear``, or an MLX-quantized ``CpuPackedLinear``), and ``FusedProducts``: several products of the same
input in one C call (``kernels/gemv.c`` fused_products).

A quantized model's layers use these the way a bf16 model's use one oneDNN-packed matrix: KDA's six input products
(``kda.py``), MLA's query and latent products (``mla.py``), an MLP's gate and up (``layers.py``) each become one call
that reads the parts' packed bytes where they are (no fused copy: the parts stay the layer's modules under their own
names, so ``state_dict`` is unchanged), and KDA's decode kernel reads its gate products' packed bytes itself. Many
rows (prefill) run the parts' own forwards (dequantized tiles on BLAS, or oneDNN) and concatenate.

Reference: ``kernels/common.h`` (qweight, LAYOUT_QUANT); the parts' own forwards are the oracle (tests compare).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from kimi_lm.cpu import native, quant_kernels
from kimi_lm.cpu.native import _DTYPES, _I, _L, _P
from kimi_lm.cpu.onednn import OneDNNLinear

LAYOUT_QUANT = 2  # kernels/common.h: the weight pointer is a qweight
FUSED_MAX_ROWS = 8  # kernels/common.h ROWS_MAX: rows per fused call (a decode step, or a few sequences')


class QWeight(ctypes.Structure):
    """``kernels/common.h`` qweight: an MLX packing's tensors, read in place."""
    _fields_ = [("mode", ctypes.c_int), ("bits", ctypes.c_int), ("group", ctypes.c_long), ("O", ctypes.c_long),
                ("I", ctypes.c_long), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("biases", ctypes.c_void_p), ("scale_bf16", ctypes.c_int)]


class Reader:
    """Where the C kernels read one product module's weight: ``layout`` (0 / 1 oneDNN, 2 quantized) and ``pointer()``
    (its address now: packed memory, or a ``QWeight``), ``out_features`` / ``in_features``, and ``dtype``: the input
    dtype a oneDNN weight needs (None: a quantized weight takes fp32 and bf16)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.out_features, self.in_features = module.out_features, module.in_features
        if isinstance(module, OneDNNLinear):
            self.layout, self.dtype = module.gemv.layout, module.packed.dtype
        else:
            self.layout, self.dtype = LAYOUT_QUANT, None  # reads fp32 or bf16 inputs
        self._struct = None  # the QWeight, made at the first call (holds addresses: never copied)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_struct": None}  # a copy (deepcopy) describes its own module's tensors anew

    def pointer(self) -> int:
        m = self.module
        if self.layout != LAYOUT_QUANT:
            return m.gemv.pointer()
        q = self._struct
        if q is None or q.w != m.weight.data_ptr():  # first call, or the module's tensors were replaced
            s, biases = m.spec, m.stored("biases")  # None: none kept (symmetric, derived in C)
            q = QWeight(quant_kernels.QUANT_MODES[s.mode], s.bits, s.group_size, m.out_features, m.in_features,
                        m.weight.data_ptr(), m.scales.data_ptr(), None if biases is None else biases.data_ptr(),
                        int(m.scales.dtype == torch.bfloat16))
            self._struct = q
        return ctypes.addressof(q)


def reader(module: nn.Module) -> Reader | None:
    """A ``Reader`` for ``module``, or None where the kernels cannot read it in place (a oneDNN layout without a C
    reader, a format or layout the quantized kernels do not take, no kernels)."""
    from kimi_lm.cpu.quant import CpuPackedLinear  # quant.py imports this module's users

    if native.library() is None:
        return None
    if type(module) is OneDNNLinear:
        return Reader(module) if module.gemv is not None else None
    if type(module) is CpuPackedLinear:
        return Reader(module)
    return None


class FusedProducts:
    """Several product modules that read the same input, as one: ``forward(x)`` = the parts' outputs side by side
    [..., Σ out] (``sizes`` splits it). Up to 8 rows: one C call (``fused_products``) reading every part's weight in
    place, output rows shared among threads. More rows: each part's own forward, concatenated. Not a module: the parts
    stay their layer's children (names and state_dict unchanged); this only holds references to them."""

    def __init__(self, parts: list[nn.Module]):
        self.readers = [reader(p) for p in parts]
        assert all(r is not None for r in self.readers), "FusedProducts: a part without a C reader (see fusable)"
        self.parts, self.sizes = parts, [p.out_features for p in parts]
        self.in_features = parts[0].in_features
        self.dtype = next((r.dtype for r in self.readers if r.dtype is not None), None)
        n = len(parts)
        self._layouts = (_I * n)(*(r.layout for r in self.readers))
        self._outs = (_L * n)(*self.sizes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not (0 < rows <= FUSED_MAX_ROWS and self.dtype in (None, x.dtype) and native.supports(x)):
            return torch.cat([p(x) for p in self.parts], dim=-1)
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], sum(self.sizes), dtype=x.dtype)
        weights = (_P * len(self.parts))(*(r.pointer() for r in self.readers))
        if native.library().fused_products(len(self.parts), self._layouts, weights, self._outs, self.in_features,
                                           _DTYPES[x.dtype], rows, x.data_ptr(), y.data_ptr(),
                                           torch.get_num_threads()):
            raise MemoryError("fused_products: could not allocate its scratch memory")
        return y


def fusable(parts: list[nn.Module]) -> bool:
    """Whether ``FusedProducts`` can take these parts: each with a C reader, one input width, one dtype."""
    readers = [reader(p) for p in parts]
    return (all(r is not None for r in readers) and len({r.in_features for r in readers}) == 1
            and len({r.dtype for r in readers} - {None}) <= 1)
