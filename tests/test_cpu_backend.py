"""The CPU backend (kimi_lm/cpu) against the plain model it is applied to: every swapped module, and whole models.

The plain module is the oracle: each test builds the prepared module from a plain one with the same weights and
compares outputs (and the cache state a layer leaves behind) by relative error. fp32 differs only by summation order
(≤ 1e-5); bf16 by where partial results are rounded (an output rounding, ≤ 1e-2).
"""

import ast
import copy
from pathlib import Path

import pytest
import torch

import kimi_lm
from conftest import one_call_and_calls, rel_err
from kimi_lm import cpu
from kimi_lm.cpu import moe_kernels, native, onednn
from kimi_lm.cpu.kda import CpuKimiDeltaAttention
from kimi_lm.cpu.layers import CpuMLP, CpuRMSNorm
from kimi_lm.cpu.mla import CpuMultiheadLatentAttention
from kimi_lm.cpu.moe import CpuSparseMoE, OneDNNStackedExperts
from kimi_lm.model.kda import KimiDeltaAttention
from kimi_lm.model.layers import MLP, RMSNorm
from kimi_lm.model.mla import MultiheadLatentAttention
from kimi_lm.model.moe import SparseMoE, StackedExperts

pytestmark = pytest.mark.skipif(native.library() is None or not onednn.available(torch.float32, "cpu"),
                                reason="no C compiler or no oneDNN here: the plain model is all there is")

