"""Shared primitives: RMSNorm and the SwiGLU MLP (dense layer, shared experts).

RMSNorm normalises in fp32 and multiplies by the weight before the one rounding to the input dtype (the reference
implementations round x / rms to the input dtype first and multiply after; see ``RMSNorm.forward``). The kv-latent
norm of MLA uses eps 1e-6 (spec §4.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.ops import native

# Inputs up to this many values (decode steps) take the one-kernel form of ``rms_norm``.
ONE_KERNEL_MAX_NUMEL = 4096


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, owner: nn.Module | None = None) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dim: ``F.rms_norm``; one C pass (ops/native.py) for CPU
    inference with a weight; one PyTorch kernel for other decode-sized inputs.

    On CPU ``F.rms_norm`` is a composite of ~8 kernels (cast, pow, mean, add, rsqrt, mul, ...), and inside a decode
    step every kernel costs several µs. ``layer_norm`` is one fused kernel, and layer_norm of [x, −x] over 2D values
    is exactly rms_norm of x: that vector's mean is 0 and its variance is mean(x²) (same values to ≤ 2e-9 relative
    in fp32, identical in bf16 in the tests; bench bf16 decode step 3–5 % faster). Larger inputs, and anything that
    needs gradients, use ``F.rms_norm`` (there the concatenation's extra memory traffic costs more than it saves).
    ``weight`` is used in x's dtype; ``owner`` keeps the doubled weight [w, w] between calls (rebuilt when the
    weight changes).
    """
    D = x.shape[-1]
    if weight is not None and native.supports(x, weight):
        # CPU inference: one pass in C (0.08 ms at [1024, 512] fp32 on 2 cores, where F.rms_norm's kernels take
        # 1.2 ms), and for a decode step one call whose output is contiguous (the layer_norm form below returns a
        # strided slice, which the decode kernels' callers would have to copy)
        return native.rms_norm(x, derived(owner, "fp32", weight, torch.Tensor.float), eps)
    if (x.numel() > ONE_KERNEL_MAX_NUMEL or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)))):
        return F.rms_norm(x, (D,), None if weight is None else weight.to(x.dtype), eps=eps)
    doubled = None if weight is None else derived(owner, f"doubled_{x.dtype}", weight,
                                                   lambda w: torch.cat([w, w]).to(x.dtype))
    return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * D,), doubled, None, eps)[..., :D]


def derived(owner: nn.Module | None, name: str, weight: torch.Tensor, make) -> torch.Tensor:
    """``make(weight)``, kept on ``owner`` between calls and made again when the weight changes (in place or
    replaced): for inference-only derived copies such as a doubled or fp32 weight. Without an owner, or when
    gradients must flow to the weight, it is simply made."""
    if owner is None or (torch.is_grad_enabled() and weight.requires_grad):
        return make(weight)
    key = (weight.data_ptr(), weight._version, weight.dtype)
    kept = owner.__dict__.get("_derived_" + name)
    if kept is None or kept[0] != key:
        kept = owner.__dict__["_derived_" + name] = (key, make(weight))
    return kept[1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One fused call that works in fp32 and rounds once. In bf16 the reference rounds x / rms to bf16 before
        multiplying by the weight; rounding once is ≤ 1 ulp from that and closer to the exact value (mean error
        1.1e-3 vs 1.5e-3 on unit-scale inputs; bench-preset logits vs the fp32 model: median 0.111 vs 0.133), and
        one call instead of four matters in a decode step (each small op costs several µs there)."""
        if x.dtype == self.weight.dtype:
            return rms_norm(x, self.weight, self.eps, owner=self)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the KDA output times sigmoid(gate), all in fp32 with a single cast at the end (the
    order of fla's fused kernel). One weight [head_dim] shared by every head; input [..., head_dim]."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        normed = rms_norm(x.float(), self.weight, self.eps, owner=self)  # (x / rms) · w, fp32
        return (normed * torch.sigmoid(gate.float())).to(out_dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of gate | up rows [..., 2I] -> [..., I]: one C pass for contiguous CPU rows (ops/native.py),
    else PyTorch (the reference: same roundings)."""
    if native.supports(gate_up):
        return native.swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj = None  # inference: gate and up packed as one product (ops/onednn.py)

    def fuse_projections(self) -> None:
        from kimi_lm.ops.onednn import fuse

        fuse(self, "gate_up_proj", ("gate_proj", "up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(swiglu(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
