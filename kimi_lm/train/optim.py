"""Optimizers and learning-rate schedule: Muon for hidden matrices, AdamW for everything else, WSD.

Which parameter goes where (``param_groups``; every parameter exactly once):

* ``torch.optim.Muon``: every 2-D weight of a hidden layer (KDA / MLA projections, dense MLP, shared experts) and
  the routed experts, one matrix per expert (``gate_up_proj`` [E, 2I, H] is E gate and E up matrices [I, H],
  ``down_proj`` [E, H, I] is E matrices [H, I]: each is the checkpoint's own ``w1`` / ``w3`` / ``w2``).
  Muon's update is scaled as Moonshot's (``adjust_lr_fn="match_rms_adamw"``: 0.2·√max(A, B)), so one learning
  rate and weight decay serve both optimizers (Moonlight).
* AdamW, with weight decay: the embedding, ``lm_head``, router gates, AttnRes pseudo-queries (a (1, d) "matrix"
  must never be orthogonalised: Newton–Schulz would turn it into a unit-norm sign pattern).
* AdamW, no weight decay: norms, ``A_log``, ``dt_bias``, conv taps: the non-matrix parameters.

``torch.optim.Muon`` takes 2-D tensors only, so stacked experts are handed to it as 2-D views of the stacked
parameter (same storage); ``Optimizers.step`` points each view's ``.grad`` at the matching slice of the stacked
gradient first, and Muon's in-place update writes straight into the stacked weight.

Under FSDP2 (``train --fsdp``) every parameter is a DTensor sharded along dim 0. ``torch.optim.Muon`` runs on
such parameters, but its Newton–Schulz iteration then runs on sharded bf16 DTensors whose matmuls sum partial
products across ranks in another order: measured on a 48×40 matrix, two ranks drift 4e-3 (absolute, in the weights)
from the one-process result after two steps. So ``Optimizers(sharded=True)`` uses :class:`GatheredMuon`: the
momentum buffer stays sharded (its update is elementwise), each parameter's update is gathered whole for
Newton–Schulz (per expert matrix for stacked experts), and every rank keeps its own rows of the result: the same
numbers as ``torch.optim.Muon`` on the full matrix (tests/test_fsdp.py checks it), at one all-gather per matrix.

WSD (warmup–stable–decay, MiniCPM / flame / the Kimi Linear report): linear warmup to the peak, constant, then a
linear decay over the last ``decay_ratio`` of the steps down to ``min_ratio`` × peak.

References: Muon (Jordan et al. 2024); "Muon is Scalable for LLM Training" (Moonlight, arXiv 2502.16982);
torchtitan ``lr_scheduler.py`` (WSD with ``decay_ratio``); spec ``attention_residuals.md`` §2 (optimizer of w).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# name fragments of 2-D parameters that are not hidden-layer matrices
_ADAMW_MATRICES = ("embed_tokens.", "lm_head.", "block_sparse_moe.gate.weight", "_res_proj.")
# stacked experts -> how each expert's rows split into the checkpoint's matrices (gate|up rows, or whole)
_STACKED = {"experts.gate_up_proj": 2, "experts.down_proj": 1}


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{"muon", "muon_stacked", "adamw_decay", "adamw_no_decay"} -> [(name, parameter)], covering each once."""
    groups = {"muon": [], "muon_stacked": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(tuple(_STACKED)):
            groups["muon_stacked"].append((name, p))
        elif p.ndim == 2 and not any(k in name for k in _ADAMW_MATRICES):
            groups["muon"].append((name, p))
        elif p.ndim == 2:
            groups["adamw_decay"].append((name, p))
        else:
            groups["adamw_no_decay"].append((name, p))
    return groups


def expert_matrices(name: str, p: torch.Tensor) -> list[torch.Tensor]:
    """2-D views of a stacked expert parameter, one per checkpoint matrix (sharing storage with ``p``)."""
    parts = next(n for suffix, n in _STACKED.items() if name.endswith(suffix))
    return [m for e in range(p.shape[0]) for m in p[e].chunk(parts, dim=0)]


# torch.optim.Muon's constants (torch/optim/_muon.py): quintic Newton–Schulz coefficients, steps, norm floor
NS_COEFFICIENTS, NS_STEPS, NS_EPS = (3.4445, -4.7750, 2.0315), 5, 1e-7


def newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """The orthogonalised update of one matrix g [A, B], computed exactly as ``torch.optim.Muon`` does (bf16)."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    if g.size(0) > g.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=NS_EPS))
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


def muon_lr_scale(shape) -> float:
    """Moonshot's update scale ("match_rms_adamw"): 0.2·√max(A, B) for a matrix [A, B]."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))


class GatheredMuon(torch.optim.Optimizer):
    """Muon (Nesterov momentum, Newton–Schulz, decoupled weight decay, "match_rms_adamw" scale) for parameters sharded
    along dim 0 by FSDP2: momentum on the local rows, Newton–Schulz on the gathered update of each matrix. ``parts``
    maps a stacked expert parameter [E, R, C] to its matrices per expert (2: gate | up rows, 1: whole)."""

    def __init__(self, params, parts: dict, lr: float, weight_decay: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.parts = parts  # id(param) -> matrices per expert; absent for a plain 2-D matrix

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor

        from kimi_lm.distributed.fsdp import rows_of

        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                local = (lambda t: t.to_local()) if isinstance(p, DTensor) else (lambda t: t)
                grad, buf = local(p.grad), local(state["momentum_buffer"])
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu)  # Nesterov
                if isinstance(p, DTensor):
                    update = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape,
                                                stride=p.stride()).full_tensor()
                parts = self.parts.get(id(p))
                if parts is None:
                    ortho, scale = newton_schulz(update), muon_lr_scale(p.shape)
                else:  # each expert's gate / up / down matrix on its own, as torch.optim.Muon gets them unsharded
                    mats = [m for e in update for m in e.chunk(parts, dim=0)]
                    ortho = torch.stack([newton_schulz(m) for m in mats]).view(update.shape)
                    scale = muon_lr_scale(mats[0].shape)
                mine = local(p)
                mine.mul_(1 - lr * wd)
                mine.add_(rows_of(ortho, p), alpha=-lr * scale)


