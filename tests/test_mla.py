"""Absorbed MLA (attention in the 576-wide latent space) against the naive expanded form."""

import pytest
import torch

from conftest import rel_err
from kimi_lm.config import preset
from kimi_lm.model.mla import MultiheadLatentAttention


def POS(n: int) -> torch.Tensor:
    """Positions 0 … n − 1 as the [1, n] tensor the layer takes."""
    return torch.arange(n)[None]


@pytest.fixture
def mla():
    torch.manual_seed(0)
    layer = MultiheadLatentAttention(preset("tiny"))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return layer


@pytest.mark.parametrize("T,past", [(1, 0), (1, 30), (7, 0), (5, 40), (16, 9)])
def test_absorbed_equals_naive(mla, T, past):
    x = torch.randn(2, past + T, preset("tiny").hidden_size)
    q_in, kv_in = mla.project(x)
    latent = mla.latent(kv_in, POS(past + T))  # [2, past + T, 40]
    q = mla._queries(q_in[:, past:], POS(past + T)[:, past:])
    with torch.no_grad():
        naive = mla.attend_naive(q, latent, past)
        absorbed = mla.attend_absorbed(q, latent, past)
    assert rel_err(absorbed, naive) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_decode_path(mla, dtype, monkeypatch):
    """The CPU backend's one-token decode: one C call (kernels/mla.c) where the kernels are built; without them, fp32
    over exactly its history goes through SDPA's fused kernel (one read of the history) and bf16 keeps the two
    matmuls. Each against the plain layer's naive form."""
    from kimi_lm.cpu import mla as cpu_mla
    from kimi_lm.cpu.mla import CpuMultiheadLatentAttention

    past = 25
    layer = CpuMultiheadLatentAttention(mla.to(dtype))
    x = torch.randn(2, past + 1, preset("tiny").hidden_size).to(dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    built = cpu_mla.native.library() is not None
    with torch.no_grad():
        q_in, kv_in = layer.project(x)
        latent = layer.latent(kv_in, POS(past + 1))
        q = layer._queries(q_in[:, past:], POS(past + 1)[:, past:])  # a strided view, as the layer hands it
        naive = layer.attend_naive(q, latent, past)
        calls.clear()
        in_c = layer.attend_absorbed(q, latent, past)
        c_calls = len(calls)
        monkeypatch.setattr(cpu_mla.native, "library", lambda: None)
        fallback = layer.attend_absorbed(q, latent, past)
    sdpa_calls = 2 if dtype == torch.float32 else 0  # the fallback: one per sequence
    assert c_calls == (0 if built else sdpa_calls)  # the C call, not SDPA
    assert len(calls) - c_calls == sdpa_calls, calls
    for got in (in_c, fallback):
        assert rel_err(got, naive) < (1e-5 if dtype == torch.float32 else 3e-2)


def test_cache_stores_only_the_latent(mla):
    cfg = preset("tiny")
    cache = mla.make_cache(batch_size=2, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        mla(torch.randn(2, 9, cfg.hidden_size), cache)
        mla(torch.randn(2, 1, cfg.hidden_size), cache)
    assert cache.length == 10
    assert cache.nbytes == 2 * 10 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


@pytest.mark.parametrize("T", [1, 5])
def test_absorbed_ignores_padding_rows_past_the_history(mla, T):
    """Half-precision decode attends over the history rounded up to 64 tokens (spare buffer rows): those rows must
    be masked out, whatever they hold."""
    past = 30
    x = torch.randn(2, past + T, preset("tiny").hidden_size)
    q_in, kv_in = mla.project(x)
    latent = mla.latent(kv_in, POS(past + T))
    padded = torch.cat([latent, 5 * torch.randn(2, 64 - past - T, latent.shape[-1])], dim=1)
    q = mla._queries(q_in[:, past:], POS(past + T)[:, past:])
    with torch.no_grad():
        assert rel_err(mla.attend_absorbed(q, padded, past), mla.attend_absorbed(q, latent, past)) < 1e-6


def test_bf16_cache_pads_to_64_and_matches_exact_length(mla):
    from kimi_lm.cache import MLACache
    from kimi_lm.cpu.mla import CpuMultiheadLatentAttention

    layer = CpuMultiheadLatentAttention(mla)
    cache = MLACache(1, 8, torch.bfloat16)
    history = cache.append(torch.randn(1, 70, 8).to(torch.bfloat16))
    padded = layer.decode_history(cache, history)
    assert padded.shape[1] == 128 and torch.equal(padded[:, :70], history)
    assert not padded[:, 70:].any()  # spare rows start as zeros
    fp32 = MLACache(1, 8, torch.float32)
    assert layer.decode_history(fp32, fp32.append(torch.randn(1, 70, 8))).shape[1] == 70
