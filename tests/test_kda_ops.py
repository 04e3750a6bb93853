"""Chunked KDA and the one-step decode against the token-by-token oracle (outputs, final state, gradients)."""

import pytest
import torch

from conftest import rel_err
from kimi_lm.ops.kda import decay_exp, kda_chunked, kda_gate, kda_step, l2_normalize
from kimi_lm.ops.kda_naive import kda_recurrent_naive


def make_inputs(B, T, H, K, V, decay_scale, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(B, T, H, K, generator=g)) * K**-0.5
    k = l2_normalize(torch.randn(B, T, H, K, generator=g))
    v = torch.randn(B, T, H, V, generator=g)
    # log decays from ~0 (long memory) to −decay_scale per token (forgets within a few tokens)
    gate = -torch.rand(B, T, H, K, generator=g) * decay_scale
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, K, V, generator=g)
    return [x.to(dtype) for x in (q, k, v, gate, beta)] + [state]


def max_sub_chunk_span(g: torch.Tensor, sub: int = 16, chunk: int = 64) -> float:
    """Largest log-decay of one channel inside one 16-token sub-chunk (which intra-chunk path kda_chunked takes)."""
    T = g.shape[1]
    spans = [-g[:, c + s + 1 : min(c + s + sub, T)].sum(1).min().item()
             for c in range(0, T, chunk) for s in range(0, min(chunk, T - c), sub)]
    return max(spans)


# decay_scale 0.5: every sub-chunk spans < 80 nats (factorised path); 12: 80–160 (diagonal blocks through the
# sub-chunk midpoint); 30: > 160 (diagonal blocks pair by pair)
PATHS = {0.5: (0, 80), 12.0: (80, 160), 30.0: (160, float("inf"))}


@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 150])
@pytest.mark.parametrize("decay_scale", list(PATHS))
def test_chunked_matches_recurrent_oracle(T, decay_scale):
    q, k, v, g, beta, state = make_inputs(2, T, 3, 16, 12, decay_scale)
    if T >= 63:
        low, high = PATHS[decay_scale]
        assert low < max_sub_chunk_span(g) <= high  # the case exercises the path it is meant to
    for init in (None, state):
        o_ref, s_ref = kda_recurrent_naive(q, k, v, g, beta, init)
        o, s = kda_chunked(q, k, v, g, beta, init)
        assert rel_err(o, o_ref) < 1e-5
        assert rel_err(s, s_ref) < 1e-5


def test_step_matches_oracle():
    q, k, v, g, beta, state = make_inputs(2, 20, 2, 8, 8, 1.0)
    o_ref, s_ref = kda_recurrent_naive(q, k, v, g, beta, state)
    s = state.clone()
    outs = [kda_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s) for t in range(20)]
    assert rel_err(torch.stack(outs, 1), o_ref) < 1e-6
    assert rel_err(s, s_ref) < 1e-6


@pytest.mark.parametrize("decay_scale", list(PATHS))
def test_chunked_gradients_match_oracle(decay_scale):
    inputs = make_inputs(1, 70, 2, 8, 8, decay_scale)
    leaves_a = [x.clone().requires_grad_(True) for x in inputs]
    leaves_b = [x.clone().requires_grad_(True) for x in inputs]
    o_a, s_a = kda_chunked(*leaves_a)
    o_b, s_b = kda_recurrent_naive(*leaves_b)
    w_o, w_s = torch.randn_like(o_a), torch.randn_like(s_a)
    ((o_a * w_o).sum() + (s_a * w_s).sum()).backward()
    ((o_b * w_o).sum() + (s_b * w_s).sum()).backward()
    for a, b in zip(leaves_a, leaves_b):
        assert rel_err(a.grad, b.grad) < 1e-4


def test_state_and_output_are_fp32_for_bf16_inputs():
    q, k, v, g, beta, state = make_inputs(1, 40, 2, 8, 8, 1.0, dtype=torch.bfloat16)
    o, s = kda_chunked(q, k, v, g, beta)
    assert o.dtype == torch.float32 and s.dtype == torch.float32


def test_gate_formula_and_dtype():
    f = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16)
    A_log = torch.randn(4, 1)
    dt_bias = torch.randn(4, 5)
    g = kda_gate(f, A_log, dt_bias)
    expected = -A_log.exp() * torch.log1p((f.float() + dt_bias).exp())
    assert g.dtype == torch.float32
    assert rel_err(g, expected) < 1e-6
    assert (g <= 0).all()


def test_decay_exp_equals_exp_over_the_whole_range():
    """exp(x/2)² stands in for exp(x) on log-decays: the same value to a few ulp where exp(x) is a normal float,
    the same tiny (denormal) or zero value below, and exp's gradient."""
    x = torch.cat([-torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 400,
                   torch.tensor([0.0, -1e-7, -87.0, -87.5, -103.0, -174.0, -174.5, -1e4, -float("inf")])])
    exact = x.double().exp()
    got = decay_exp(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    normal = exact >= torch.finfo(torch.float32).tiny
    assert ((got.double() - exact).abs() / exact)[normal].max() < 4e-7
    assert (got.double() - exact)[~normal].abs().max() < 1e-44  # denormal range: within a couple of denormal steps
    assert got[-3:].eq(0).all()
    leaf = x[:100].clone().requires_grad_(True)
    decay_exp(leaf).sum().backward()
    assert rel_err(leaf.grad, x[:100].exp()) < 1e-6