class Optimizers:
    """Muon + AdamW stepped together, with the WSD multiplier applied to both peak learning rates.

    ``sharded``: the parameters are FSDP2 DTensors; Muon is :class:`GatheredMuon` on whole parameters (stacked
    experts included, no views), AdamW runs on the local shards."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                 momentum: float = 0.95, sharded: bool = False):
        self.model = model
        groups = param_groups(model)
        self.stacked = [] if sharded else groups["muon_stacked"]
        # detached views: leaves of their own, so Muon accepts them; in-place updates land in the stacked weight
        self.expert_views = [v for name, p in self.stacked for v in expert_matrices(name, p.detach())]
        if sharded:
            parts = {id(p): next(n for suffix, n in _STACKED.items() if name.endswith(suffix))
                     for name, p in groups["muon_stacked"]}
            self.muon = GatheredMuon([p for _, p in groups["muon"] + groups["muon_stacked"]], parts, lr=lr,
                                     weight_decay=weight_decay, momentum=momentum)
        else:
            self.muon = torch.optim.Muon([p for _, p in groups["muon"]] + self.expert_views, lr=lr,
                                         weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(
            [{"params": [p for _, p in groups["adamw_decay"]], "weight_decay": weight_decay},
             {"params": [p for _, p in groups["adamw_no_decay"]], "weight_decay": 0.0}],
            lr=lr, betas=betas, eps=1e-8,
        )
        self.peak_lr = lr
        # optimizer-state tensors are saved under these names (same order as the optimizers' parameter indices)
        self.muon_names = [n for n, _ in groups["muon"]] + ([n for n, _ in groups["muon_stacked"]] if sharded else [
            f"{name}.{i}" for name, p in self.stacked for i in range(len(expert_matrices(name, p)))])
        self.adamw_names = [n for n, _ in groups["adamw_decay"]] + [n for n, _ in groups["adamw_no_decay"]]

    def set_lr(self, multiplier: float) -> float:
        lr = self.peak_lr * multiplier
        for opt in (self.muon, self.adamw):
            for g in opt.param_groups:
                g["lr"] = lr
        return lr

    def step(self) -> None:
        views = iter(self.expert_views)
        for name, p in self.stacked:  # each view's gradient = the matching slice of the stacked gradient
            grads = expert_matrices(name, p.grad) if p.grad is not None else [None] * len(expert_matrices(name, p))
            for g in grads:
                next(views).grad = g
        self.muon.step()
        self.adamw.step()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        for v in self.expert_views:
            v.grad = None

    # ---- state as named tensors (saved with safetensors; nothing pickled) -------------------------------------
    def live_state(self) -> dict[str, torch.Tensor]:
        """Every optimizer-state tensor by name, the optimizers' own (sharded) tensors, created as zeros where a
        step has not made them yet: what torch.distributed.checkpoint saves, and loads into in place."""
        for opt in (self.muon, self.adamw):
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state[p]
                    if opt is self.muon:
                        state.setdefault("momentum_buffer", torch.zeros_like(p))
                    else:
                        state.setdefault("step", torch.tensor(0.0))
                        state.setdefault("exp_avg", torch.zeros_like(p))
                        state.setdefault("exp_avg_sq", torch.zeros_like(p))
        out = {}
        for prefix, opt, names in (("muon", self.muon, self.muon_names), ("adamw", self.adamw, self.adamw_names)):
            params = [p for group in opt.param_groups for p in group["params"]]
            for name, p in zip(names, params):
                out.update({f"{prefix}.{name}.{key}": value for key, value in opt.state[p].items()})
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, opt, names in (("muon", self.muon, self.muon_names), ("adamw", self.adamw, self.adamw_names)):
            for i, state in opt.state_dict()["state"].items():
                for key, value in state.items():
                    out[f"{prefix}.{names[i]}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for prefix, opt, names in (("muon", self.muon, self.muon_names), ("adamw", self.adamw, self.adamw_names)):
            sd = opt.state_dict()
            sd["state"] = {}
            for i, name in enumerate(names):
                keys = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == f"{prefix}.{name}"}
                if keys:
                    sd["state"][i] = keys
            opt.load_state_dict(sd)


def wsd(step: int, total: int, warmup: int, decay_ratio: float, min_ratio: float = 0.1) -> float:
    """LR multiplier of 0-based ``step`` of ``total``: (step+1)/warmup, then 1, then linear to ``min_ratio`` over
    the last ``round(decay_ratio · total)`` steps (the last step trains at exactly ``min_ratio``)."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = round(decay_ratio * total)
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / decay_steps  # in (0, 1]
    return 1.0 - (1.0 - min_ratio) * progress
