"""A batched decode step over caches of different lengths equals each sequence decoded alone, and a packed prefill
(several sequences' chunks side by side in one forward) equals each chunk prefilled alone (kimi_lm.batching)."""

import pytest
import torch

from kimi_lm import cpu
from kimi_lm.batching import decode_step, prefill_packed
from kimi_lm.config import preset
from kimi_lm.model.kimi_k2 import KimiK2ForCausalLM
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.prompt_cache import make_cache


@pytest.fixture(scope="module", params=["kimi_linear", "kimi_k2", "kimi_linear-cpu", "kimi_k2-cpu"])
def model(request):
    """Kimi Linear (KDA + NoPE MLA) and K2 (rotary MLA: each row needs its own positions), plain and on the CPU
    backend (its KDA decode reads each row's state where it lies; its rope and products run in C)."""
    torch.manual_seed(0)
    m = (KimiLinearForCausalLM(preset("tiny")) if request.param.startswith("kimi_linear")
         else KimiK2ForCausalLM(preset("tiny-k2"))).eval()
    with torch.no_grad():  # make the KDA decay and the MLA scores matter (default init leaves them near-trivial)
        for name, p in m.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif "norm" not in name:
                p.normal_(0, p.shape[-1] ** -0.5)
    if request.param.endswith("-cpu"):
        m = cpu.prepare(m.requires_grad_(False))
    return m


def _prefilled(model, prompt, max_kv_size=None):
    cache = make_cache(model, 1, max_kv_size)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache)[0, -1]
    return cache, int(logits.argmax())


@pytest.mark.parametrize("max_kv_size", [None, 6])
def test_batched_steps_equal_single_sequence_steps(model, max_kv_size):
    torch.manual_seed(1)
    prompts = [torch.randint(0, 200, (n,)).tolist() for n in (3, 11, 7, 1)]  # different lengths: the rows' histories differ
    batched = [_prefilled(model, p, max_kv_size) for p in prompts]
    alone = [_prefilled(model, p, max_kv_size) for p in prompts]
    tokens = [t for _, t in batched]
    # The plain model already differs by ~7e-6 between batch 2 and batch 1 at these logit sizes (|logit| < 3: BLAS
    # blocking and MoE grouping depend on the batch), so later steps, whose state carries that rounding, get 1e-4.
    for step in range(5):  # several steps: the copied-back KDA state and appended latents must carry over
        logits = decode_step(model, [c for c, _ in batched], tokens)
        for b, (cache, token) in enumerate(alone):
            with torch.no_grad():
                ref = model(torch.tensor([[token]]), cache=cache)[0, -1]
            torch.testing.assert_close(logits[b], ref, rtol=0, atol=1e-5 if step == 0 else 1e-4)
            alone[b] = (cache, int(ref.argmax()))
        tokens = [int(t) for t in logits.argmax(-1)]
        assert tokens == [t for _, t in alone]
    for (cb, _), (ca, _), p in zip(batched, alone, prompts):
        assert cb.offset == ca.offset == len(p) + 5
        for lb, la in zip(cb.layers, ca.layers):
            if hasattr(lb, "state"):
                torch.testing.assert_close(lb.state, la.state, rtol=0, atol=1e-4)
                torch.testing.assert_close(lb.conv_state, la.conv_state, rtol=0, atol=1e-4)
            else:
                assert lb.length == la.length


def test_rows_of_different_lengths_stay_independent(model):
    """A 2-token row decoded beside a 40-token row attends over its own history only."""
    short, _ = _prefilled(model, [5, 6])
    long, _ = _prefilled(model, list(range(40)))
    ref_cache, _ = _prefilled(model, [5, 6])
    logits = decode_step(model, [short, long], [7, 8])
    with torch.no_grad():
        ref = model(torch.tensor([[7]]), cache=ref_cache)[0, -1]
    torch.testing.assert_close(logits[0], ref, rtol=0, atol=1e-5)
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # the rows really are different sequences


