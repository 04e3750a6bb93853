"""The CPU backend's Kimi Linear decoder layer: a KDA layer's decode step in one C call, for one sequence or the few
of a batched step (``kernels/layer.c`` kda_layer_decode_rows), swapped in for
``kimi_lm.model.kimi_linear.DecoderLayer`` by ``kimi_lm.cpu.prepare``.

The call strings together the kernels the layer's (backend) modules call one by one: input RMSNorm, the fused input
products, ``kda_decode``, o_proj, the residual add, the post-attention RMSNorm, the MoE block (``moe_decode``) or the
SwiGLU MLP, the second residual add. Same kernels, same order, same roundings: the output is the module path's bit for
bit (tests compare), without the Python between them: module calls, output allocations and the residual adds cost
~150 µs per layer of a bench-model decode step, more than the layer's products. A batched step (B sequences, each
with its own cache: ``kimi_lm.batching``) reads every weight once for its B rows, and each sequence's KDA state where
it lies; it applies up to the rows each module would itself take in C (``KDALayerPlan.rows_in_one_call``: 8 in fp32,
4 in bf16), so that it computes what they would.

It applies where every part has a C reader (oneDNN-packed within the one-row products' size limit, or MLX-quantized)
and the feed-forward block is an MoE with a one-call plan or a fused SwiGLU MLP; elsewhere, for several tokens of one
sequence, for MLA layers and with Block AttnRes, the layer runs as its modules.

Reference: ``kimi_lm/model/kimi_linear.py`` DecoderLayer.forward (the oracle).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from kimi_lm.cache import PackedLayerCache
from kimi_lm.cpu import native
from kimi_lm.cpu.kda import L2_EPS, CpuKimiDeltaAttention
from kimi_lm.cpu.layers import CpuMLP, CpuRMSNorm
from kimi_lm.cpu.moe import CpuSparseMoE
from kimi_lm.cpu.moe_kernels import TensorWatch
from kimi_lm.cpu.native import _DTYPES, _I, _L, _P
from kimi_lm.cpu.onednn import GEMV_ROWS, OneDNNFusedLinear, OneDNNLinear
from kimi_lm.cpu.products import LAYOUT_QUANT, FusedProducts, reader
from kimi_lm.model.kimi_linear import DecoderLayer

_F = ctypes.c_float


class Products(ctypes.Structure):
    """``kernels/layer.c`` products: n parts' layouts, weight addresses and output widths (fused_products')."""
    _fields_ = [("n", _L), ("layouts", _P), ("weights", _P), ("outs", _P)]


class KDALayer(ctypes.Structure):
    """``kernels/layer.c`` kda_layer: everything kda_layer_decode_rows reads besides the tokens and the caches."""
    _fields_ = [("hidden", _L), ("bf16", _I), ("norm1", _P), ("norm2", _P), ("eps1", _F), ("eps2", _F),
                ("in_proj", Products), ("H", _L), ("K", _L), ("W", _L), ("taps", _P), ("neg_A", _P),
                ("dt_bias", _P), ("gate_norm", _P), ("gate_norm_eps", _F), ("l2_eps", _F), ("f_layout", _I),
                ("g_layout", _I), ("f_b", _P), ("g_b", _P), ("o_proj", Products),
                ("E", _L), ("I", _L), ("top_k", _L), ("n_group", _L), ("topk_group", _L), ("renormalize", _I),
                ("scaling", _F), ("router_layout", _I), ("router", _P), ("bias", _P), ("gate_up_layouts", _P),
                ("down_layouts", _P), ("gate_up", _P), ("down", _P), ("I_shared", _L),
                ("shared_gate_up_layout", _I), ("shared_down_layout", _I), ("shared_gate_up", _P),
                ("shared_down", _P), ("mlp_gate_up", Products), ("mlp_down", Products), ("I_mlp", _L)]


class _Parts:
    """One product module (or several fused) as ``Products``, with what its addresses point into (``keep``), the
    input dtype its oneDNN parts need (``dtype``; None: quantized only), the quantized modules whose weights it read
    (``sources``) and the bytes of its one oneDNN-packed weight (``onednn_nbytes``; 0: none), which decide whether the
    module itself takes several rows in C (``onednn.packed_linear``)."""

    def __init__(self, layouts: list[int], weights: list[int], outs: list[int], dtype, sources=(), keep=(),
                 onednn_nbytes: int = 0):
        n = len(layouts)
        self.keep = keep  # the readers whose QWeight structs the addresses point at
        self.arrays = ((_I * n)(*layouts), (_P * n)(*weights), (_L * n)(*outs))
        self.struct = Products(n, *(ctypes.addressof(a) for a in self.arrays))
        self.dtype, self.sources, self.onednn_nbytes = dtype, tuple(sources), onednn_nbytes


def _parts(module: nn.Module) -> _Parts | None:
    """A product module as ``kda_layer_decode_rows`` reads it, or None where it has no C reader."""
    if type(module) in (OneDNNFusedLinear, OneDNNLinear):
        g = module.gemv
        if g is None:
            return None
        return _Parts([g.layout], [g.pointer()], [g.out_features], module.packed.dtype, onednn_nbytes=g.nbytes)
    readers = module.readers if isinstance(module, FusedProducts) else [reader(module)]
    if None in readers:
        return None
    return _Parts([r.layout for r in readers], [r.pointer() for r in readers], [r.out_features for r in readers],
                  next((r.dtype for r in readers if r.layout != LAYOUT_QUANT), None),
                  [r.module for r in readers if r.layout == LAYOUT_QUANT], keep=readers)


class KDALayerPlan:
    """The ``KDALayer`` of one layer, made once, with the parts it points into and the MoE plan it embeds."""

    def __init__(self, layer: CpuDecoderLayer, parts: dict[str, _Parts], moe_plan):
        attn, (norm1, norm2) = layer.self_attn, (layer.input_layernorm, layer.post_attention_layernorm)
        self.dtype = norm1.weight.dtype  # the model dtype: the input the kernels take, whatever packed the weights
        self.parts, self.moe_plan = parts, moe_plan
        self.moe_rows = CpuSparseMoE.rows_in_one_call(moe_plan, self.dtype) if moe_plan is not None else 0
        self.watch = TensorWatch([(m, "weight") for p in parts.values() for m in p.sources])
        ffn = {}
        if moe_plan is not None:
            gate, r = layer.block_sparse_moe.gate, moe_plan.router
            ffn = dict(E=r.num_experts, I=moe_plan.intermediate, top_k=gate.top_k, n_group=gate.n_group,
                       topk_group=gate.topk_group, renormalize=int(gate.renormalize), scaling=gate.scaling,
                       router_layout=r.layout, router=r.address, bias=gate.e_score_correction_bias.data_ptr(),
                       gate_up_layouts=ctypes.addressof(moe_plan.gate_up_layouts),
                       down_layouts=ctypes.addressof(moe_plan.down_layouts),
                       gate_up=ctypes.addressof(moe_plan.gate_up), down=ctypes.addressof(moe_plan.down))
            shared = moe_plan.shared
            ffn |= dict(I_shared=shared[0], shared_gate_up_layout=shared[1], shared_gate_up=shared[2],
                        shared_down_layout=shared[3], shared_down=shared[4])
        else:
            ffn = dict(mlp_gate_up=parts["mlp_gate_up"].struct, mlp_down=parts["mlp_down"].struct,
                       I_mlp=layer.mlp.down_proj.in_features)
        self.struct = KDALayer(
            hidden=norm1.weight_fp32.shape[0], bf16=int(self.dtype == torch.bfloat16),
            norm1=norm1.weight_fp32.data_ptr(), norm2=norm2.weight_fp32.data_ptr(), eps1=norm1.eps, eps2=norm2.eps,
            in_proj=parts["in_proj"].struct,
            H=attn.num_heads, K=attn.head_dim, W=attn.conv_width, taps=attn.taps.data_ptr(),
            neg_A=attn.neg_A.data_ptr(), dt_bias=attn.dt_bias_fp32.data_ptr(), gate_norm=attn.norm_weight.data_ptr(),
            gate_norm_eps=attn.o_norm.eps, l2_eps=L2_EPS, f_layout=attn.f_b_reader.layout,
            g_layout=attn.g_b_reader.layout, f_b=attn.f_b_reader.pointer(), g_b=attn.g_b_reader.pointer(),
            o_proj=parts["o_proj"].struct, **ffn)
        # what the addresses point into, kept alive with the plan
        self.tensors = (norm1.weight_fp32, norm2.weight_fp32, attn.taps, attn.neg_A, attn.dt_bias_fp32,
                        attn.norm_weight, attn.f_b_reader, attn.g_b_reader,
                        None if moe_plan is None else layer.block_sparse_moe.gate.e_score_correction_bias)

    def stale(self, layer: CpuDecoderLayer) -> bool:
        """Whether a quantized weight was replaced, or the MoE block's plan was made again."""
        if self.watch.stale():
            return True
        return self.moe_plan is not None and layer.block_sparse_moe.decode_plan() is not self.moe_plan

    def takes(self, h: torch.Tensor, caches: list) -> bool:
        """Whether kda_layer_decode_rows runs this plan on h [B, 1, hidden] with each sequence's KDA cache: the module
        path's checks, and for B > 1 that each of the layer's modules would take its B rows in C too (so that the
        call computes what they would: ``rows_in_one_call``)."""
        B = h.shape[0]
        return (h.dtype == self.dtype and h.dtype in _DTYPES and h.is_contiguous() and B <= self.rows_in_one_call(B)
                and native.supports(h, *(t for c in caches for t in (c.conv_state, c.state)))
                and (self.moe_plan is None or self.moe_plan.takes(h.view(B, -1), self.moe_rows)))

    def rows_in_one_call(self, B: int) -> int:
        """Rows up to which every product of the layer runs in C as its module would run it (``packed_linear``:
        ``GEMV_ROWS`` per dtype, within the C products' size limit for several rows)."""
        if B == 1:
            return 1
        rows = GEMV_ROWS.get(self.dtype, 1)
        if self.moe_plan is not None:
            rows = min(rows, self.moe_rows)
        if any(not native.gemv_takes(p.onednn_nbytes, B) for p in self.parts.values() if p.onednn_nbytes):
            return 1
        return rows


