"""The CPU backend's rotary embedding (kimi_lm/cpu/rope.py, kernels/rope.c) against the plain one
(kimi_lm/model/rope.py): interleaved and half-split layouts, K2's YaRN scaling, strided slices as MLA hands them, one or several tokens and
sequences, shared or per-sequence positions."""

from __future__ import annotations

import pytest
import torch

from kimi_lm.cpu import native
from kimi_lm.cpu import rope as cpu_rope
from kimi_lm.cpu.rope import C_MAX_ROWS, CpuRotaryEmbedding
from kimi_lm.model.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the plain modules are all")

YARN = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}  # Kimi K2's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("scaling", [None, YARN], ids=["plain", "yarn"])
def test_rotation_in_c_equals_the_plain_one(dtype, interleaved, scaling, monkeypatch):
    plain = RotaryEmbedding(64, 50000.0, scaling, interleaved)
    ours = CpuRotaryEmbedding.of(plain)
    calls = []
    lib = cpu_rope._rope_library()
    monkeypatch.setattr(cpu_rope, "_rope_library", lambda: calls.append(1) or lib)
    g = torch.Generator().manual_seed(0)
    cases = [  # (x, positions): the query's rope slice [B, T, H, 192][..., 128:], the key's [B, T, 576][..., 512:]
        (torch.randn(1, 1, 4, 192, generator=g)[..., 128:], torch.tensor([[3071]])),
        (torch.randn(3, 1, 4, 192, generator=g)[..., 128:], torch.tensor([[5], [900], [70000]])),
        (torch.randn(2, 1, 576, generator=g)[..., 512:], torch.tensor([[17], [4]])),
        (torch.randn(1, 6, 4, 192, generator=g)[..., 128:], torch.arange(100, 106)[None]),
        (torch.randn(2, 3, 576, generator=g)[..., 512:], torch.arange(7, 10)[None]),  # one row shared by both
    ]
    for x, positions in cases:
        x = x.to(dtype)
        got, want = ours(x, positions), plain(x, positions)
        assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
        # cos and sin from libm vs PyTorch's: within an ulp of fp32; after rounding to bf16, within one of bf16
        bound = want.float().abs() * (2**-7 if dtype == torch.bfloat16 else 1e-6) + 1e-6
        assert bool(((got.float() - want.float()).abs() <= bound).all()), (x.shape, positions)
    assert len(calls) == len(cases)
    long_prompt = torch.randn(1, C_MAX_ROWS + 1, 64, generator=g).to(dtype)  # prefill: the tensor ops
    positions = torch.arange(C_MAX_ROWS + 1)[None]
    assert torch.equal(ours(long_prompt, positions), plain(long_prompt, positions)) and len(calls) == len(cases)
