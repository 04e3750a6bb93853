"""The CPU backend's FP8 block modules (Kimi K2 / DeepSeek-V3 release weights: float8 e4m3 with one fp32 scale per
128×128 block): products that read the e4m3 bytes and block scales in place (``kernels/fp8.c``), swapped in for
``kimi_lm.quant.fp8_block``'s modules by ``kimi_lm.cpu.prepare``.

The plain modules (the oracle) dequantize a tile of rows per call and multiply it on BLAS: for a decode step that
writes and reads back a bf16/fp32 copy of every weight, each step. Here:

* ``CpuFP8BlockLinear``: up to 8 rows (a decode step, a few sequences' step) in one C call that decodes each code in
  registers (AVX-512, AVX2 or a table) and sums in fp32, one byte streamed per weight; more rows (prefill): a tile of
  rows dequantized in C in one pass (bit-exact with ``fp8_block.dequantize_rows``), then BLAS / oneDNN.
* ``CpuFP8StackedExperts``: a decode step's experts (gate, up, SwiGLU, down) in one C call, experts shared among
  threads (``FewRowsInC``: ``CpuSparseMoE`` hands it a token's k experts at once); experts with many rows take the
  many-row path per product.
* MLA with an fp8 ``kv_b_proj`` is ``quant.CpuPackedMLA`` (``prepare`` picks it): its absorbed halves are dequantized
  once at load, not per step.

Each keeps the plain module's tensors (same names, same state_dict). Reference: ``kimi_lm/quant/fp8_block.py``;
tests/test_cpu_fp8.py compares every kernel and path with the plain dequantize-then-matmul.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.cpu import native
from kimi_lm.cpu.moe import FewRowsInC, merge_expert_outputs
from kimi_lm.cpu.moe_kernels import DecodeParts, described_experts
from kimi_lm.cpu.native import _DTYPES, _I, _L, _P
from kimi_lm.cpu.quant_kernels import expert_rows
from kimi_lm.model.layers import MLP
from kimi_lm.quant.fp8_block import BLOCK, FP8, TILE_ELEMENTS, FP8BlockLinear, FP8StackedExperts

LAYOUT_FP8 = 3  # kernels/common.h: moe_decode's weight pointer is an fp8_weight
DECODE_ROWS = 8  # rows up to which a product runs in C (kernels/common.h ROWS_MAX: one pass over the weight)
# kernels/fp8.c: the decoding paths, best last (avx512bf16: byte lookups + vdpbf16ps; avx512: via fp16 bits)
PATHS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}
SMALL_BYTES = 256 << 10  # codes one core reads in ~10 µs: below this a parallel region costs more than it saves


@functools.cache
def fp8_library() -> ctypes.CDLL | None:
    """``native.library()`` with the fp8 products bound (``kernels/fp8.c``), or None (no kernels here)."""
    lib = native.library()
    if lib is None:
        return None
    lib.fp8_matmul.argtypes = [_L, _L, _P, _P, _L, _P, _I, _P, _I]
    lib.fp8_matmul.restype = _I
    lib.fp8_experts_rows.argtypes = [_L, _L, _L, _I, _P, _P, _P, _P, _P, _I]
    lib.fp8_experts_rows.restype = _I
    lib.fp8_dequantize.argtypes = [_L, _L, _P, _P, _I, _P, _I]
    lib.fp8_dequantize.restype = None
    lib.fp8_limit_path.argtypes = [_I]
    lib.fp8_limit_path.restype = None
    lib.fp8_path.argtypes = []
    lib.fp8_path.restype = _I
    return lib


def path() -> str:
    """The decoding path the kernels use on this CPU (and within ``limit_path``)."""
    return {v: k for k, v in PATHS.items()}[fp8_library().fp8_path()]


def limit_path(name: str) -> None:
    """Use no better decoding path than ``name`` (a key of ``PATHS``); tests run each path this CPU has."""
    fp8_library().fp8_limit_path(PATHS[name])


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernels read these fp8 codes and fp32 scales in place: CPU, contiguous, kernels built."""
    return (fp8_library() is not None and tensors[0].dtype == FP8 and tensors[1].dtype == torch.float32
            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors))


def matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """y = x Wᵀ with W = Q·S read in place: x [..., in] contiguous fp32 / bf16, Q [out, in] e4m3, S [⌈out/128⌉,
    ⌈in/128⌉] fp32 -> [..., out] in x's dtype; fp32 sums, one rounding; output rows shared among ``threads``
    (default: torch's, as the bf16 products share theirs; one row 7168 -> 2048 on the 2-core box: 873 us on one
    thread, 401 us on two, where bf16 takes 738)."""
    O, I = q.shape
    y = torch.empty(*x.shape[:-1], O, dtype=x.dtype)
    if fp8_library().fp8_matmul(O, I, q.data_ptr(), s.data_ptr(), x.numel() // I, x.data_ptr(), _DTYPES[x.dtype],
                                y.data_ptr(), torch.get_num_threads() if threads is None else threads):
        raise MemoryError("fp8_matmul: could not allocate its scratch memory")
    return y


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = Q·S [out, in] in ``dtype`` (fp32 / bf16) in one C pass, rows shared among torch's threads: bit for bit
    ``fp8_block.dequantize_rows``. Q's first row must start a block (S its block rows)."""
    O, I = q.shape
    out = torch.empty(O, I, dtype=dtype)
    fp8_library().fp8_dequantize(O, I, q.data_ptr(), s.data_ptr(), _DTYPES[dtype], out.data_ptr(),
                                 torch.get_num_threads())
    return out


def dequantized_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Many rows (prefill): x Wᵀ with W dequantized in C a tile of rows at a time (as ``fp8_block.linear`` tiles it,
    so the model never exists dense at once), multiplied on BLAS / oneDNN."""
    out_f, in_f = q.shape
    rows = max(BLOCK, TILE_ELEMENTS // max(in_f, 1) // BLOCK * BLOCK)  # whole block rows per tile
    if rows >= out_f:
        return F.linear(x, dequantize(q, s, x.dtype))
    tiles = [F.linear(x, dequantize(q[r0 : r0 + rows], s[r0 // BLOCK : math.ceil((r0 + rows) / BLOCK)], x.dtype))
             for r0 in range(0, out_f, rows)]
    return torch.cat(tiles, dim=-1)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _adopt(new: nn.Module, old: nn.Module) -> None:
    """``new`` takes ``old``'s parameters and buffers (the same tensors) and plain attributes."""
    for k, v in old.__dict__.items():
        if not k.startswith("_"):
            setattr(new, k, v)
    for name, p in old._parameters.items():
        new.register_parameter(name, p)
    for name, buf in old._buffers.items():
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)


class FP8Weight(ctypes.Structure):
    """``kernels/common.h`` fp8_weight: codes [O, I] and block scales of one matrix, read in place."""
    _fields_ = [("q", _P), ("s", _P), ("O", _L), ("I", _L)]


