"""A batched decode step over caches of different lengths equals each sequence decoded alone (kimi_lm.batching)."""

import pytest
import torch

from kimi_lm import cpu
from kimi_lm.batching import decode_step
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
