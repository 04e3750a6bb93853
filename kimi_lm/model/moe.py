"""Mixture of experts: sigmoid router with a selection-only correction bias, grouped expert dispatch, shared expert.

Router (DeepSeek-V3 "noaux_tc", spec §6.1), per token in fp32:

    s  = sigmoid(x · W_gateᵀ)
    s' = s + e_score_correction_bias             # used to *choose* experts only
    keep the topk_group best groups (group score = sum of its top-2 s'), then the top-k experts by s'
    w  = s[top-k] (unbiased), renormalised if moe_renormalize, times routed_scaling_factor

Experts are stored stacked ([E, 2I, hidden] gate|up and [E, hidden, I] down; the checkpoint's per-expert
``w1/w3/w2`` are stacked on load). Dispatch sorts the (token, expert) pairs by expert and runs one matmul pair per
active expert on its contiguous slice of tokens: no Python loop over tokens. One token (a decode step) on CPU is
routed, SwiGLU'd and summed by C kernels (``TopkRouter.route_one``, ``SparseMoE._decode_native``;
ops/kernels.c), the PyTorch code being their reference and fallback.

References: DeepSeek-V3 ``inference/model.py`` (Gate, MoE); transformers ``KimiLinearTopkRouter``; spec §6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.model.layers import MLP, derived, swiglu
from kimi_lm.ops import native


class TopkRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                 renormalize: bool = True, scaling: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        # Not a gradient-trained weight: aux-loss-free balancing nudges it between steps. Always fp32.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.renormalize, self.scaling = renormalize, scaling

    def fp32_weight(self) -> torch.Tensor:
        """The weight in fp32 (a bf16 model's router keeps its fp32 copy between decode steps)."""
        w = self.weight
        return w if w.dtype == torch.float32 else derived(self, "fp32", w, torch.Tensor.float)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] -> [N, E] fp32 (a quantized router, ``quant.packed.PackedRouter``, overrides only this)."""
        return F.linear(x.float(), self.fp32_weight())

    def route_one(self, x: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
        """``forward`` for one token x [1, hidden] as one C call (ops/native.py): (the k experts, weights [1, k]);
        None where that does not apply (a quantized router, no kernels, autograd)."""
        if type(self).logits is not TopkRouter.logits:
            return None
        w = self.fp32_weight()
        if not native.supports(x, w, self.e_score_correction_bias):
            return None
        return native.moe_route(x, w, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                                self.renormalize, self.scaling)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] fp32, expert indices [N, k])."""
        logits = self.logits(x)  # [N, E] fp32
        # Inference: the selection below in one C call. Exact score ties (sigmoids saturated at 1.0) go to the lowest
        # expert index there, while torch.topk's tie order is its own; a module in training mode keeps torch's
        # choices, which the bias balancer (train/balance.py) counts.
        if not self.training and native.supports(logits, self.e_score_correction_bias):
            return native.moe_route_logits(logits, self.e_score_correction_bias, self.top_k, self.n_group,
                                           self.topk_group, self.renormalize, self.scaling)
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.view(x.shape[0], self.n_group, -1)  # [N, groups, E / groups]
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        idx = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, idx)
        if self.renormalize and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    # The two products of one expert; quantized / packed subclasses replace these two and nothing else.
    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, hidden] -> [n, 2I]: gate | up of expert e."""
        return F.linear(x, self.gate_up_proj[e])

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """h [n, I] -> [n, hidden]."""
        return F.linear(h, self.down_proj[e])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of expert e on x [n, hidden]."""
        return self.down(e, swiglu(self.gate_up(e, x)))

    def decode(self, x: torch.Tensor, experts: list[int], weights: torch.Tensor) -> torch.Tensor:
        """One token: x [1, hidden], its k experts, weights [1, k] -> [1, hidden]. The SwiGLU of all k runs at once
        (fewer small ops per decode step)."""
        gate, up = torch.cat([self.gate_up(e, x) for e in experts]).chunk(2, dim=-1)
        h = F.silu(gate) * up  # [k, I]
        out = torch.cat([self.down(e, h[i : i + 1]) for i, e in enumerate(experts)])  # [k, hidden]
        return (weights @ out.float()).to(x.dtype)

    def grouped(self, xs: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """xs [rows, hidden] grouped by expert (``counts`` rows each) -> each active expert's output, in order."""
        outputs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outputs.append(self.expert(e, xs[start : start + n]))
                start += n
        return outputs

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, hidden], idx / weights [N, k] -> Σ_k weight · expert(x) (+ ``add``, the shared expert's output),
        [N, hidden]."""
        N, k = idx.shape
        if N == 1:  # decode: just the k chosen experts, no sorting
            y = self.decode(x, idx[0].tolist(), weights)
            return y if add is None else y + add
        flat = idx.flatten()
        if native.supports(x) and idx.dtype == torch.int64 and idx.is_contiguous():  # the grouping below in one C call
            xs, counts, slot_row = native.moe_dispatch(x, idx, self.num_experts)
        else:
            order = flat.argsort(stable=True)  # (token, expert) pairs grouped by expert
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            # row gathers as embedding lookups: on CPU ~2x faster than index_select and ~3x faster than x[rows]
            xs = F.embedding(order // k, x)
            slot_row = order.argsort()  # where each (token, slot) pair's output row is in the expert-sorted order
        outputs = self.grouped(xs, counts)
        if native.supports(weights, *outputs, *(() if add is None else (add,))):
            return native.moe_combine(outputs, counts, flat, slot_row, weights, add)  # what follows, in one C call
        # back to (token, slot) order with a gather (cheaper than a scatter-add), then a weighted sum over slots
        # (the weighted sum runs in fp32, as the reference does, whatever the model dtype)
        out = F.embedding(slot_row, torch.cat(outputs)).view(N, k, -1).float()
        y = (weights.unsqueeze(1) @ out).squeeze(1).to(x.dtype)
        return y if add is None else y + add


class SparseMoE(nn.Module):
    """Routed experts plus always-on shared expert(s); module name in checkpoints: ``block_sparse_moe``."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, num_shared: int,
                 n_group: int = 1, topk_group: int = 1, renormalize: bool = True, scaling: float = 1.0):
        super().__init__()
        self.gate = TopkRouter(hidden_size, num_experts, top_k, n_group, topk_group, renormalize, scaling)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_experts = MLP(hidden_size, intermediate_size * num_shared) if num_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] == 1 and (routed := self.gate.route_one(flat)) is not None:
            return self._decode_native(flat, *routed).view(shape)
        weights, idx = self.gate(flat)
        shared = None if self.shared_experts is None else self.shared_experts(flat)
        return self.experts(flat, idx, weights, add=shared).view(shape)

    def _decode_native(self, x: torch.Tensor, experts: list[int], weights: torch.Tensor) -> torch.Tensor:
        """One token, its routing done: the expert products as in ``StackedExperts.decode``, the SwiGLU and the
        weighted sum plus the shared expert as one C call each. x [1, hidden] -> [1, hidden]."""
        if type(self.experts).grouped is not StackedExperts.grouped:  # experts with their own few-rows path (C)
            counts = [0] * self.experts.num_experts
            for e in experts:
                counts[e] = 1
            by_expert = self.experts.grouped(x.expand(len(experts), -1).contiguous(), counts)  # ascending experts
            rank = {e: i for i, e in enumerate(sorted(experts))}
            out = [by_expert[rank[e]] for e in experts]  # k × [1, hidden]
        else:
            gate_up = [self.experts.gate_up(e, x) for e in experts]  # k × [1, 2I]
            h = native.swiglu_rows(gate_up)  # [k, I]
            out = [self.experts.down(e, h[i : i + 1]) for i, e in enumerate(experts)]  # k × [1, hidden]
        shared = None if self.shared_experts is None else self.shared_experts(x)
        return native.weighted_sum_rows(out, weights, shared)
