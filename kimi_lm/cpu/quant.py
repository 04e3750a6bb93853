"""The CPU backend's MLX-quantized modules: products that read the packed bytes in place (``kernels/quant.c``),
swapped in for ``kimi_lm.quant.packed``'s modules by ``kimi_lm.cpu.prepare``.

The plain packed modules (the oracle) dequantize a tile of weights per call and multiply it on BLAS: right for many
rows, where the product's arithmetic hides the decoding, and ruinous for a decode step (an MXFP4 model decoded at
~0.06x its bf16 speed). Here a product with a few rows (a decode step, or the few rows each expert gets in a batched
step) is one C call that decodes each weight block in registers and multiplies it at once, streaming 4.25-8.5 bits per
weight instead of bf16's 16; many rows keep the plain path.

* ``CpuPackedLinear``: ``PackedLinear`` (also the lm head) for affine 2-8 bit, MXFP4, MXFP8, NVFP4.
* ``CpuPackedEmbedding``: the looked-up rows dequantized in C.
* ``CpuPackedRouter``: the router's logits (mlx-lm: affine 8-bit) in the same kernel, fp32 in and out.
* ``CpuPackedStackedExperts`` / ``CpuSplitPackedExperts`` (gate and up apart, as memory-mapped mlx-lm checkpoints
  hold them): a decode step's k experts (gate, up, SwiGLU, down) in one C call, experts shared among threads;
  ``CpuSparseMoE`` routes one token's experts there (they are ``FewRowsInC``).
* ``CpuPackedMLA``: MLA whose quantized ``kv_b_proj`` keeps its absorbed halves dense (not rebuilt per step).
* Many rows (prefill): each weight tile dequantized in C in one pass (``dequantized_linear``), then BLAS.

Each keeps the plain module's buffers (the same tensors, names and state_dict). Reference: the plain modules in
``kimi_lm/quant/packed.py``; tests/test_cpu_quant.py compares every format and shape with them.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.cpu import native, quant_kernels
from kimi_lm.cpu.mla import CpuMultiheadLatentAttention
from kimi_lm.cpu.moe import FewRowsInC, merge_expert_outputs
from kimi_lm.cpu.moe_kernels import DecodeParts, DecodeRouter, described_experts
from kimi_lm.cpu.products import LAYOUT_QUANT, QWeight
from kimi_lm.mapped import SplitPackedExperts
from kimi_lm.quant.packed import (TILE_ELEMENTS, PackedEmbedding, PackedLinear, PackedRouter, PackedSiTUExperts,
                                  PackedStackedExperts, QuantSpec)

DECODE_ROWS = 8  # rows up to which a product runs in C (one pass over the weight per 8 rows); more go to BLAS
# Below this many packed bytes a product runs on one thread: a parallel region costs a few µs, what one core needs to
# stream ~100 KiB.
THREADED_BYTES = 256 << 10


def supported(spec: QuantSpec, *tensors: torch.Tensor | None) -> bool:
    """Whether the kernels take these packed tensors: CPU, contiguous, uint8 or fp32/bf16 scales, library built."""
    present = [t for t in tensors if t is not None]
    if quant_kernels.quant_library() is None or spec.mode not in quant_kernels.QUANT_MODES:
        return False
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in present):
        return False
    return tensors[1].dtype in (torch.uint8, torch.float32, torch.bfloat16) and tensors[0].dtype == torch.uint32


def _threads(nbytes: int) -> int:
    return 1 if nbytes < THREADED_BYTES else torch.get_num_threads()


def _runs_in_c(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < rows <= DECODE_ROWS and native.supports(x)


def dequantized_linear(x: torch.Tensor, spec: QuantSpec, weight, scales, biases) -> torch.Tensor:
    """Many rows (prefill): x Wᵀ with W dequantized in C a tile of rows at a time (one pass, all threads; the plain
    module's PyTorch dequantization took longer than the product), multiplied on BLAS / oneDNN."""
    rows = max(1, TILE_ELEMENTS // x.shape[-1])
    tiles = []
    for r0 in range(0, weight.shape[0], rows):
        part = [None if t is None else t[r0 : r0 + rows] for t in (weight, scales, biases)]
        w = quant_kernels.quant_dequantize(spec.mode, spec.bits, spec.group_size, *part, x.dtype)
        tiles.append(F.linear(x, w))
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)


def _adopt(new: nn.Module, old: nn.Module) -> None:
    """``new`` takes ``old``'s buffers (the same tensors, persistence kept) and plain attributes."""
    for k, v in old.__dict__.items():
        if not k.startswith("_"):
            setattr(new, k, v)
    for name, buf in old._buffers.items():
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)


