"""The CPU backend's small layers: RMSNorm in one C pass and the SwiGLU MLP with gate and up packed as one product.

Each is swapped in for its ``kimi_lm.model.layers`` module by ``kimi_lm.cpu.prepare`` and computes what that module
computes (fp32 math, one rounding; the tests compare them). ``F.rms_norm`` on CPU is a composite of ~8 kernels (cast,
pow, mean, add, rsqrt, mul, ...): 1.2 ms at [1024, 512] fp32 on 2 cores where the C pass takes 0.08 ms, and inside a
decode step each of those kernels costs several µs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.cpu import native
from kimi_lm.cpu.onednn import OneDNNFusedLinear, OneDNNLinear
from kimi_lm.cpu.products import FusedProducts
from kimi_lm.model.layers import MLP, RMSNorm


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of gate | up rows [..., 2I] -> [..., I]: one C pass for contiguous rows, else PyTorch (the
    reference: same roundings)."""
    if native.supports(gate_up):
        return native.swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class CpuRMSNorm(RMSNorm):
    """``RMSNorm`` in one C pass for contiguous inputs (the model's own forward for others, e.g. MLA's latent slice)."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps
        self.register_buffer("weight_fp32", norm.weight.detach().float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.supports(x):
            return native.rms_norm(x, self.weight_fp32, self.eps)
        return super().forward(x)


class CpuMLP(MLP):
    """``MLP`` with its gate and up products as one (one packed oneDNN matrix; quantized: one C call reading both in
    place, ``products.FusedProducts``, the two kept as modules) and the SwiGLU in C."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        if type(mlp.gate_proj) is OneDNNLinear and type(mlp.up_proj) is OneDNNLinear:
            self.gate_up_proj = OneDNNFusedLinear({"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}, "gate_up_proj")
        else:
            self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
            self.gate_up_proj = FusedProducts([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))