def _assert_caches_close(got, want):
    for g, w in zip(got, want):
        assert g.offset == w.offset
        for lg, lw in zip(g.layers, w.layers):
            if hasattr(lg, "state"):
                torch.testing.assert_close(lg.state, lw.state, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(lg.conv_state, lw.conv_state, rtol=1e-4, atol=1e-4)
            else:
                assert lg.length == lw.length
                torch.testing.assert_close(lg.buffer[:, : lg.length], lw.buffer[:, : lw.length], rtol=1e-4, atol=1e-4)


def _packed_equals_alone(model, max_kv_size=None, vocab=200):
    """Two rounds of packed chunks (a chunked prefill; one-token chunks among them) against the same chunks fed to
    each cache alone, then a decode step of all of them."""
    torch.manual_seed(2)
    rounds = [[torch.randint(0, vocab, (n,)).tolist() for n in lengths] for lengths in ((3, 11, 1, 7), (2, 1, 5, 4))]
    packed = [make_cache(model, 1, max_kv_size) for _ in rounds[0]]
    alone = [make_cache(model, 1, max_kv_size) for _ in rounds[0]]
    for chunks in rounds:
        got = prefill_packed(model, packed, chunks)
        with torch.no_grad():
            want = torch.stack([model(torch.tensor([c]), cache=a)[0, -1] for a, c in zip(alone, chunks)])
        assert got.shape == want.shape and got.dtype == torch.float32
        # the rounding of products over more rows (a mix-up of sequences would differ by O(1)), relative to the logits
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=0, atol=5e-5 * scale)
        _assert_caches_close(packed, alone)
    tokens = [int(t) for t in got.argmax(-1)]
    # the states carry the packed products' rounding (as test_batched_steps_equal_single_sequence_steps' later steps)
    torch.testing.assert_close(decode_step(model, packed, tokens), decode_step(model, alone, tokens), rtol=0,
                               atol=1e-4 * scale)


@pytest.mark.parametrize("max_kv_size", [None, 6])
def test_packed_prefill_equals_each_chunk_prefilled_alone(model, max_kv_size):
    """Several sequences' chunks in one forward: each chunk's last logits and each cache (KDA state and conv tail,
    MLA latents, offsets; rotary positions per sequence for K2; a sliding window) as if prefilled alone, and the
    decoding after it; nothing attends across sequences."""
    _packed_equals_alone(model, max_kv_size)


def test_packed_prefill_of_k3_and_block_attnres_models():
    """Kimi K3's mixers (lower-bounded decay, output gates) and Block AttnRes (depth attention between sublayers: per
    token, so packing leaves it alone) take a packed prefill too."""
    import dataclasses

    from k3_checkpoints import random_model, tiny_config

    _packed_equals_alone(random_model(tiny_config()))
    torch.manual_seed(0)
    attn_res = KimiLinearForCausalLM(dataclasses.replace(preset("tiny"), attn_res_block_size=2)).eval()
    _packed_equals_alone(attn_res)


def test_packed_prefill_of_one_chunk_of_one_token(model):
    """The smallest pack: one sequence, one token (a [1, 1] row, which the one-token decode paths must leave alone)."""
    packed, alone = make_cache(model, 1), make_cache(model, 1)
    got = prefill_packed(model, [packed], [[5]])
    with torch.no_grad():
        want = model(torch.tensor([[5]]), cache=alone)[0, -1]
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-5)
    _assert_caches_close([packed], [alone])


def test_packed_prefill_refuses_an_empty_chunk(model):
    caches = [make_cache(model, 1) for _ in range(2)]
    with pytest.raises(ValueError, match="at least one token"):
        prefill_packed(model, caches, [[1, 2], []])
    assert [c.offset for c in caches] == [0, 0]


def test_k2_sliding_window_keeps_absolute_positions():
    """A rotary model with a sliding MLA window: positions keep counting past the window (its cache's length stops
    at the window), so while the context fits the window the output equals the unwindowed model's."""
    torch.manual_seed(0)
    model = KimiK2ForCausalLM(preset("tiny-k2")).eval()
    ids = torch.randint(0, 200, (1, 12))
    windowed, full = make_cache(model, 1, max_kv_size=8), make_cache(model, 1)
    with torch.no_grad():
        for t in range(12):
            got, want = model(ids[:, t : t + 1], cache=windowed), model(ids[:, t : t + 1], cache=full)
            if t < 8:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert windowed.layers[0].length == 8 and full.layers[0].length == 12 and windowed.offset == 12
    reference = model(ids)[:, -1]
    assert (got[:, -1] - reference).abs().max() > 1e-4  # past the window the output changes, as documented