@functools.cache
def _layer_library() -> ctypes.CDLL:
    lib = native.library()
    lib.kda_layer_decode_rows.argtypes = [_P, _L, _P, _P, _P, _P, _I]
    lib.kda_layer_decode_rows.restype = _I
    return lib


class CpuDecoderLayer(DecoderLayer):
    """``DecoderLayer`` whose KDA decode step for one sequence is one C call (see the module docstring); adopts the
    plain layer's modules under the same names (state_dict unchanged)."""

    def __init__(self, layer: DecoderLayer):
        nn.Module.__init__(self)
        self.is_kda, self.is_moe = layer.is_kda, layer.is_moe
        for name, child in layer.named_children():
            setattr(self, name, child)
        self._plan = False  # made at the first decode step (the children are swapped by then); None: n/a

    def decode_plan(self) -> KDALayerPlan | None:
        if self._plan is not False and (self._plan is None or not self._plan.stale(self)):
            return self._plan
        self._plan = None
        attn, norms = self.self_attn, (self.input_layernorm, self.post_attention_layernorm)
        if type(attn) is not CpuKimiDeltaAttention or any(type(n) is not CpuRMSNorm for n in norms):
            return None
        if attn.f_b_reader is None or attn.g_b_reader is None:
            return None
        modules = {"in_proj": attn.in_proj, "o_proj": attn.o_proj}
        moe_plan = None
        if self.is_moe:
            moe = self.block_sparse_moe
            moe_plan = moe.decode_plan() if type(moe) is CpuSparseMoE else None
            if moe_plan is None:
                return None
        elif type(self.mlp) is CpuMLP:
            modules |= {"mlp_gate_up": self.mlp.gate_up_proj, "mlp_down": self.mlp.down_proj}
        else:
            return None
        parts = {name: _parts(m) for name, m in modules.items()}
        if None in parts.values():
            return None
        gate_dtypes = {r.dtype for r in (attn.f_b_reader, attn.g_b_reader)}
        dtypes = {p.dtype for p in parts.values()} | gate_dtypes | {None if moe_plan is None else moe_plan.dtype}
        if dtypes - {None} <= {self.input_layernorm.weight.dtype}:  # oneDNN parts take the model dtype only
            self._plan = KDALayerPlan(self, parts, moe_plan)
        return self._plan

    def forward(self, h: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None and self.is_kda and h.shape[1] == 1 and not isinstance(cache, PackedLayerCache):
            # one sequence's cache, or a batched step's per-sequence caches where they lie (kimi_lm.batching)
            caches = getattr(cache, "rows", None) or [cache]
            plan = self.decode_plan() if len(caches) == h.shape[0] else None
            if plan is not None and plan.takes(h, caches):
                B = h.shape[0]
                out = torch.empty_like(h)
                conv_rows = (_P * B)(*(c.conv_state.data_ptr() for c in caches))
                state_rows = (_P * B)(*(c.state.data_ptr() for c in caches))
                if _layer_library().kda_layer_decode_rows(ctypes.addressof(plan.struct), B, h.data_ptr(), conv_rows,
                                                          state_rows, out.data_ptr(), torch.get_num_threads()):
                    raise MemoryError("kda_layer_decode_rows: could not allocate its scratch memory")
                return out
        return super().forward(h, cache, positions)
