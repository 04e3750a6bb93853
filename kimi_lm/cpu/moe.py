"""The CPU backend's mixture of experts: oneDNN-packed experts and the MoE block with routing, grouping and combining
in C (``cpu/native.py``), swapped in for ``kimi_lm.model.moe``'s modules by ``kimi_lm.cpu.prepare``.

``CpuSparseMoE`` computes what ``SparseMoE`` computes (the oracle in the tests) for inference:

* a decode step (one token, or up to 8 of a batched step; ``rows_in_one_call``): the whole block in one C call
  (``moe_decode``: router, the chosen experts and the shared expert read where they lie, oneDNN-packed, MLX-quantized
  or FP8, each once for the tokens routed to it, the weighted sums) wherever every part has a C reader; for one token
  elsewhere the router in one C call (``moe_route``: product, sigmoid, group-limited top-k, weights), the k experts'
  products (few-row experts in one C call that reads their packed weights in place), the SwiGLU and the weighted sum
  plus shared expert in one call each;
* many tokens: the selection from the router logits (``moe_route_logits``), the grouping by expert (a counting sort
  and row gather, ``moe_dispatch``) and the weighted combine back to tokens with the shared expert
  (``moe_combine``) in C; the expert products on oneDNN.

Exact score ties (sigmoids saturated at 1.0) go to the lowest expert index in C, where torch.topk's tie order is its
own; training (the bias balancer counts torch's choices) uses the plain model.

Reference: DeepSeek-V3 ``inference/model.py`` (Gate, MoE); spec ``shared/specs/kimi_linear.md`` §6.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from kimi_lm.cpu import moe_kernels, native
from kimi_lm.cpu.layers import swiglu
from kimi_lm.cpu.moe_kernels import DecodeParts, DecodeRouter
from kimi_lm.cpu.onednn import GEMV_ROWS, pack, packed_linear, refuse_conversion
from kimi_lm.model.moe import SparseMoE, StackedExperts, TopkRouter

# Rows per expert up to which it runs in C rather than oneDNN (the C kernel reads each weight once for up to 8 rows,
# single-threaded per expert, experts shared among threads). Measured on 2 cores, all 16 experts with n rows each,
# n = 1 / 2 / 4 / 8: bench preset (512 -> 256) bf16 0.23 / 0.32 / 0.56 / 0.98 ms in C vs 0.60 / 1.11 / 1.16 / 1.22 on
# oneDNN, fp32 0.54 / 0.74 / 1.08 / 2.45 vs 1.31 / 2.58 / 2.57 / 3.01; Kimi-Linear-48B's experts (2304 -> 1024) bf16
# 5.1 / 5.7 / 8.8 / 17.2 vs 10.0 / 9.1 / 8.9 / 10.9 (there 8 rows are compute, and oneDNN's two threads win).
EXPERT_ROWS_IN_C = 4
# Experts up to this size (gate | up bytes) take up to 8 rows in C: the bench preset's (512 KiB in bf16) measured
# faster in C at every row count above, Kimi-Linear-48B's (9 MiB) not past 4.
SMALL_EXPERT_BYTES = 1 << 20
SMALL_EXPERT_ROWS = 8


class FewRowsInC:
    """Marks experts whose ``grouped`` runs experts with a few rows (a decode step's) in one C call: a one-token MoE
    step hands them its k experts at once (``CpuSparseMoE._one_token``)."""


class OneDNNStackedExperts(FewRowsInC, StackedExperts):
    """``StackedExperts`` with each expert's gate|up and down matrices packed for oneDNN (same routing and math)."""

    def __init__(self, experts: StackedExperts):
        nn.Module.__init__(self)  # not StackedExperts.__init__: that would allocate the stacked weights again
        self.intermediate_size = experts.intermediate_size
        self.gate_up_packed = [pack(w) for w in experts.gate_up_proj.unbind(0)]
        self.down_packed = [pack(w) for w in experts.down_proj.unbind(0)]
        for e, (gate_up, down) in enumerate(zip(self.gate_up_packed, self.down_packed)):  # seen by .buffers()
            self.register_buffer(f"gate_up_packed_{e}", gate_up, persistent=False)
            self.register_buffer(f"down_packed_{e}", down, persistent=False)
        E, two_I, hidden = experts.gate_up_proj.shape
        self.gate_up_gemv = [native.for_packed(p, two_I, hidden) for p in self.gate_up_packed]
        self.down_gemv = [native.for_packed(p, hidden, two_I // 2) for p in self.down_packed]

    @property
    def num_experts(self) -> int:
        return len(self.gate_up_packed)

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.gate_up_packed[e], self.gate_up_gemv[e])

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return packed_linear(h, self.down_packed[e], self.down_gemv[e])

    def grouped(self, xs: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Experts with a few rows (a decode step of several sequences: up to 4, or 8 for small experts) run in one C
        call that reads their packed weights in place (``moe_kernels.moe_experts_rows``) instead of two oneDNN calls
        each (mostly set-up at 1–4 rows); experts with more rows, and weights without a reader, go to oneDNN."""
        few = [e for e, n in enumerate(counts) if n and self.gate_up_gemv[e] is not None
               and self.down_gemv[e] is not None and native.gemv_takes(self.gate_up_gemv[e].nbytes, n)
               and n <= (SMALL_EXPERT_ROWS if self.gate_up_gemv[e].nbytes <= SMALL_EXPERT_BYTES else EXPERT_ROWS_IN_C)]
        if not few or not native.supports(xs):
            return super().grouped(xs, counts)
        in_c = moe_kernels.moe_experts_rows(xs, counts, few, self.gate_up_gemv, self.down_gemv)
        return merge_expert_outputs(self, xs, counts, few, in_c)

    def decode_parts(self) -> DecodeParts | None:
        """Every expert's gate | up and down as ``moe_decode`` reads them (None: a weight without a C reader)."""
        if None in self.gate_up_gemv or None in self.down_gemv:
            return None
        return DecodeParts([(g.layout, g.pointer()) for g in self.gate_up_gemv],
                           [(g.layout, g.pointer()) for g in self.down_gemv], self.intermediate_size,
                           self.gate_up_packed[0].dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "gate_up_proj"] = torch.stack([p.to_dense() for p in self.gate_up_packed])
        destination[prefix + "down_proj"] = torch.stack([p.to_dense() for p in self.down_packed])

    def _apply(self, fn, recurse=True):
        return refuse_conversion(self, fn, self.gate_up_packed[0].dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.down(e, swiglu(self.gate_up(e, x)))


def merge_expert_outputs(experts: StackedExperts, xs: torch.Tensor, counts: list[int], few: list[int],
                         in_c: torch.Tensor) -> list[torch.Tensor]:
    """Each active expert's output rows, in expert order: the ``few`` experts' from ``in_c`` (one C call filled their
    rows of [rows, hidden]), the others computed now by ``experts.expert`` on their rows of xs."""
    outputs, start, few = [], 0, set(few)
    for e, n in enumerate(counts):
        if n:
            outputs.append(in_c[start : start + n] if e in few else experts.expert(e, xs[start : start + n]))
            start += n
    return outputs


def shared_expert_parts(mlp: nn.Module) -> DecodeParts | None:
    """A shared expert (``layers.CpuMLP``, or ``fp8.CpuFP8MLP``) as ``moe_decode`` reads it: gate | up one oneDNN-packed
    product, or gate and up quantized (or FP8) apart, a pair of descriptors, and down; None where a product has no C
    reader."""
    from kimi_lm.cpu.layers import CpuMLP  # layers.py imports this module's neighbours
    from kimi_lm.cpu.products import LAYOUT_QUANT, FusedProducts, reader

    if hasattr(mlp, "decode_parts"):  # an MLP of FP8 blocks (fp8.CpuFP8MLP)
        return mlp.decode_parts()
    if type(mlp) is not CpuMLP:
        return None
    down = reader(mlp.down_proj)
    gate_up = mlp.gate_up_proj
    if isinstance(gate_up, FusedProducts):  # gate and up apart: both quantized, read as a pair
        halves = gate_up.readers
        if down is None or any(r.layout != LAYOUT_QUANT for r in halves):
            return None
        pair = (ctypes.c_void_p * 2)(*(r.pointer() for r in halves))
        sources = tuple((r.module, "weight") for r in (*halves, down) if r.layout == LAYOUT_QUANT)
        return DecodeParts([(LAYOUT_QUANT, ctypes.addressof(pair))], [(down.layout, down.pointer())],
                           mlp.down_proj.in_features, down.dtype, (pair, halves, down), sources)
    gemv = getattr(gate_up, "gemv", None)
    if gemv is None or down is None:
        return None
    sources = ((mlp.down_proj, "weight"),) if down.layout == LAYOUT_QUANT else ()
    dtypes = {gate_up.packed.dtype, down.dtype} - {None}
    if len(dtypes) > 1:
        return None
    return DecodeParts([(gemv.layout, gemv.pointer())], [(down.layout, down.pointer())], mlp.down_proj.in_features,
                       gate_up.packed.dtype, (down,), sources)


class CpuSparseMoE(SparseMoE):
    """``SparseMoE`` for CPU inference: routing, grouping and combining in C (see the module docstring). Adopts the
    plain module's router, experts and shared experts (same names, same state_dict)."""

    def __init__(self, moe: SparseMoE):
        nn.Module.__init__(self)
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        bias = self.gate.e_score_correction_bias
        if bias.dtype != torch.float32 or not bias.is_contiguous():  # the C router reads it as fp32 [E]
            self.gate.e_score_correction_bias = bias.float().contiguous()
        # a plain router's weight in fp32 for the one-token C router (a bf16 model's router is bf16); a quantized
        # router (kimi_lm.quant) computes its own logits and only the selection runs in C
        plain_router = type(moe.gate) is TopkRouter
        self.register_buffer("router_fp32", moe.gate.weight.detach().float().contiguous() if plain_router else None,
                             persistent=False)
        self._plan = False  # the one-call decode's plan (moe_kernels.MoEDecodePlan), made at the first token; None: n/a

    def decode_plan(self) -> moe_kernels.MoEDecodePlan | None:
        """The whole block in one C call (``moe_kernels.moe_decode``) where everything it reads has a C reader: a plain
        or quantized router, experts with ``decode_parts`` (oneDNN-packed, MLX-quantized in memory, FP8 blocks) and a
        shared expert whose products have readers. None elsewhere (paged experts take the calls below)."""
        if self._plan is not False and (self._plan is None or not self._plan.stale()):
            return self._plan
        self._plan = None
        if self.router_fp32 is not None:
            router = DecodeRouter(0, self.router_fp32.data_ptr(), *self.router_fp32.shape, keep=(self.router_fp32,))
        else:
            router = getattr(self.gate, "decode_router", lambda: None)()  # a quantized router's qweight
        parts = getattr(self.experts, "decode_parts", None)
        routed = None if parts is None or router is None else parts()
        shared = None if self.shared_experts is None else shared_expert_parts(self.shared_experts)
        if routed is not None and (shared is not None or self.shared_experts is None):
            if len({p.dtype for p in (routed, shared) if p is not None} - {None}) <= 1:
                self._plan = moe_kernels.MoEDecodePlan(router, routed, shared)
        return self._plan

    @staticmethod
    def rows_in_one_call(plan: moe_kernels.MoEDecodePlan, dtype: torch.dtype) -> int:
        """Tokens up to which a block runs as one ``moe_decode`` call of its ``plan``: as many rows as the C products
        take in this dtype (``onednn.GEMV_ROWS``), and as ``grouped`` gives an expert: up to 8 rows for small experts,
        4 for larger ones, 1 for weights past the C products' size limit for several rows."""
        expert_bytes = 2 * plan.intermediate * plan.router.hidden * dtype.itemsize  # gate | up, dense
        shared_bytes = 2 * plan.shared[0] * plan.router.hidden * dtype.itemsize
        if not native.gemv_takes(max(expert_bytes, shared_bytes), 2):
            return 1
        return min(GEMV_ROWS.get(dtype, 1), SMALL_EXPERT_ROWS if expert_bytes <= SMALL_EXPERT_BYTES else EXPERT_ROWS_IN_C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        gate = self.gate
        if flat.shape[0] <= SMALL_EXPERT_ROWS:  # a decode step: the whole block in one call
            plan = self.decode_plan()
            if plan is not None and plan.takes(flat, self.rows_in_one_call(plan, flat.dtype)):
                return moe_kernels.moe_decode(flat, plan, gate.e_score_correction_bias, gate.top_k, gate.n_group,
                                              gate.topk_group, gate.renormalize, gate.scaling).view(x.shape)
        if flat.shape[0] == 1:
            if self.router_fp32 is not None:
                experts, weights = moe_kernels.moe_route(flat, self.router_fp32, gate.e_score_correction_bias,
                                                         gate.top_k, gate.n_group, gate.topk_group, gate.renormalize,
                                                         gate.scaling)
                return self._one_token(flat, experts, weights).view(x.shape)
        weights, idx = moe_kernels.moe_route_logits(gate.logits(flat).contiguous(), gate.e_score_correction_bias,
                                               gate.top_k, gate.n_group, gate.topk_group, gate.renormalize, gate.scaling)
        if flat.shape[0] == 1:
            return self._one_token(flat, idx[0].tolist(), weights).view(x.shape)
        xs, counts, slot_row = moe_kernels.moe_dispatch(flat, idx, self.experts.num_experts)
        outputs = [o.contiguous() for o in self.experts.grouped(xs, counts)]
        shared = None if self.shared_experts is None else self.shared_experts(flat).contiguous()
        return moe_kernels.moe_combine(outputs, counts, idx.flatten(), slot_row, weights, shared).view(x.shape)

    def _one_token(self, x: torch.Tensor, experts: list[int], weights: torch.Tensor) -> torch.Tensor:
        """One token, its routing done: x [1, hidden], its k experts, weights [1, k] -> [1, hidden]."""
        if isinstance(self.experts, FewRowsInC):  # the k experts' products in one C call where it applies
            counts = [0] * self.experts.num_experts
            for e in experts:
                counts[e] = 1
            by_expert = self.experts.grouped(x.expand(len(experts), -1).contiguous(), counts)  # ascending experts
            rank = {e: i for i, e in enumerate(sorted(experts))}
            out = [by_expert[rank[e]].contiguous() for e in experts]  # k × [1, hidden]
        else:
            h = moe_kernels.swiglu_rows([self.experts.gate_up(e, x).contiguous() for e in experts])  # [k, I]
            out = [self.experts.down(e, h[i : i + 1]).contiguous() for i, e in enumerate(experts)]  # k × [1, hidden]
        shared = None if self.shared_experts is None else self.shared_experts(x).contiguous()
        return moe_kernels.weighted_sum_rows(out, weights, shared)
