"""The CPU backend's whole-layer decode step (kimi_lm/cpu/layer.py, kernels/layer.c): a KDA decoder layer's token in
one C call, for one sequence and for a batched step of several (each with its own cache), against the same layer's
module path (bit for bit: the same kernels in the same order) and the plain model, for float and MLX-quantized
weights, MoE and dense feed-forward layers; and where it must not apply."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import rel_err
from kimi_lm import cpu
from kimi_lm.config import preset
from kimi_lm.cpu import layer as cpu_layer
from kimi_lm.cpu import native
from kimi_lm.cpu.layer import CpuDecoderLayer
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.quant.packed import QuantSpec
from test_cpu_quant import _quantized_tiny

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the plain modules are all")


@pytest.fixture
def layer_calls(monkeypatch):
    """The kda_layer_decode_rows calls, by their number of sequences."""
    calls = []
    lib = cpu_layer._layer_library()

    class Counting:
        def kda_layer_decode_rows(self, plan, B, *args):
            calls.append(B)
            return lib.kda_layer_decode_rows(plan, B, *args)

    monkeypatch.setattr(cpu_layer, "_layer_library", lambda: Counting())
    return calls


def _plain(dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(preset("tiny")).to(dtype).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.1)
    return model


def _decode_both_ways(prepared, ids: torch.Tensor, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Logits of `steps` decode steps after a prompt, through the layer calls and through the modules (each with its
    own cache), side by side."""
    layers = [m for m in prepared.modules() if isinstance(m, CpuDecoderLayer)]
    caches = [prepared.make_cache(ids.shape[0]) for _ in range(2)]
    prompt = ids.shape[1] - steps
    for cache in caches:
        prepared(ids[:, :prompt], cache)
    pairs = []
    for t in range(prompt, ids.shape[1]):
        one_call = prepared(ids[:, t : t + 1], caches[0])
        plans = [layer._plan for layer in layers]
        for layer in layers:
            layer._plan = None  # the module path
        modules = prepared(ids[:, t : t + 1], caches[1])
        for layer, plan in zip(layers, plans):
            layer._plan = plan
        pairs.append((one_call, modules))
    return pairs


