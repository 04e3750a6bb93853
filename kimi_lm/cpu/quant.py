"""The CPU backend's MLX-quantized modules: products that read the packed bytes in place (``kernels/quant.c``),
swapped in for ``kimi_lm.quant.packed``'s modules by ``kimi_lm.cpu.prepare``.

The plain packed modules (the oracle) dequantize a tile of weights per call and multiply it on BLAS: right for many
rows, where the product's arithmetic hides the decoding, and ruinous for a decode step (an MXFP4 model decoded at
~0.06x its bf16 speed). Here a product with a few rows (a decode step, or the few rows each expert gets in a batched
step) is one C call that decodes each weight block in registers and multiplies it at once, streaming 4.25-8.5 bits per
weight instead of bf16's 16; many rows keep the plain path.

* ``CpuPackedLinear``: ``PackedLinear`` (also the lm head) for affine 2-8 bit, MXFP4, MXFP8, NVFP4.
* ``CpuPackedRouter``: the router's logits (mlx-lm: affine 8-bit) in the same kernel, fp32 in and out.
* ``CpuPackedStackedExperts``: a decode step's k experts (gate|up, SwiGLU, down) in one C call, experts shared
  among threads; ``CpuPackedSparseMoE`` routes one token's experts there.

Each keeps the plain module's buffers (the same tensors, names and state_dict). Reference: the plain modules in
``kimi_lm/quant/packed.py``; tests/test_cpu_quant.py compares every format and shape with them.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.cpu import native
from kimi_lm.cpu.moe import CpuSparseMoE
from kimi_lm.quant.packed import PackedLinear, PackedRouter, PackedStackedExperts, QuantSpec

DECODE_ROWS = 8  # rows up to which a product runs in C (one pass over the weight per 8 rows); more go to BLAS
# Below this many packed bytes a product runs on one thread: a parallel region costs a few µs, what one core needs to
# stream ~100 KiB.
THREADED_BYTES = 256 << 10


def supported(spec: QuantSpec, *tensors: torch.Tensor | None) -> bool:
    """Whether the kernels take these packed tensors: CPU, contiguous, uint8 or fp32/bf16 scales, library built."""
    present = [t for t in tensors if t is not None]
    if native.quant_library() is None or spec.mode not in native.QUANT_MODES:
        return False
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in present):
        return False
    return tensors[1].dtype in (torch.uint8, torch.float32, torch.bfloat16) and tensors[0].dtype == torch.uint32


def _threads(nbytes: int) -> int:
    return 1 if nbytes < THREADED_BYTES else torch.get_num_threads()


def _runs_in_c(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < rows <= DECODE_ROWS and native.supports(x)


def _adopt(new: nn.Module, old: nn.Module) -> None:
    """``new`` takes ``old``'s buffers (the same tensors, persistence kept) and plain attributes."""
    for k, v in old.__dict__.items():
        if not k.startswith("_"):
            setattr(new, k, v)
    for name, buf in old._buffers.items():
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)


class CpuPackedLinear(PackedLinear):
    """``PackedLinear`` whose few-row products read the packed weight in C (see the module docstring)."""

    def __init__(self, linear: PackedLinear):
        nn.Module.__init__(self)
        _adopt(self, linear)
        self.nbytes = sum(t.numel() * t.element_size() for t in linear.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _runs_in_c(x):
            return super().forward(x)
        s = self.spec
        return native.quant_matmul(x.contiguous(), s.mode, s.bits, s.group_size, self.weight, self.scales,
                                   getattr(self, "biases", None), _threads(self.nbytes))


class CpuPackedRouter(PackedRouter):
    """``PackedRouter`` whose logits (fp32) come from the C kernel for every row count (E × hidden is small)."""

    def __init__(self, router: PackedRouter):
        nn.Module.__init__(self)
        _adopt(self, router)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = x.float().contiguous()
        return native.quant_matmul(x, s.mode, s.bits, s.group_size, self.weight, self.scales,
                                   getattr(self, "biases", None), torch.get_num_threads() if x.shape[0] > 1 else 1)


class CpuPackedStackedExperts(PackedStackedExperts):
    """``PackedStackedExperts`` whose experts with a few rows run in one C call (gate|up, SwiGLU, down)."""

    def __init__(self, experts: PackedStackedExperts):
        nn.Module.__init__(self)
        _adopt(self, experts)

    def _packed(self, name: str) -> tuple:
        return tuple(getattr(self, name + suffix, None) for suffix in ("", "_scales", "_biases"))

    def _linear(self, name: str, spec: QuantSpec, e: int, x: torch.Tensor) -> torch.Tensor:
        if not _runs_in_c(x):
            return super()._linear(name, spec, e, x)
        w, scales, biases = (None if t is None else t[e] for t in self._packed(name))
        return native.quant_matmul(x.contiguous(), spec.mode, spec.bits, spec.group_size, w, scales, biases,
                                   _threads(w.numel() * 4))

    def grouped(self, xs: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        few = [e for e, n in enumerate(counts) if 0 < n <= DECODE_ROWS]
        if not few or not native.supports(xs):
            return super().grouped(xs, counts)
        specs = tuple((native.QUANT_MODES[s.mode], s.bits, s.group_size) for s in (self.gate_up_spec, self.down_spec))
        in_c = native.quant_experts_rows(xs.contiguous(), counts, few, self._packed("gate_up_proj"),
                                         self._packed("down_proj"), specs, self.intermediate_size)
        outputs, start, few = [], 0, set(few)
        for e, n in enumerate(counts):
            if n:
                outputs.append(in_c[start : start + n] if e in few else self.expert(e, xs[start : start + n]))
                start += n
        return outputs


class CpuPackedSparseMoE(CpuSparseMoE):
    """``CpuSparseMoE`` whose one-token step sends its k packed experts to ``CpuPackedStackedExperts.grouped``."""

    def _one_token(self, x: torch.Tensor, experts: list[int], weights: torch.Tensor) -> torch.Tensor:
        counts = [0] * self.experts.num_experts
        for e in experts:
            counts[e] = 1
        by_expert = self.experts.grouped(x.expand(len(experts), -1).contiguous(), counts)  # ascending experts
        rank = {e: i for i, e in enumerate(sorted(experts))}
        out = [by_expert[rank[e]].contiguous() for e in experts]  # k × [1, hidden]
        shared = None if self.shared_experts is None else self.shared_experts(x).contiguous()
        return native.weighted_sum_rows(out, weights, shared)


def swap(module: nn.Module, check_only: bool = False) -> nn.Module | bool | None:
    """The backend module for a plain packed module, or None to keep it (another format, int4 layout, no kernels);
    with ``check_only``, whether there is one."""
    kind = type(module)
    if kind is PackedLinear and not module.int4 and supported(module.spec, module.weight, module.scales,
                                                               getattr(module, "biases", None)):
        new = CpuPackedLinear
    elif kind is PackedRouter and supported(module.spec, module.weight, module.scales, getattr(module, "biases", None)):
        new = CpuPackedRouter
    elif kind is PackedStackedExperts and not module.int4 and all(
            supported(spec, *(getattr(module, name + s, None) for s in ("", "_scales", "_biases")))
            for name, spec in (("gate_up_proj", module.gate_up_spec), ("down_proj", module.down_spec))):
        new = CpuPackedStackedExperts
    else:
        return False if check_only else None
    return True if check_only else new(module)