class DerivedBiases:
    """Affine biases that are −2^(bits−1)·scales (symmetric quantization: compressed-tensors INT4 as K2-Thinking and
    K2.5 ship their experts, loaded as affine 4-bit with bias = −8·scale) are not kept: a ninth of those experts'
    bytes. ``drop_symmetric_biases`` frees them; the C kernels derive them per row (a NULL biases pointer), the plain
    code paths and ``state_dict`` read them as ``−2^(bits−1)·scales`` again (bit-exact: a power-of-two multiple)."""

    def drop_symmetric_biases(self, pairs: dict[str, tuple[str, int]]) -> None:
        """pairs: biases buffer name -> (its scales buffer's name, bits); each pair that is symmetric is dropped."""
        derived = {}
        for name, (scales_name, bits) in pairs.items():
            biases, scales = self._buffers.get(name), self._buffers.get(scales_name)
            if biases is None or scales is None or biases.dtype != scales.dtype or biases.shape != scales.shape:
                continue
            mid = -(1 << (bits - 1))
            # compared a slice at a time: no temporary the size of a whole expert stack's scales
            if all(torch.equal(b, s * mid) for b, s in zip(biases.reshape(-1, biases.shape[-1]).split(4096),
                                                            scales.reshape(-1, scales.shape[-1]).split(4096))):
                derived[name] = (scales_name, bits)
                del self._buffers[name]
        self.__dict__["_derived_biases"] = derived

    def stored(self, name: str) -> torch.Tensor | None:
        """Buffer ``name`` as kept (None when absent or derived): what the C kernels are handed."""
        return self._buffers.get(name)

    def __getattr__(self, name: str):
        derived = self.__dict__.get("_derived_biases")
        if derived and name in derived:
            scales_name, bits = derived[name]
            return self._buffers[scales_name] * -(1 << (bits - 1))
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.__dict__.get("_derived_biases", {}):
            destination[prefix + name] = getattr(self, name)


