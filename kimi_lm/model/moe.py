"""Mixture of experts: sigmoid router with a selection-only correction bias, grouped expert dispatch, shared expert.

Router (DeepSeek-V3 "noaux_tc", spec §6.1), per token in fp32:

    s  = sigmoid(x · W_gateᵀ)
    s' = s + e_score_correction_bias             # used to *choose* experts only
    keep the topk_group best groups (group score = sum of its top-2 s'), then the top-k experts by s'
    w  = s[top-k] (unbiased), renormalised if moe_renormalize, times routed_scaling_factor

Experts are stored stacked ([E, 2I, hidden] gate|up and [E, hidden, I] down; the checkpoint's per-expert
``w1/w3/w2`` are stacked on load). Dispatch sorts the (token, expert) pairs by expert and runs one matmul pair per
active expert on its contiguous slice of tokens: no Python loop over tokens. This is the plain PyTorch form and the
oracle of the CPU backend's ``kimi_lm.cpu.moe.CpuSparseMoE`` (routing, grouping and combining in C).

References: DeepSeek-V3 ``inference/model.py`` (Gate, MoE); transformers ``KimiLinearTopkRouter``; spec §6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.model.layers import MLP


class TopkRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                 renormalize: bool = True, scaling: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        # Not a gradient-trained weight: aux-loss-free balancing nudges it between steps. Always fp32.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.renormalize, self.scaling = renormalize, scaling

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .bfloat16() move the bias but leave it fp32, as the loader keeps it (checkpoint.FP32_SUFFIXES):
        # the balancer's nudges are below bf16's resolution near 1, and the CPU kernels read it as fp32
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None and bias.dtype == torch.float32 and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] -> [N, E] fp32 (a quantized router, ``quant.packed.PackedRouter``, replaces only this)."""
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] fp32, expert indices [N, k])."""
        scores = self.logits(x).sigmoid()  # [N, E] fp32
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
        gate, up = self.gate_up(e, x).chunk(2, dim=-1)
        return self.down(e, F.silu(gate) * up)

    def grouped(self, xs: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """xs [rows, hidden] grouped by expert (``counts`` rows each) -> each active expert's output, in order."""
        outputs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outputs.append(self.expert(e, xs[start : start + n]))
                start += n
        return outputs

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, hidden], idx / weights [N, k] -> Σ_k weight · expert(x), [N, hidden]."""
        N, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # (token, expert) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        # row gathers as embedding lookups: on CPU ~2x faster than index_select and ~3x faster than x[rows]
        outputs = self.grouped(F.embedding(order // k, x), counts)
        slot_row = order.argsort()  # where each (token, slot) pair's output row is in the expert-sorted order
        # back to (token, slot) order with a gather (cheaper than a scatter-add), then a weighted sum over slots
        # (the weighted sum runs in fp32, as the reference does, whatever the model dtype)
        out = F.embedding(slot_row, torch.cat(outputs)).view(N, k, -1).float()
        return (weights.unsqueeze(1) @ out).squeeze(1).to(x.dtype)


class SparseMoE(nn.Module):
    """Routed experts plus always-on shared expert(s); module name in checkpoints: ``block_sparse_moe``."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, num_shared: int,
                 n_group: int = 1, topk_group: int = 1, renormalize: bool = True, scaling: float = 1.0):
        super().__init__()
        self.gate = TopkRouter(hidden_size, num_experts, top_k, n_group, topk_group, renormalize, scaling)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_experts = MLP(hidden_size, intermediate_size * num_shared) if num_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> [..., hidden]: routed experts' weighted sum plus the shared expert(s)."""
        flat = x.reshape(-1, x.shape[-1])
        weights, idx = self.gate(flat)
        y = self.experts(flat, idx, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(x.shape)
