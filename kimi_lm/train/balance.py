"""Auxiliary-loss-free MoE load balancing (DeepSeek-V3 §2.1.2): a per-expert bias steers selection, not a loss.

Each router's ``e_score_correction_bias`` is added to the scores only to *choose* the top-k experts (the mixing
weights stay unbiased, see ``model/moe.py``). After every optimizer step, with load_i the number of tokens that
chose expert i during that step:

    bias_i ← bias_i + u · sign(mean(load) − load_i)         # u = update rate, 1e-3 in DeepSeek-V3

so overloaded experts become less attractive and idle ones more. Loads are counted by forward hooks on the routers
(training mode only), so the model code is untouched. ``step`` returns the imbalance it corrected:
max/min load (min counted as at least 1 token) and max/mean load, averaged over MoE layers.

Reference: DeepSeek-V3 technical report §2.1.2 (arXiv 2412.19437); Wang et al., "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts" (arXiv 2408.15664).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kimi_lm.model.moe import TopkRouter


_recomputing = False  # True while activation checkpointing re-runs a forward in backward: those are not new tokens


@contextlib.contextmanager
def not_counted():
    """Router calls inside do not count toward the loads (the recomputed forward of activation checkpointing)."""
    global _recomputing
    before, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = before


class ExpertBiasBalancer:
    """``all_reduce``: sums a tensor over the ranks in place (FSDP: each rank counts its own slice of the batch, and
    every rank must nudge the biases alike)."""

    def __init__(self, model: nn.Module, update_rate: float = 1e-3, all_reduce=None):
        self.update_rate = update_rate
        self.all_reduce = all_reduce
        self.routers = {n: m for n, m in model.named_modules() if isinstance(m, TopkRouter)}
        self.loads = {n: torch.zeros(m.weight.shape[0], dtype=torch.long) for n, m in self.routers.items()}
        self._hooks = [m.register_forward_hook(self._counter(n)) for n, m in self.routers.items()]

    def _counter(self, name: str):
        def hook(module, inputs, output):
            if module.training and not _recomputing:  # evaluation passes and recomputations do not count
                idx = output[1]  # [N, k] chosen experts
                self.loads[name] += torch.bincount(idx.flatten(), minlength=self.loads[name].numel()).cpu()
        return hook

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Nudge every router's bias toward balance; reset the counts; report the loads that were corrected."""
        ratios, peaks = [], []
        if self.all_reduce is not None and self.loads:  # one collective for every router's counts
            total = self.all_reduce(torch.stack(list(self.loads.values())))
            self.loads = dict(zip(self.loads, total))
        for name, router in self.routers.items():
            load = self.loads[name].float()
            if load.sum() == 0:
                continue
            bias = router.e_score_correction_bias
            bias += self.update_rate * torch.sign(load.mean() - load).to(bias.device, bias.dtype)
            ratios.append((load.max() / load.min().clamp(min=1)).item())
            peaks.append((load.max() / load.mean()).item())
            self.loads[name].zero_()
        if not ratios:
            return {}
        return {"moe_load_max_over_min": sum(ratios) / len(ratios), "moe_load_max_over_mean": sum(peaks) / len(peaks)}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