class CpuFP8BlockLinear(FP8BlockLinear):
    """``FP8BlockLinear`` whose products read the e4m3 bytes in C (see the module docstring)."""

    def __init__(self, linear: FP8BlockLinear):
        nn.Module.__init__(self)
        _adopt(self, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # a strided view (a slice of a fused output) is copied once, not sent to the plain path
        if not native.supports(x):
            return super().forward(x)
        if 0 < _rows(x) <= DECODE_ROWS:
            return matmul(x, self.weight, self.weight_scale_inv)
        return dequantized_linear(x, self.weight, self.weight_scale_inv)


class CpuFP8StackedExperts(FewRowsInC, FP8StackedExperts):
    """``FP8StackedExperts`` whose experts with a few rows run in one C call (gate|up, SwiGLU, down)."""

    def __init__(self, experts: FP8StackedExperts):
        nn.Module.__init__(self)
        _adopt(self, experts)

    def _gate_up_parts(self, e: int):
        I, rb = self.intermediate_size, self.gate_up_proj_scale_inv.shape[1] // 2
        q, s = self.gate_up_proj[e], self.gate_up_proj_scale_inv[e]
        return (q[:I], s[:rb]), (q[I:], s[rb:])

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if not native.supports(x):
            return super().gate_up(e, x)
        if 0 < _rows(x) <= DECODE_ROWS:
            return torch.cat([matmul(x, q, s) for q, s in self._gate_up_parts(e)], dim=-1)
        return torch.cat([dequantized_linear(x, q, s) for q, s in self._gate_up_parts(e)], dim=-1)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        if not native.supports(h):
            return super().down(e, h)
        q, s = self.down_proj[e], self.down_proj_scale_inv[e]
        return matmul(h, q, s) if 0 < _rows(h) <= DECODE_ROWS else dequantized_linear(h, q, s)

    def decode_parts(self) -> DecodeParts:
        """Every expert's gate, up and down as fp8_weights for ``moe_kernels.moe_decode``, made once."""
        I, rb = self.intermediate_size, self.gate_up_proj_scale_inv.shape[1] // 2
        gu, gus, d, ds = self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj, self.down_proj_scale_inv
        hidden = d.shape[1]
        at = lambda t, e, row=0: t.data_ptr() + (e * t.stride(0) + row * t.stride(1)) * t.element_size()  # noqa: E731
        args = [a for e in range(d.shape[0]) for a in ((at(gu, e), at(gus, e), I, hidden),
                                                         (at(gu, e, I), at(gus, e, rb), I, hidden),
                                                         (at(d, e), at(ds, e), hidden, I))]
        names = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")
        return described_experts(LAYOUT_FP8, FP8Weight, args, I, tuple((self, n) for n in names))

    def grouped(self, xs: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Experts with up to 8 rows in one C call reading their codes in place (addresses computed from the stacks:
        no tensor op per expert); the others by ``expert`` (many-row path)."""
        few = [e for e, n in enumerate(counts) if 0 < n <= DECODE_ROWS]
        xs = xs.contiguous()
        if not few or not native.supports(xs):
            return super().grouped(xs, counts)
        I, rb = self.intermediate_size, self.gate_up_proj_scale_inv.shape[1] // 2
        gu, gus, d, ds = self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj, self.down_proj_scale_inv
        at = lambda t, e, row=0: t.data_ptr() + (e * t.stride(0) + row * t.stride(1)) * t.element_size()  # noqa: E731
        parts = [a for e in few for a in (at(gu, e), at(gus, e), at(gu, e, I), at(gus, e, rb), at(d, e), at(ds, e))]
        out = experts_rows(xs, *expert_rows(counts, few), parts, I, len(few) * (gu[0].numel() + d[0].numel()))
        return merge_expert_outputs(self, xs, counts, few, out)


def experts_rows(xs: torch.Tensor, starts: ctypes.Array, sizes: ctypes.Array, parts: list[int], intermediate: int,
                 nbytes: int) -> torch.Tensor:
    """``fp8_experts_rows``: rows [starts[i], starts[i] + sizes[i]) of xs [rows, hidden] through SwiGLU expert i, whose
    (codes, scales) addresses are parts[6i : 6i + 6] (gate, up, down) -> out [rows, hidden] (those rows filled).
    Several experts are shared among torch's threads (whole experts per thread: no split product), as the bf16
    experts' ``moe_experts_rows`` does, unless their codes are too few to pay for a parallel region."""
    n = len(starts)
    threads = torch.get_num_threads() if n > 1 and nbytes >= SMALL_BYTES else 1
    out = torch.empty_like(xs)
    if fp8_library().fp8_experts_rows(n, xs.shape[-1], intermediate, _DTYPES[xs.dtype], starts, sizes,
                                      (_P * len(parts))(*parts), xs.data_ptr(), out.data_ptr(), threads):
        raise MemoryError("fp8_experts_rows: could not allocate its scratch memory")
    return out


class CpuFP8MLP(MLP):
    """``MLP`` (a dense layer's, or the shared expert) with fp8 gate, up and down: up to 8 rows in one C call (gate,
    up, SwiGLU, down; the three products read in place) where the three fit one thread's share
    (``native.gemv_max_bytes``); otherwise each product on its own (threaded) path. Keeps the plain MLP's modules."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = (p if type(p) is CpuFP8BlockLinear else CpuFP8BlockLinear(p)
                                                        for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.nbytes = sum(p.weight.numel() for p in (self.gate_proj, self.up_proj, self.down_proj))

    def decode_parts(self) -> DecodeParts:
        """This MLP as ``moe_decode``'s shared expert: one expert of fp8_weights."""
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        args = [(p.weight.data_ptr(), p.weight_scale_inv.data_ptr(), p.out_features, p.in_features) for p in (g, u, d)]
        return described_experts(LAYOUT_FP8, FP8Weight, args, g.out_features,
                                 tuple((p, n) for p in (g, u, d) for n in ("weight", "weight_scale_inv")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = _rows(x)
        if not (0 < rows <= DECODE_ROWS and native.supports(x) and self.nbytes <= native.gemv_max_bytes()):
            return super().forward(x)
        parts = [t.data_ptr() for p in (self.gate_proj, self.up_proj, self.down_proj)
                 for t in (p.weight, p.weight_scale_inv)]
        one = (ctypes.c_int64 * 1)
        flat = experts_rows(x.view(rows, -1), one(0), one(rows), parts, self.gate_proj.out_features, self.nbytes)
        return flat.view(x.shape)


def fp8_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is an MLP whose three products are fp8 blocks the kernels read (``CpuFP8MLP`` applies)."""
    return type(module) is MLP and all(type(p) in (FP8BlockLinear, CpuFP8BlockLinear) and supported(
        p.weight, p.weight_scale_inv) for p in (module.gate_proj, module.up_proj, module.down_proj))


def swap(module: nn.Module, check_only: bool = False) -> nn.Module | bool | None:
    """The backend module for a plain fp8 module, or None to keep it (no kernels, tensors the kernels cannot read in
    place); with ``check_only``, whether there is one."""
    kind = type(module)
    if kind is FP8BlockLinear and supported(module.weight, module.weight_scale_inv):
        new = CpuFP8BlockLinear
    elif kind is FP8StackedExperts and supported(module.gate_up_proj, module.gate_up_proj_scale_inv) and supported(
            module.down_proj, module.down_proj_scale_inv):
        new = CpuFP8StackedExperts
    else:
        return False if check_only else None
    return True if check_only else new(module)