def _plain_decode(plain, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The plain model's logits of the same `steps` decode steps."""
    cache = plain.make_cache(ids.shape[0])
    plain(ids[:, : ids.shape[1] - steps], cache)
    return [plain(ids[:, t : t + 1], cache) for t in range(ids.shape[1] - steps, ids.shape[1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kda_layer_in_one_call_equals_its_modules_and_the_plain_model(dtype, token_ids, layer_calls):
    plain = _plain(dtype)
    prepared = cpu.prepare(copy.deepcopy(plain))
    layers = [m for m in prepared.modules() if isinstance(m, CpuDecoderLayer)]
    assert len(layers) == sum(layer.is_kda for layer in plain.model.layers) > 0
    assert {layer.is_moe for layer in layers} == {True, False}  # an MoE and a dense feed-forward among them
    ids = token_ids[:1, :24]
    with torch.inference_mode():
        pairs, want = _decode_both_ways(prepared, ids, 6), _plain_decode(plain, ids, 6)
    assert all(layer._plan is not None for layer in layers)
    assert len(layer_calls) == 6 * len(layers)
    for (one_call, modules), w in zip(pairs, want):
        assert torch.equal(one_call, modules)
        if dtype == torch.float32:  # bf16: the module path's own distance from the plain model is tested elsewhere
            assert rel_err(one_call, w) <= 1e-4
    state = plain.state_dict()
    assert prepared.state_dict().keys() == state.keys()


@pytest.mark.parametrize("spec", [QuantSpec("mxfp4", 4, 32), QuantSpec("affine", 4, 32), QuantSpec("mxfp8", 8, 32)],
                         ids=lambda s: f"{s.mode}{s.bits}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_kda_layer_in_one_call_equals_its_modules(spec, dtype, token_ids, layer_calls, monkeypatch):
    monkeypatch.setattr(cpu, "INT4_KERNEL", False)
    plain = _quantized_tiny(spec, dtype)
    prepared = cpu.prepare(copy.deepcopy(plain))
    ids = token_ids[:1, :20]
    with torch.inference_mode():
        pairs, want = _decode_both_ways(prepared, ids, 4), _plain_decode(plain, ids, 4)
    assert layer_calls
    for (one_call, modules), w in zip(pairs, want):
        assert torch.equal(one_call, modules)
        if dtype == torch.float32:
            assert rel_err(one_call, w) <= 1e-4


def test_several_sequences_or_tokens_take_the_modules(token_ids, layer_calls):
    """A batch in one cache, prefill and a model without a cache never reach the one-call layer."""
    prepared = cpu.prepare(_plain(torch.float32))
    with torch.inference_mode():
        cache = prepared.make_cache(2)
        prepared(token_ids[:, :10], cache)
        prepared(token_ids[:, 10:11], cache)
        prepared(token_ids[:1, :5])
    assert not layer_calls


def _batched_steps_both_ways(prepared, prompts: list[torch.Tensor], steps: int):
    """Logits [B, V] of `steps` batched decode steps (kimi_lm.batching.decode_step) over sequences with caches of their
    own and prompts of different lengths, through the layer calls and through the modules, side by side; and each
    sequence's logits decoded alone (the one-sequence layer call)."""
    from kimi_lm.batching import decode_step

    layers = [m for m in prepared.modules() if isinstance(m, CpuDecoderLayer)]
    caches = [[prepared.make_cache(1) for _ in prompts] for _ in range(3)]
    for way in caches:
        for cache, prompt in zip(way, prompts):
            prepared(prompt[None], cache)
    g = torch.Generator().manual_seed(5)
    pairs, alone = [], []
    for _ in range(steps):
        tokens = torch.randint(0, prepared.config.vocab_size, (len(prompts),), generator=g).tolist()
        one_call = decode_step(prepared, caches[0], tokens)
        plans = [layer._plan for layer in layers]
        for layer in layers:
            layer._plan = None  # the module path
        modules = decode_step(prepared, caches[1], tokens)
        for layer, plan in zip(layers, plans):
            layer._plan = plan
        pairs.append((one_call, modules))
        alone.append(torch.cat([decode_step(prepared, [c], [t]) for c, t in zip(caches[2], tokens)]))
    return pairs, alone


@pytest.mark.parametrize("dtype, B", [(torch.float32, 2), (torch.float32, 8), (torch.bfloat16, 3)])
def test_batched_step_layer_in_one_call_equals_its_modules_and_each_sequence_alone(dtype, B, token_ids, layer_calls):
    """A batched decode step (the server's: each sequence with its own cache, prompts of different lengths) through
    one C call per KDA layer for all B sequences: the same as its modules bit for bit, and each row as the sequence
    decoded alone (up to the batched products' rounding)."""
    prepared = cpu.prepare(_plain(dtype))
    layers = [m for m in prepared.modules() if isinstance(m, CpuDecoderLayer)]
    prompts = [token_ids[b % token_ids.shape[0], : 5 + 3 * b] for b in range(B)]
    with torch.inference_mode():
        pairs, alone = _batched_steps_both_ways(prepared, prompts, 3)
    assert layer_calls.count(B) == 3 * len(layers)
    for (one_call, modules), single in zip(pairs, alone):
        assert torch.equal(one_call, modules)
        assert rel_err(one_call, single) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("spec", [QuantSpec("mxfp4", 4, 32), QuantSpec("affine", 8, 32)],
                         ids=lambda s: f"{s.mode}{s.bits}")
def test_quantized_batched_step_layer_in_one_call(spec, token_ids, layer_calls, monkeypatch):
    monkeypatch.setattr(cpu, "INT4_KERNEL", False)
    prepared = cpu.prepare(_quantized_tiny(spec, torch.float32))
    prompts = [token_ids[0, :7], token_ids[1, :4], token_ids[0, 3:15]]
    with torch.inference_mode():
        pairs, alone = _batched_steps_both_ways(prepared, prompts, 2)
    assert 3 in layer_calls
    for (one_call, modules), single in zip(pairs, alone):
        assert torch.equal(one_call, modules)
        assert rel_err(one_call, single) <= 1e-5


def test_batched_step_past_the_rows_the_modules_take_in_c_runs_as_modules(token_ids, layer_calls):
    """bf16 products of more than 4 rows go to oneDNN in the modules (onednn.GEMV_ROWS): a batched step of 5 bf16
    sequences runs as its modules, not as a C call that would compute something else."""
    prepared = cpu.prepare(_plain(torch.bfloat16))
    prompts = [token_ids[b % 2, : 4 + b] for b in range(5)]
    with torch.inference_mode():
        _batched_steps_both_ways(prepared, prompts, 1)
    assert 5 not in layer_calls and 1 in layer_calls
