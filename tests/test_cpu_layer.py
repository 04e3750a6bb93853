"""The CPU backend's whole-layer decode step (kimi_lm/cpu/layer.py, kernels/layer.c): a KDA decoder layer's token in
one C call against the same layer's module path (bit for bit: the same kernels in the same order) and the plain model,
for float and MLX-quantized weights, MoE and dense feed-forward layers; and where it must not apply."""

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
    """Counts kda_layer_decode calls."""
    calls = []
    lib = cpu_layer._layer_library()

    class Counting:
        def kda_layer_decode(self, *args):
            calls.append(1)
            return lib.kda_layer_decode(*args)

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
    """Batched decode (the server's), prefill and a model without a cache never reach the one-sequence call."""
    prepared = cpu.prepare(_plain(torch.float32))
    with torch.inference_mode():
        cache = prepared.make_cache(2)
        prepared(token_ids[:, :10], cache)
        prepared(token_ids[:, 10:11], cache)
        prepared(token_ids[:1, :5])
    assert not layer_calls
