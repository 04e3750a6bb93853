"""FP8 block quantization: float8 e4m3 weights with one fp32 scale per 128×128 block (DeepSeek-V3, Kimi K2).

Format (spec §4; DeepSeek-V3 ``README_WEIGHTS.md``, ``inference/kernel.py`` ``weight_dequant``): a linear weight
W [out, in] is stored as

    Q  = ``*.weight``            float8_e4m3fn [out, in]
    S  = ``*.weight_scale_inv``  float32 [⌈out/128⌉, ⌈in/128⌉]
    W[i, j] = Q[i, j] · S[i // 128, j // 128]          (edge blocks are partial, e.g. the 576-row kv_a_proj)

``S`` is the *inverse* of the quantization scale, hence the name: quantizing divides by it. Dequantization multiplies
in fp32 and then rounds to the compute dtype, as DeepSeek's kernel does.

Notable features:
* ``dequantize`` is the plain reference (scales expanded with ``repeat_interleave``); ``dequantize_rows`` is the fast
  path (a broadcast multiply per block column) and must equal it bit for bit (tests/test_fp8.py).
* ``FP8BlockLinear`` keeps Q and S as its state and in ``forward`` dequantizes a tile of rows at a time into the
  input's dtype, so the model never exists in bf16 at once: memory stays ~1 byte per weight.
* ``FP8StackedExperts`` is the same for the stacked MoE experts (gate|up and down per expert).
* ``quantize_modules`` swaps ``nn.Linear`` / ``StackedExperts`` modules chosen by a predicate (the loader's predicate:
  the checkpoint has a ``weight_scale_inv`` for it); ``quantize`` / ``from_float`` pack float weights (tests, convert).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.model.moe import StackedExperts

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# Rows dequantized at once in forward: ~4M weights (16 MiB as fp32) per tile, a multiple of the block height.
TILE_ELEMENTS = 1 << 22


def scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] float -> (Q fp8 [out, in], S fp32 [⌈out/128⌉, ⌈in/128⌉]) with each block's max |W| at 448."""
    out_f, in_f = w.shape
    rb, cb = scale_shape(out_f, in_f)
    blocks = F.pad(w.float(), (0, cb * BLOCK - in_f, 0, rb * BLOCK - out_f)).view(rb, BLOCK, cb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # [rb, cb]
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero block keeps scale 1
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rb * BLOCK, cb * BLOCK)[:out_f, :in_f]
    return q.to(FP8).contiguous(), s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference: W = Q · S with S expanded to one value per weight. Q [out, in] fp8, S [⌈out/128⌉, ⌈in/128⌉]."""
    out_f, in_f = q.shape
    if tuple(s.shape) != scale_shape(out_f, in_f):
        raise ValueError(f"scale shape {list(s.shape)} does not match weight {list(q.shape)} in {BLOCK}x{BLOCK} blocks")
    full = s.float().repeat_interleave(BLOCK, dim=0)[:out_f].repeat_interleave(BLOCK, dim=1)[:, :in_f]
    return (q.float() * full).to(dtype)


def dequantize_rows(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fast path of ``dequantize`` for Q [R, C] whose first row starts a block, S its [⌈R/128⌉, ⌈C/128⌉] scales."""
    R, C = q.shape
    w = q.float()
    s_rows = s.float().repeat_interleave(BLOCK, dim=0)[:R]  # [R, ⌈C/128⌉]: 1/128 of the tile
    full = C - C % BLOCK
    if full:  # view the full block columns as [R, C/128, 128] and scale each in place
        w[:, :full].unflatten(1, (full // BLOCK, BLOCK)).mul_(s_rows[:, : full // BLOCK, None])
    if full < C:  # the partial last block column
        w[:, full:].mul_(s_rows[:, -1:])
    return w.to(dtype)


def linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ with W = Q · S, dequantized one row tile at a time into x's dtype. x [..., in] -> [..., out]."""
    out_f, in_f = q.shape
    rows = max(BLOCK, TILE_ELEMENTS // max(in_f, 1) // BLOCK * BLOCK)
    if rows >= out_f:
        return F.linear(x, dequantize_rows(q, s, x.dtype))
    y = x.new_empty(*x.shape[:-1], out_f)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        y[..., r0:r1] = F.linear(x, dequantize_rows(q[r0:r1], s[r0 // BLOCK : math.ceil(r1 / BLOCK)], x.dtype))
    return y


class FP8BlockLinear(nn.Module):
    """Drop-in for a bias-free ``nn.Linear`` whose weight stays in fp8; parameter names match the checkpoint."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.ones(scale_shape(out_features, in_features), dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "FP8BlockLinear":
        if linear.bias is not None:
            raise ValueError("FP8BlockLinear has no bias (the DeepSeek-V3 / K2 projections have none)")
        module = cls(linear.in_features, linear.out_features)
        q, s = quantize(linear.weight.detach())
        module.weight.data, module.weight_scale_inv = q, s
        return module

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole dequantized [out, in] matrix (for absorbed MLA and conversion)."""
        return dequantize_rows(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, {BLOCK}x{BLOCK} blocks"


class FP8StackedExperts(StackedExperts):
    """``StackedExperts`` with fp8 weights. Gate and up keep separate block grids (I need not be a multiple of 128):
    ``gate_up_proj_scale_inv`` [E, 2·⌈I/128⌉, ⌈hidden/128⌉] holds gate's block rows, then up's."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        nn.Module.__init__(self)  # not StackedExperts.__init__: that would allocate float weights
        I, E = intermediate_size, num_experts
        self.intermediate_size = I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, hidden_size, dtype=FP8), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, hidden_size, I, dtype=FP8), requires_grad=False)
        rb, cb = scale_shape(I, hidden_size)
        self.register_buffer("gate_up_proj_scale_inv", torch.ones(E, 2 * rb, cb, dtype=torch.float32))
        self.register_buffer("down_proj_scale_inv", torch.ones((E, *scale_shape(hidden_size, I)), dtype=torch.float32))

    @classmethod
    def from_float(cls, experts: StackedExperts) -> "FP8StackedExperts":
        E, two_i, hidden = experts.gate_up_proj.shape
        I = two_i // 2
        module = cls(E, hidden, I)
        for e in range(E):
            w = experts.gate_up_proj[e].detach()
            (qg, sg), (qu, su) = quantize(w[:I]), quantize(w[I:])  # gate and up: separate block grids
            module.gate_up_proj.data[e] = torch.cat([qg, qu])
            module.gate_up_proj_scale_inv[e] = torch.cat([sg, su])
            module.down_proj.data[e], module.down_proj_scale_inv[e] = quantize(experts.down_proj[e].detach())
        return module

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """gate | up of expert e, each dequantized tile by tile on its own block grid."""
        I = self.intermediate_size
        rb = self.gate_up_proj_scale_inv.shape[1] // 2
        q, s = self.gate_up_proj[e], self.gate_up_proj_scale_inv[e]
        return torch.cat([linear(x, q[:I], s[:rb]), linear(x, q[I:], s[rb:])], dim=-1)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.down_proj[e], self.down_proj_scale_inv[e])


def quantize_modules(model: nn.Module, predicate: Callable[[str, nn.Module], bool], pack: bool = False) -> list[str]:
    """Swap every ``nn.Linear`` / ``StackedExperts`` for which ``predicate(name, module)`` holds.

    ``pack=False`` (the loader, on the meta device): empty fp8 modules to be filled from a checkpoint.
    ``pack=True``: quantize the module's current float weights. Returns the swapped module names.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and predicate(name, module):
            new = FP8BlockLinear.from_float(module) if pack else FP8BlockLinear(module.in_features, module.out_features)
        elif type(module) is StackedExperts and predicate(name, module):
            E, two_i, hidden = module.gate_up_proj.shape
            new = FP8StackedExperts.from_float(module) if pack else FP8StackedExperts(E, hidden, two_i // 2)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        swapped.append(name)
    return swapped