class CpuPackedLinear(DerivedBiases, PackedLinear):
    """``PackedLinear`` whose few-row products read the packed weight in C (see the module docstring)."""

    def __init__(self, linear: PackedLinear):
        nn.Module.__init__(self)
        _adopt(self, linear)
        self.drop_symmetric_biases({"biases": ("scales", self.spec.bits)})
        self.nbytes = sum(t.numel() * t.element_size() for t in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if not _runs_in_c(x):
            if not native.supports(x):
                return super().forward(x)
            return dequantized_linear(x, s, self.weight, self.scales, self.stored("biases"))
        return quant_kernels.quant_matmul(x.contiguous(), s.mode, s.bits, s.group_size, self.weight, self.scales,
                                          self.stored("biases"), _threads(self.nbytes))


class CpuPackedRouter(PackedRouter):
    """``PackedRouter`` whose logits (fp32) come from the C kernel for every row count (E × hidden is small)."""

    def __init__(self, router: PackedRouter):
        nn.Module.__init__(self)
        _adopt(self, router)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = x.float().contiguous()
        return quant_kernels.quant_matmul(x, s.mode, s.bits, s.group_size, self.weight, self.scales,
                                   getattr(self, "biases", None), torch.get_num_threads() if x.shape[0] > 1 else 1)

    def decode_router(self) -> DecodeRouter:
        """This router as ``moe_kernels.moe_decode`` reads it: a qweight over its packed tensors."""
        s, biases = self.spec, getattr(self, "biases", None)
        E, hidden = self.scales.shape[0], self.scales.shape[1] * s.group_size
        q = QWeight(quant_kernels.QUANT_MODES[s.mode], s.bits, s.group_size, E, hidden, self.weight.data_ptr(),
                    self.scales.data_ptr(), None if biases is None else biases.data_ptr(),
                    int(self.scales.dtype == torch.bfloat16))
        names = ("weight", "scales") + (("biases",) if biases is not None else ())
        return DecodeRouter(LAYOUT_QUANT, ctypes.addressof(q), E, hidden, keep=(q,),
                            sources=tuple((self, n) for n in names))


class CpuPackedEmbedding(PackedEmbedding):
    """``PackedEmbedding`` whose looked-up rows are dequantized in C (one call; the plain module's PyTorch
    dequantization is ~25 tensor ops per decode step), bit-exact with it."""

    def __init__(self, embedding: PackedEmbedding):
        nn.Module.__init__(self)
        _adopt(self, embedding)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s, biases = self.spec, getattr(self, "biases", None)
        dtype = self.scales.dtype if s.has_biases else self.dtype
        if dtype not in (torch.float32, torch.bfloat16) or ids.device.type != "cpu":
            return super().forward(ids)
        flat = ids.reshape(-1)
        rows = [t.index_select(0, flat) for t in (self.weight, self.scales)]
        rows.append(None if biases is None else biases.index_select(0, flat))
        return quant_kernels.quant_dequantize(s.mode, s.bits, s.group_size, *rows, dtype).view(*ids.shape, -1)


class FewRowExperts(DerivedBiases, FewRowsInC):
    """Experts with a few rows each (a decode step's) in one C call: gate and up, SwiGLU, down."""

    def _drop_symmetric_biases(self) -> None:
        parts = ("gate_proj", "up_proj") if isinstance(self, SplitPackedExperts) else ("gate_up_proj",)
        pairs = {f"{p}_biases": (f"{p}_scales", self.gate_up_spec.bits) for p in parts}
        self.drop_symmetric_biases(pairs | {"down_proj_biases": ("down_proj_scales", self.down_spec.bits)})

    def _tensors(self, name: str) -> tuple:
        """(weight, scales, biases) as kept: the C kernels' arguments (derived biases: None)."""
        return tuple(self.stored(name + suffix) for suffix in ("", "_scales", "_biases"))

    def _stored_names(self) -> tuple[tuple[nn.Module, str], ...]:
        """(self, name) of every tensor the C kernels read (derived biases are not kept)."""
        parts = ("gate_proj", "up_proj") if isinstance(self, SplitPackedExperts) else ("gate_up_proj",)
        names = (p + suffix for p in (*parts, "down_proj") for suffix in ("", "_scales", "_biases"))
        return tuple((self, n) for n in names if self.stored(n) is not None)

    def _stacks(self) -> tuple[tuple, tuple]:
        """(gate, up) as (stacked (weight, scales, biases) [E, …], first row of the part in them)."""
        if isinstance(self, SplitPackedExperts):  # gate and up kept apart (memory-mapped mlx-lm checkpoints)
            return (self._tensors("gate_proj"), 0), (self._tensors("up_proj"), 0)
        gate_up = self._tensors("gate_up_proj")
        return (gate_up, 0), (gate_up, self.intermediate_size)

    def _halves(self):
        """(gate, up) as functions of the expert index -> its (weight, scales, biases) [I, …]."""
        I = self.intermediate_size
        return tuple((lambda e, ts=ts, r0=r0: tuple(None if t is None else t[e, r0 : r0 + I] for t in ts))
                     for ts, r0 in self._stacks())

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not native.supports(x):
            return super().gate_up(e, x)
        s = self.gate_up_spec
        return torch.cat([dequantized_linear(x, s, *half(e)) for half in self._halves()], dim=-1)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if not native.supports(h):
            return super().down(e, h)
        return dequantized_linear(h, self.down_spec, *(None if t is None else t[e] for t in self._tensors("down_proj")))

    def decode_parts(self) -> DecodeParts | None:
        """Every expert's gate, up and down as qweights (``kernels/common.h``) for ``moe_kernels.moe_decode``, made
        once: gate | up as the address of a (gate, up) pair of qweight pointers. None for paged experts (a decode
        step reads their active experts ahead first, ``will_need``)."""
        if getattr(self, "paged", ()):  # set on memory-mapped experts only
            return None
        (gate, gate_row0), (up, up_row0) = self._stacks()
        down = self._tensors("down_proj")
        E, hidden, I = down[0].shape[0], down[1].shape[1], self.intermediate_size
        parts = ((gate, gate_row0, self.gate_up_spec, I, hidden), (up, up_row0, self.gate_up_spec, I, hidden),
                 (down, 0, self.down_spec, hidden, I))
        per_part = []  # for each part, every expert's qweight arguments
        for tensors, row0, spec, rows, width in parts:
            mode, scale_bf16 = quant_kernels.QUANT_MODES[spec.mode], int(tensors[1].dtype == torch.bfloat16)
            bases = quant_kernels.expert_addresses((tensors, row0))
            per_part.append([(mode, spec.bits, spec.group_size, rows, width,
                              *(None if b is None else b[0] + e * b[1] for b in bases), scale_bf16) for e in range(E)])
        args = [per_part[k][e] for e in range(E) for k in range(3)]
        return described_experts(LAYOUT_QUANT, QWeight, args, I, self._stored_names())

    def grouped(self, xs: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        few = [e for e, n in enumerate(counts) if 0 < n <= DECODE_ROWS]
        if not few or not native.supports(xs):
            return super().grouped(xs, counts)
        self.will_need(counts)  # a paged checkpoint's active experts read ahead, together (kimi_lm.mapped)
        specs = tuple((quant_kernels.QUANT_MODES[s.mode], s.bits, s.group_size) for s in (self.gate_up_spec, self.down_spec))
        in_c = quant_kernels.quant_experts_rows(xs.contiguous(), counts, few, *self._stacks(),
                                                (self._tensors("down_proj"), 0), specs, self.intermediate_size)
        return merge_expert_outputs(self, xs, counts, few, in_c)


class CpuPackedStackedExperts(FewRowExperts, PackedStackedExperts):
    """``PackedStackedExperts`` whose experts with a few rows run in one C call (gate|up, SwiGLU, down)."""

    def __init__(self, experts: PackedStackedExperts):
        nn.Module.__init__(self)
        _adopt(self, experts)
        self._drop_symmetric_biases()


class CpuSplitPackedExperts(FewRowExperts, SplitPackedExperts):
    """``SplitPackedExperts`` (gate and up apart) whose experts with a few rows run in one C call."""

    def __init__(self, experts: SplitPackedExperts):
        nn.Module.__init__(self)
        _adopt(self, experts)
        self._drop_symmetric_biases()


class CpuPackedSiTUExperts(PackedSiTUExperts):
    """``PackedSiTUExperts`` (Kimi K3) whose products read the packed bytes in C: few rows in the few-row kernel, many
    dequantized in C then BLAS. SiTU between them stays in PyTorch (the fused C expert call is SwiGLU)."""

    def __init__(self, experts: PackedSiTUExperts):
        nn.Module.__init__(self)
        _adopt(self, experts)

    def _linear(self, name: str, spec: QuantSpec, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.int4 or not native.supports(x):
            return super()._linear(name, spec, e, x)
        _, q, scales, biases = self._part(name, spec, e)
        if _runs_in_c(x):
            return quant_kernels.quant_matmul(x.contiguous(), spec.mode, spec.bits, spec.group_size, q, scales, biases,
                                              _threads(q.numel() * 4))
        return dequantized_linear(x, spec, q, scales, biases)


class CpuPackedMLA(CpuMultiheadLatentAttention):
    """``CpuMultiheadLatentAttention`` with a quantized ``kv_b_proj``: the absorbed decode's two halves kept dense at
    the model dtype (H·(nope + v)·latent weights, ~8 MiB per layer at Kimi-Linear-48B's sizes) instead of dequantized
    on every step (which cost more than the rest of the layer's decode step)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__(layer)
        if self.w_uk is None and hasattr(self.kv_b_proj, "dense_weight"):
            self.w_uk, self.w_uv_t = self._split_kv_b(self.kv_b_proj.dense_weight(dtype), contiguous=True)


EXPERTS = {PackedStackedExperts: CpuPackedStackedExperts, SplitPackedExperts: CpuSplitPackedExperts,
           PackedSiTUExperts: CpuPackedSiTUExperts}


def swap(module: nn.Module, check_only: bool = False) -> nn.Module | bool | None:
    """The backend module for a plain packed module, or None to keep it (another format, int4 layout, no kernels);
    with ``check_only``, whether there is one."""
    kind = type(module)
    if kind is PackedLinear and not module.int4 and supported(module.spec, module.weight, module.scales,
                                                               getattr(module, "biases", None)):
        new = CpuPackedLinear
    elif kind is PackedEmbedding and supported(module.spec, module.weight, module.scales,
                                               getattr(module, "biases", None)):
        new = CpuPackedEmbedding
    elif kind is PackedRouter and supported(module.spec, module.weight, module.scales, getattr(module, "biases", None)):
        new = CpuPackedRouter
    elif kind in EXPERTS and not module.int4 and all(
            supported(spec, *(getattr(module, name + s, None) for s in ("", "_scales", "_biases")))
            for name, spec in (("gate_proj" if kind is SplitPackedExperts else "gate_up_proj", module.gate_up_spec),
                               ("down_proj", module.down_spec))):
        new = EXPERTS[kind]
    else:
        return False if check_only else None
    return True if check_only else new(module)