DTYPES = [torch.float32] + ([torch.bfloat16] if onednn.available(torch.bfloat16, "cpu") else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    """dtype -> (prepared, plain) models with the same weights."""
    return {dtype: (kimi_lm.load(hf_checkpoint, dtype=dtype), kimi_lm.load(hf_checkpoint, dtype=dtype, backend=None))
            for dtype in DTYPES}


def _layers(models, dtype, pick):
    prepared, plain = models[dtype]
    i = next(i for i, layer in enumerate(plain.model.layers) if pick(layer))
    return prepared.model.layers[i], plain.model.layers[i], plain.config


def test_prepare_swaps_every_hot_module_and_keeps_the_state_dict(models):
    prepared, plain = models[torch.float32]
    kinds = {type(m) for m in prepared.modules()}
    assert {CpuKimiDeltaAttention, CpuMultiheadLatentAttention, CpuSparseMoE, CpuMLP, CpuRMSNorm,
            OneDNNStackedExperts, onednn.OneDNNLinear} <= kinds
    left_plain = [name for name, m in prepared.named_modules()
                  if type(m) in (RMSNorm, MLP, SparseMoE, KimiDeltaAttention, MultiheadLatentAttention)]
    assert not left_plain  # nested ones too: the shared expert inside an MoE block, MLA's latent norms
    assert not any(type(m).__module__.startswith("kimi_lm.cpu") for m in plain.modules())  # backend=None: plain
    assert prepared.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(prepared.state_dict()[k], v) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("dtype", DTYPES)
def test_kda_layer_equals_plain_layer(models, dtype):
    """Without a cache; then chunks through a cache: 50 tokens, 2 (shorter than the conv window: the history shifts),
    1 (the decode kernel), 70, and decode steps of two rows; outputs, recurrent state and conv history."""
    ours, plain, config = _layers(models, dtype, lambda layer: layer.is_kda)
    ours, plain = ours.self_attn, plain.self_attn
    assert isinstance(ours, CpuKimiDeltaAttention)
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        x = torch.randn(2, 33, config.hidden_size, generator=g).to(dtype)
        assert rel_err(ours(x), plain(x)) <= TOL[dtype]
        cache, reference = ours.make_cache(2, dtype, "cpu"), plain.make_cache(2, dtype, "cpu")
        for T in (50, 2, 1, 70, 1, 1, 1):
            x = torch.randn(2, T, config.hidden_size, generator=g).to(dtype)
            assert rel_err(ours(x, cache), plain(x, reference)) <= TOL[dtype], T
            assert rel_err(cache.state, reference.state) <= 1e-5 if dtype == torch.float32 else 2e-2, T
            assert rel_err(cache.conv_state, reference.conv_state) <= TOL[dtype], T


@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_layer_equals_plain_layer(models, dtype):
    """Prefill without and with a cache, then decode steps (absorbed form; bf16 over a 64-token-bucketed history,
    fp32 through SDPA)."""
    ours, plain, config = _layers(models, dtype, lambda layer: not layer.is_kda)
    ours, plain = ours.self_attn, plain.self_attn
    assert isinstance(ours, CpuMultiheadLatentAttention) and ours.in_proj is not None and ours.w_uk is not None
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        x = torch.randn(2, 40, config.hidden_size, generator=g).to(dtype)
        assert rel_err(ours(x), plain(x)) <= TOL[dtype]
        cache, reference = ours.make_cache(2, dtype, "cpu"), plain.make_cache(2, dtype, "cpu")
        for T in (30, 1, 1, 5, 1):
            x = torch.randn(2, T, config.hidden_size, generator=g).to(dtype)
            assert rel_err(ours(x, cache), plain(x, reference)) <= TOL[dtype], T
        assert rel_err(cache.buffer[:, : cache.length], reference.buffer[:, : reference.length]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_decode_in_c_equals_the_absorbed_form(models, dtype, monkeypatch):
    """One query per sequence (a decode step) in one C call (kernels/mla.c) against the plain absorbed form on the
    same layer: batch 1 and 3, histories with spare padding rows, on 1-3 threads (batch 1 on several: the phases, a
    long history split into 2 or 3 row ranges); on one thread a batch equals its sequences one by one, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.ops += 1
            return func(*args, **(kwargs or {}))

    ours = _layers(models, dtype, lambda layer: not layer.is_kda)[0].self_attn
    g = torch.Generator().manual_seed(7)
    H, width = ours.num_heads, ours.latent_dim + ours.pe_dim
    for B, past, padded in ((1, 37, 64), (1, 300, 320), (3, 5, 8)):
        q = torch.randn(B, 1, H, ours.nope_dim + ours.pe_dim, generator=g).to(dtype)
        history = torch.randn(B, padded, width, generator=g).to(dtype)
        want = MultiheadLatentAttention.attend_absorbed(ours, q, history, past)
        for threads in (1, 2, 3):
            monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
            with torch.inference_mode(), CountOps():
                CountOps.ops = 0
                got = ours.attend_absorbed(q, history, past)
            assert CountOps.ops < 10  # the C call, not the ~45 ops of the plain path
            assert got.shape == want.shape and got.dtype == dtype
            assert rel_err(got, want) <= TOL[dtype], (B, threads)
            if threads == 1:  # batching changes no sum: each sequence gets its own, as alone
                alone = torch.cat([ours.attend_absorbed(q[b : b + 1], history[b : b + 1], past) for b in range(B)])
                assert torch.equal(got, alone), B


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_and_mlp_equal_plain(models, dtype):
    """One token (C router, few-row experts in C, weighted sum) and many (C selection, dispatch, combine)."""
    ours, plain, config = _layers(models, dtype, lambda layer: layer.is_moe)
    dense_ours, dense_plain, _ = _layers(models, dtype, lambda layer: not layer.is_moe)
    assert isinstance(ours.block_sparse_moe, CpuSparseMoE) and isinstance(dense_ours.mlp, CpuMLP)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for shape in [(1, 1), (1, 1), (1, 1), (3, 29), (2, 4)]:
            x = torch.randn(*shape, config.hidden_size, generator=g).to(dtype)
            assert rel_err(ours.block_sparse_moe(x), plain.block_sparse_moe(x)) <= TOL[dtype], shape
            assert rel_err(dense_ours.mlp(x), dense_plain.mlp(x)) <= TOL[dtype], shape
            assert rel_err(ours.input_layernorm(x), plain.input_layernorm(x)) <= TOL[dtype] / 10, shape


@pytest.mark.parametrize("n_group,topk_group,renormalize", [(1, 1, True), (4, 2, True), (4, 2, False), (8, 8, True)])
@pytest.mark.parametrize("tokens", [1, 300])
def test_routing_in_c_chooses_and_weighs_like_the_plain_router(n_group, topk_group, renormalize, tokens):
    """Group-limited selection with a correction bias large enough to change choices (selection ≠ weighting), over
    plain (not packed) experts: the C router for one token, the C selection from the logits for many."""
    torch.manual_seed(0)
    moe = SparseMoE(64, 32, 6, 16, 1, n_group, topk_group, renormalize, 2.5).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
        moe.gate.e_score_correction_bias.normal_(std=0.5)
    ours = CpuSparseMoE(copy.deepcopy(moe))
    x = torch.randn(tokens, 64)
    with torch.inference_mode():
        assert rel_err(ours(x), moe(x)) <= 1e-5
        weights, idx = moe_kernels.moe_route_logits(moe.gate.logits(x), moe.gate.e_score_correction_bias, 6, n_group,
                                               topk_group, renormalize, 2.5)
        want_weights, want_idx = moe.gate(x)
    order, want_order = idx.argsort(1), want_idx.argsort(1)
    assert torch.equal(idx.gather(1, order), want_idx.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_weights.gather(1, want_order), rtol=1e-5, atol=0)


def test_bf16_bias_is_read_as_fp32_by_the_c_router():
    """A balancing bias stored in bf16 (a module converted before the model kept it fp32) is made fp32 when the block
    is prepared, and the C routers refuse a bf16 one by name: read as fp32 it ran past its end, and a bf16 model's
    routing changed from process to process with the bytes behind it."""
    torch.manual_seed(0)
    moe = SparseMoE(64, 32, 6, 16, 1).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
        moe.gate.e_score_correction_bias.normal_(std=0.5)
    plain = copy.deepcopy(moe)
    moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.to(torch.bfloat16)
    plain.gate.e_score_correction_bias.copy_(moe.gate.e_score_correction_bias.float())
    ours = CpuSparseMoE(moe)
    assert ours.gate.e_score_correction_bias.dtype == torch.float32
    x = torch.randn(40, 64)
    with torch.inference_mode():
        assert rel_err(ours(x), plain(x)) <= 1e-5
        assert rel_err(ours(x[:1]), plain(x[:1])) <= 1e-5
        with pytest.raises(ValueError, match="e_score_correction_bias.*fp32"):
            moe_kernels.moe_route_logits(plain.gate.logits(x), plain.gate.e_score_correction_bias.bfloat16(), 6, 1, 1,
                                         True, 1.0)


def _packed_moe(dtype, shared: int):
    """A plain MoE block (16 experts of width 40 on hidden 96, top 5 in 2 of 4 groups, ``shared`` shared experts'
    width) and its CPU backend copy (experts packed for oneDNN)."""
    torch.manual_seed(0)
    moe = SparseMoE(96, 16, 5, 40, shared, 4, 2, True, 2.5).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.2)
        moe.gate.e_score_correction_bias.normal_(std=0.5)
    moe = moe.to(dtype)
    moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    holder = torch.nn.Module()
    holder.moe = copy.deepcopy(moe)
    onednn.pack_linears(holder, OneDNNStackedExperts)
    if shared:
        holder.moe.shared_experts = CpuMLP(holder.moe.shared_experts)
    return moe, CpuSparseMoE(holder.moe)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [0, 2])
def test_one_token_moe_in_one_call_equals_the_calls_and_plain(dtype, shared, monkeypatch):
    """A decode step's MoE block in one C call (moe_kernels.moe_decode: router, k experts, shared expert, weighted sum)
    against the same module's multi-call path and the plain block; widths that are no multiple of 64 or 32 (the
    packed layouts' tails), group-limited routing, 1 or 2 shared experts' worth of intermediate width."""
    moe, ours = _packed_moe(dtype, shared)
    calls = []
    real = moe_kernels.moe_decode
    monkeypatch.setattr(moe_kernels, "moe_decode", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for _ in range(6):
            x = torch.randn(1, 1, 96, generator=g).to(dtype)
            one_call, calls_path = one_call_and_calls(ours, x)
            assert rel_err(one_call, calls_path) <= (1e-6 if dtype == torch.float32 else 0.0)
            assert rel_err(one_call, moe(x)) <= TOL[dtype]
    assert len(calls) == 6 and ours._plan is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [3, 8])
def test_batched_step_moe_in_one_call_equals_the_calls_and_plain(dtype, tokens, monkeypatch):
    """The few tokens of a batched decode step (one per sequence) through the MoE block in one C call
    (moe_kernels.moe_decode on [N, hidden]: the router's product for all of them, each chosen expert's weights read
    once for the tokens routed to it, the shared expert on all) against the multi-call path (router logits, dispatch,
    grouped experts, combine) and the plain block; as many tokens as the C products take in the dtype (bf16: 4)."""
    moe, ours = _packed_moe(dtype, 2)
    calls = []
    real = moe_kernels.moe_decode
    monkeypatch.setattr(moe_kernels, "moe_decode", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    in_one_call = tokens <= ours.rows_in_one_call(ours.decode_plan(), dtype)
    assert in_one_call == (dtype == torch.float32 or tokens <= 4)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for _ in range(4):
            x = torch.randn(tokens, 1, 96, generator=g).to(dtype)
            one_call, calls_path = one_call_and_calls(ours, x)
            assert rel_err(one_call, calls_path) <= (1e-6 if dtype == torch.float32 else TOL[dtype])
            assert rel_err(one_call, moe(x)) <= TOL[dtype]
    assert calls == ([tokens] * 4 if in_one_call else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 9])
def test_packed_experts_equal_stacked_experts(dtype, tokens):
    torch.manual_seed(0)
    experts = StackedExperts(4, 32, 24).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.2)
        experts.down_proj.normal_(std=0.2)
    packed = OneDNNStackedExperts(experts)
    x = torch.randn(tokens, 32).to(dtype)
    idx = torch.stack([torch.randperm(4)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3)
    with torch.no_grad():
        assert rel_err(packed(x, idx, weights), experts(x, idx, weights)) <= TOL[dtype] / 10
    state = packed.state_dict()
    assert torch.equal(state["gate_up_proj"], experts.gate_up_proj) and torch.equal(state["down_proj"], experts.down_proj)


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_with_few_rows_in_c_equal_onednn(dtype, monkeypatch):
    """Experts with 1–4 rows (1–8 for small experts) run in one C call (several rows per pass over the weights), the
    rest on oneDNN; each expert's output as the per-expert oneDNN loop gives it."""
    from kimi_lm.cpu import moe as cpu_moe

    torch.manual_seed(0)
    plain = StackedExperts(8, 96, 40)
    with torch.no_grad():
        plain.gate_up_proj.normal_(std=0.1)
        plain.down_proj.normal_(std=0.1)
    experts = OneDNNStackedExperts(plain.to(dtype))
    counts = [1, 0, 3, 4, 9, 2, 0, 6]  # small experts: 1-8 rows in C, 9 on oneDNN; large ones: 6 on oneDNN too
    xs = torch.randn(sum(counts), 96).to(dtype)
    calls = []
    real = moe_kernels.moe_experts_rows
    monkeypatch.setattr(moe_kernels, "moe_experts_rows", lambda xs, counts, few, *a: calls.append(few) or real(xs, counts, few, *a))
    for small_bytes, in_c in ((cpu_moe.SMALL_EXPERT_BYTES, [0, 2, 3, 5, 7]), (0, [0, 2, 3, 5])):
        monkeypatch.setattr(cpu_moe, "SMALL_EXPERT_BYTES", small_bytes)
        calls.clear()
        with torch.inference_mode():
            got = experts.grouped(xs, counts)
            want = StackedExperts.grouped(experts, xs, counts)
        assert calls == [in_c]
        assert len(got) == len(want) == 6
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel_err(g, w) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_whole_model_fp32_prefill_and_cached_decode_equal_plain(models, token_ids, monkeypatch):
    """Full forward, a prompt in two chunks, then decode steps of one row (a KDA layer in one C call, kernels/layer.c;
    MLA layers' router and expert kernels) and of two (the KDA decode kernel takes both rows: its input comes from the
    norm kernel contiguous)."""
    from kimi_lm.cpu import layer as cpu_layer

    prepared, plain = models[torch.float32]
    kda_rows, layer_calls = [], []
    real = native.kda_decode
    monkeypatch.setattr(native, "kda_decode", lambda proj, *a: kda_rows.append(proj.shape[0]) or real(proj, *a))
    lib = cpu_layer._layer_library()
    monkeypatch.setattr(cpu_layer, "_layer_library", lambda: layer_calls.append(1) or lib)
    with torch.inference_mode():
        assert rel_err(prepared(token_ids), plain(token_ids)) <= 1e-5
        for ids in (token_ids[:1, :40], token_ids[:, :40]):
            caches = [prepared.make_cache(ids.shape[0]), plain.make_cache(ids.shape[0])]
            for chunk in (ids[:, :20], ids[:, 20:30]):
                assert rel_err(prepared(chunk, cache=caches[0]), plain(chunk, cache=caches[1])) <= 1e-5
            for t in range(30, 40):
                got, want = prepared(ids[:, t : t + 1], cache=caches[0]), plain(ids[:, t : t + 1], cache=caches[1])
                assert rel_err(got, want) <= 1e-5
    assert set(kda_rows) == {2} and layer_calls


def test_bf16_backend_adds_no_error_beyond_bf16_itself(models, hf_checkpoint, token_ids):
    """bf16 logits of a tiny random model flip expert choices on single roundings, so the prepared and plain bf16
    models are compared by their distance from the fp32 model: the backend's must be as small (median, 10 %)."""
    if torch.bfloat16 not in models:
        pytest.skip("no bf16 oneDNN here")
    prepared, plain = models[torch.bfloat16]
    with torch.inference_mode():
        exact = models[torch.float32][1](token_ids)
        ours, reference = ((m(token_ids).float() - exact).abs().median() for m in (prepared, plain))
    assert ours <= 1.1 * reference


MODEL_DIR = Path(kimi_lm.__file__).parent / "model"
FORBIDDEN = ("ctypes", "os", "kimi_lm.cpu", "kimi_lm.quant", "kimi_lm.checkpoint", "kimi_lm.server", "kimi_lm.cli",
             "kimi_lm.generate", "kimi_lm.estimate", "kimi_lm.save", "kimi_lm.convert")


def test_model_package_is_plain_pytorch():
    """model/ imports no backend, quantization, checkpoint, server or CLI code (nor ctypes / os), directly or through
    the kimi_lm modules it does import, and keeps no state in ``__dict__``."""
    seen, todo = set(), [p for p in MODEL_DIR.glob("*.py")]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        source = path.read_text()
        assert "__dict__" not in source and "environ" not in source, path
        for node in ast.walk(ast.parse(source)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), (path.name, name)
                if name.startswith("kimi_lm."):
                    target = Path(kimi_lm.__file__).parent.joinpath(*name.split(".")[1:])
                    todo += [p for p in (target.with_suffix(".py"), target / "__init__.py") if p.exists()]
    assert len(seen) > len(list(MODEL_DIR.glob("*.py")))  # it followed model/'s own kimi_lm imports


def test_prepare_is_skipped_without_kernels_and_oneDNN_leaves_plain_modules(hf_checkpoint, monkeypatch):
    """Without the C kernels, only what needs none is swapped (packed linears, fused MLA/MLP products); the model
    still equals the plain one."""
    monkeypatch.setattr(native, "library", lambda: None)
    prepared = kimi_lm.load(hf_checkpoint, dtype=torch.float32)
    plain = kimi_lm.load(hf_checkpoint, dtype=torch.float32, backend=None)
    kinds = {type(m) for m in prepared.modules()}
    assert CpuKimiDeltaAttention not in kinds and CpuSparseMoE not in kinds and CpuRMSNorm not in kinds
    assert onednn.OneDNNLinear in kinds
    ids = torch.randint(0, plain.config.vocab_size, (1, 20))
    with torch.inference_mode():
        assert rel_err(prepared(ids), plain(ids)) <= 1e-5
    assert cpu.prepare  # the entry point kimi_lm.load uses
