"""Weight initialisation for training from scratch, applied to a built model from outside (torchtitan style).

The model classes allocate parameters without a meaningful init (the loader overwrites them all). Training starts
from what the reference implementations use:

* every matrix (projections, embedding, router, stacked experts): N(0, 0.02), transformers' ``initializer_range``;
  the residual-writing projections (``o_proj``, ``down_proj``) are scaled by 1/√(2·layers) as in GPT-2 / nanoGPT,
  so the residual stream's variance does not grow with depth;
* KDA (fla ``layers/kda.py``): ``A_log = log U(1, 16)`` (K3's zero padding past the heads stays 0); ``dt_bias`` = softplus⁻¹(dt), dt log-uniform in
  [1e-3, 1e-1]; conv taps as ``nn.Conv1d``'s default (uniform ±1/√width);
* norms 1, the router's correction bias 0, AttnRes pseudo-queries 0 (the paper: zero init avoids early volatility).

References: transformers ``KimiLinearPreTrainedModel._init_weights``; fla ``KimiDeltaAttention``; nanoGPT
``model.py`` (``c_proj`` scaling); spec ``attention_residuals.md`` §1 (zero-initialised queries).
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Module:
    """Initialise every parameter of a Kimi Linear (or K3) model in place (deterministic given ``generator``).

    A parameter sharded by FSDP2 (a DTensor) is initialised whole in a temporary tensor, one parameter at a time,
    and keeps its own rows: the same weights as one process, drawn in the same order, with one parameter's worth
    of extra memory."""
    from torch.distributed.tensor import DTensor

    from kimi_lm.distributed.fsdp import rows_of

    for name, p in model.named_parameters():
        whole = torch.empty(p.shape, dtype=p.dtype) if isinstance(p, DTensor) else p
        _init_one(name, whole, model.config, std, generator)
        if whole is not p:
            p.to_local().copy_(rows_of(whole, p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    return model


def _init_one(name: str, p: torch.Tensor, config, std: float, generator: torch.Generator | None) -> None:
    leaf = name.rsplit(".", 1)[0] if name.endswith(".weight") else name
    if leaf.endswith("_res_proj"):  # AttnRes pseudo-query: zero, the op starts as a plain average
        p.zero_()
    elif name.endswith("norm.weight"):
        p.fill_(1.0)
    elif name.endswith("A_log"):
        p.copy_(torch.empty_like(p).uniform_(1, 16, generator=generator).log())
        heads = getattr(config, "kda_num_heads", p.numel())
        if p.ndim == 1 and p.numel() > heads:  # K3 stores A_log zero-padded to the head dim: keep the padding 0
            p[heads:] = 0
    elif name.endswith("dt_bias"):
        dt = torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1), generator=generator).exp().clamp_min(1e-4)
        p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    elif name.endswith("conv1d.weight"):
        bound = 1 / math.sqrt(p.shape[-1])
        p.uniform_(-bound, bound, generator=generator)
    elif leaf.endswith(("o_proj", "down_proj")):
        p.normal_(0.0, std / math.sqrt(2 * config.num_hidden_layers), generator=generator)
    else:
        p.normal_(0.0, std, generator=generator)
