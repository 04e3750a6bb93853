"""The CPU backend's MLX-quantized products (kimi_lm/cpu/kernels/quant.c, kimi_lm/cpu/quant.py) against the plain
dequantize-then-matmul reference (kimi_lm.quant.packed), kernel by kernel and as whole prepared models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import kimi_lm
from conftest import one_call_and_calls, rel_err
from kimi_lm import cpu
from kimi_lm.cli import main as cli
from kimi_lm.cpu import moe_kernels, quant_kernels
from kimi_lm.cpu import quant as cpu_quant
from kimi_lm.cpu.kda import CpuKimiDeltaAttention
from kimi_lm.cpu.layers import CpuMLP
from kimi_lm.cpu.moe import CpuSparseMoE
from kimi_lm.cpu.onednn import OneDNNLinear, available
from kimi_lm.cpu.products import LAYOUT_QUANT, FusedProducts, fusable
from kimi_lm.cpu.quant import (CpuPackedEmbedding, CpuPackedLinear, CpuPackedMLA, CpuPackedRouter,
                                CpuPackedStackedExperts, CpuSplitPackedExperts)
from kimi_lm.config import preset
from kimi_lm.mapped import SplitPackedExperts
from kimi_lm.model.kda import KimiDeltaAttention
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.model.layers import MLP
from kimi_lm.model.mla import MultiheadLatentAttention
from kimi_lm.model.moe import SparseMoE, StackedExperts, TopkRouter
from kimi_lm.quant.packed import PackedEmbedding, PackedLinear, PackedStackedExperts, QuantSpec, swap_modules

pytestmark = pytest.mark.skipif(quant_kernels.quant_library() is None, reason="no C compiler: the plain modules are all")

SPECS = [QuantSpec("mxfp4", 4, 32), QuantSpec("nvfp4", 4, 16), QuantSpec("mxfp8", 8, 32)] + [
    QuantSpec("affine", b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: the reference rounds each dequantized weight to bf16


@pytest.fixture(params=[False, True], ids=["vector", "generic"])
def path(request):
    """Each test twice: the CPU's vector paths, and the generic C path every CPU has."""
    quant_kernels.quant_library().quant_use_generic(int(request.param))
    yield request.param
    quant_kernels.quant_library().quant_use_generic(0)


def _packed(spec: QuantSpec, w: torch.Tensor) -> tuple:
    q = spec.quantize(w)
    return q if len(q) == 3 else (*q, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}{s.bits}g{s.group_size}")
def test_quant_matmul_equals_dequantize_then_matmul(spec, dtype, path):
    g = torch.Generator().manual_seed(0)
    # widths: whole 128-weight blocks, and a tail below one (the vector paths' edge); rows: 1, few, more than 8
    for out_f, in_f in [(48, 256), (40, 384 + 128), (24, 512 + 128 + 32)]:
        if in_f % spec.group_size:
            continue
        q, scales, biases = _packed(spec, torch.randn(out_f, in_f, generator=g).to(dtype))
        w = spec.dequantize_reference(q, scales, biases, torch.float32)
        for rows in (1, 3, 9):
            x = torch.randn(rows, in_f, generator=g).to(dtype)
            for threads in (1, 2):
                got = quant_kernels.quant_matmul(x, spec.mode, spec.bits, spec.group_size, q, scales, biases, threads)
                assert got.dtype == dtype and got.shape == (rows, out_f)
                assert rel_err(got, x.float() @ w.T) <= TOL[dtype], (out_f, in_f, rows, threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}{s.bits}g{s.group_size}")
def test_quant_dequantize_is_bit_exact(spec, dtype, path):
    """The prefill path's C dequantization (each tile once, then BLAS) gives kimi_lm.quant's dequantize exactly."""
    g = torch.Generator().manual_seed(1)
    for out_f, in_f in [(40, 384 + 128), (17, 512 + 128 + 32)]:
        if in_f % spec.group_size:
            continue
        q, scales, biases = _packed(spec, torch.randn(out_f, in_f, generator=g).to(dtype))
        got = quant_kernels.quant_dequantize(spec.mode, spec.bits, spec.group_size, q, scales, biases, dtype)
        assert torch.equal(got, spec.dequantize(q, scales, biases, dtype)), (out_f, in_f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [QuantSpec("mxfp4", 4, 32), QuantSpec("affine", 4, 64), QuantSpec("nvfp4", 4, 16),
                                  QuantSpec("mxfp8", 8, 32), QuantSpec("affine", 8, 32)],
                         ids=lambda s: f"{s.mode}{s.bits}g{s.group_size}")
def test_packed_experts_in_c_equal_plain_experts(spec, dtype, path):
    """A decode step's experts (1 row each) and a batched step's (up to 9 rows, above one 8-row pass) in one C call."""
    torch.manual_seed(0)
    E, hidden, inter = 6, 128, 64
    dense = StackedExperts(E, hidden, inter).to(dtype)
    for p in dense.parameters():
        p.data.normal_(0, 0.1)
    plain = PackedStackedExperts(E, hidden, inter, spec, spec, dtype)
    for name in ("gate_up_proj", "down_proj"):
        for suffix, t in zip(("", "_scales", "_biases"), spec.quantize(getattr(dense, name).detach())):
            setattr(plain, name + suffix, t)
    split = SplitPackedExperts(E, hidden, inter, spec, spec, dtype)  # gate and up apart, as mapped checkpoints
    for half, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None))):
        for suffix, t in zip(("", "_scales", "_biases"), spec.quantize(dense.gate_up_proj.detach()[:, rows])):
            setattr(split, half + suffix, t.contiguous())
    for suffix in ("", "_scales", "_biases"):
        if hasattr(plain, "down_proj" + suffix):
            setattr(split, "down_proj" + suffix, getattr(plain, "down_proj" + suffix))
    for reference, kind in ((plain, CpuPackedStackedExperts), (split, CpuSplitPackedExperts)):
        fast = cpu_quant.swap(copy.deepcopy(reference))
        assert type(fast) is kind
        for counts in ([1, 0, 1, 1, 0, 1], [2, 9, 0, 1, 3, 0]):
            xs = torch.randn(sum(counts), hidden).to(dtype)
            with torch.inference_mode():
                got, want = fast.grouped(xs, counts), plain.grouped(xs, counts)
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert rel_err(a, b) <= 2 * TOL[dtype]
        state = reference.state_dict()
        assert fast.state_dict().keys() == state.keys()
        assert all(torch.equal(fast.state_dict()[k], v) for k, v in state.items())


def _quantized_moe(spec: QuantSpec, dtype, shared: int) -> tuple[torch.nn.Module, CpuSparseMoE]:
    """A plain MoE block quantized as mlx-lm converts one (experts, shared expert, router at affine 8-bit g64; with no
    shared expert the router stays float, as in checkpoints converted with other recipes), and the backend's block
    made from a copy of it. Widths off the work items: hidden 192 (a 128-weight block and a tail), intermediate 96 (a
    64-row gate | up work item straddles gate and up)."""
    torch.manual_seed(0)
    moe = SparseMoE(192, 12, 4, 96, shared, 4, 2, True, 2.5).eval().requires_grad_(False)
    for p in moe.parameters():
        p.normal_(0, 0.1)
    moe.gate.e_score_correction_bias.normal_(0, 0.5)
    moe = moe.to(dtype)
    moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    holder = torch.nn.Module()
    holder.moe = moe
    names = ["moe.experts.gate_up_proj", "moe.experts.down_proj"] + (
        [f"moe.shared_experts.{n}" for n in ("gate_proj", "up_proj", "down_proj")] if shared else [])
    specs = dict.fromkeys(names, spec) | ({"moe.gate": QuantSpec("affine", 8, 64)} if shared else {})
    swap_modules(holder, specs, pack=True, dtype=dtype)
    fast = copy.deepcopy(moe)
    fast.experts = cpu_quant.swap(fast.experts)
    if shared:
        fast.gate = cpu_quant.swap(fast.gate)
    if shared:
        for n in ("gate_proj", "up_proj", "down_proj"):
            setattr(fast.shared_experts, n, cpu_quant.swap(getattr(fast.shared_experts, n)))
        fast.shared_experts = CpuMLP(fast.shared_experts)
    return moe, CpuSparseMoE(fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [QuantSpec("mxfp4", 4, 32), QuantSpec("affine", 4, 32), QuantSpec("mxfp8", 8, 32)],
                         ids=lambda s: f"{s.mode}{s.bits}g{s.group_size}")
def test_quantized_moe_batched_step_in_one_call(spec, dtype, path, monkeypatch):
    """The 3 tokens of a batched decode step through the quantized MoE block in one C call (each expert's packed bytes
    read once for its tokens, the quantized router's product for all three) against the multi-call path and the
    plain quantized block."""
    plain, ours = _quantized_moe(spec, dtype, 1)
    calls = []
    real = moe_kernels.moe_decode
    monkeypatch.setattr(moe_kernels, "moe_decode", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(3, 1, 192, generator=g).to(dtype)
            one_call, calls_path = one_call_and_calls(ours, x)
            assert rel_err(one_call, calls_path) <= (1e-6 if dtype == torch.float32 else TOL[dtype])
            assert rel_err(one_call, plain(x)) <= 2 * TOL[dtype]
    assert calls == [3, 3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("spec", [QuantSpec("mxfp4", 4, 32), QuantSpec("affine", 4, 32), QuantSpec("nvfp4", 4, 16),
                                  QuantSpec("mxfp8", 8, 32), QuantSpec("affine", 8, 32), QuantSpec("affine", 3, 32)],
                         ids=lambda s: f"{s.mode}{s.bits}g{s.group_size}")
def test_quantized_moe_token_in_one_call_equals_the_calls_and_plain(spec, dtype, shared, path, monkeypatch):
    """A decode step's MoE block with MLX-quantized experts, shared expert and router in one C call
    (moe_kernels.moe_decode) against the same module's multi-call path (bit-identical: the same quantized row
    products and roundings) and the plain quantized block; after the experts' tensors are replaced, the plan is made
    again from the new ones."""
    plain, ours = _quantized_moe(spec, dtype, shared)
    assert (type(ours.gate) is CpuPackedRouter) == bool(shared)
    calls = []
    real = moe_kernels.moe_decode
    monkeypatch.setattr(moe_kernels, "moe_decode", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)

    def check():
        for _ in range(4):
            x = torch.randn(1, 1, 192, generator=g).to(dtype)
            one_call, calls_path = one_call_and_calls(ours, x)
            assert torch.equal(one_call, calls_path)
            assert rel_err(one_call, plain(x)) <= 2 * TOL[dtype]

    with torch.inference_mode():
        check()
        first = ours._plan
        assert first is not None and first.dtype is None  # quantized parts read fp32 and bf16 inputs
        assert first.router.layout == (LAYOUT_QUANT if shared else 0)
        for module in (plain.experts, ours.experts):  # new tensors (other values) under the same names
            module.down_proj_scales = module.down_proj_scales.flip(1).contiguous()
        check()
    assert len(calls) == 8 and ours._plan is not first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_products_equal_their_parts(dtype, path, monkeypatch):
    """Several products of one input in one C call (``FusedProducts``: KDA's, MLA's and the MLP's input products in a
    quantized model): formats mixed, a oneDNN-packed part among them, widths not a multiple of a work item, 1-8 rows
    on 1 and 2 threads, against dequantize-then-matmul; more rows run the parts' own forwards."""
    g = torch.Generator().manual_seed(0)
    in_f = 256
    specs = [(QuantSpec("mxfp4", 4, 32), 130), (QuantSpec("affine", 4, 64), 64), (QuantSpec("mxfp8", 8, 32), 5),
             (QuantSpec("affine", 3, 32), 70), (QuantSpec("nvfp4", 4, 16), 33), (QuantSpec("affine", 8, 64), 4)]
    parts, dense = [], []
    for spec, out_f in specs:
        linear = torch.nn.Linear(in_f, out_f, bias=False).to(dtype)
        torch.nn.init.normal_(linear.weight, generator=g)
        packed = PackedLinear.from_float(linear, spec)
        parts.append(cpu_quant.swap(packed))
        dense.append(packed.dense_weight(torch.float32))
    if available(dtype, "cpu"):  # a float part beside the quantized ones (oneDNN's packed layout, read in C)
        linear = torch.nn.Linear(in_f, 96, bias=False).to(dtype)
        torch.nn.init.normal_(linear.weight, generator=g)
        parts.insert(2, OneDNNLinear(linear))
        dense.insert(2, linear.weight.detach().float())
    assert all(type(p) is (CpuPackedLinear if i != 2 or len(parts) == len(specs) else OneDNNLinear)
               for i, p in enumerate(parts))
    assert fusable(parts)
    fused = FusedProducts(parts)
    want_w = torch.cat(dense)
    for rows in (1, 3, 8, 9):
        x = torch.randn(rows, in_f, generator=g).to(dtype)
        for threads in (1, 2):
            monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the C call's thread count
            with torch.inference_mode():
                got = fused(x)
            assert got.dtype == dtype and got.shape == (rows, sum(fused.sizes))
            assert rel_err(got, x.float() @ want_w.T) <= TOL[dtype], (rows, threads)
    with torch.inference_mode():  # the C call and the parts' forwards agree (bf16: an output rounding apart)
        x = torch.randn(2, in_f, generator=g).to(dtype)
        assert rel_err(fused(x), torch.cat([p(x) for p in parts], dim=-1)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_biases_are_derived_not_kept(dtype, path):
    """Affine weights whose biases are −2^(bits−1)·scales (compressed-tensors INT4 loads as affine 4-bit with
    bias = −8·scale) keep no biases in the backend: the kernels derive them, the products and the state_dict are
    unchanged. Biases that are not symmetric stay."""
    g = torch.Generator().manual_seed(0)
    spec = QuantSpec("affine", 4, 32)
    for symmetric in (True, False):
        plain = PackedLinear.from_float(torch.nn.Linear(256, 96, bias=False).to(dtype), spec)
        plain.weight = torch.randint(0, 2**32, plain.weight.shape, generator=g, dtype=torch.int64).to(torch.uint32)
        plain.scales = torch.rand(plain.scales.shape, generator=g).to(dtype) / 8
        plain.biases = plain.scales * -8 if symmetric else torch.randn(plain.biases.shape, generator=g).to(dtype) / 8
        fast = cpu_quant.swap(copy.deepcopy(plain))
        assert ("biases" in dict(fast.named_buffers())) is not symmetric
        assert torch.equal(fast.biases, plain.biases)  # derived where read
        state = plain.state_dict()
        assert fast.state_dict().keys() == state.keys() and all(torch.equal(fast.state_dict()[k], v)
                                                                 for k, v in state.items())
        w = plain.dense_weight(torch.float32)
        for rows in (1, 3, 40):  # decode (C product), prefill (C dequantization then BLAS)
            x = torch.randn(rows, 256, generator=g).to(dtype)
            with torch.inference_mode():
                assert rel_err(fast(x), x.float() @ w.T) <= TOL[dtype]
    E, hidden, inter = 4, 128, 64
    experts = PackedStackedExperts(E, hidden, inter, spec, spec, dtype)
    for name in ("gate_up_proj", "down_proj"):
        scales = getattr(experts, name + "_scales")
        setattr(experts, name, torch.randint(0, 2**32, getattr(experts, name).shape, generator=g,
                                             dtype=torch.int64).to(torch.uint32))
        setattr(experts, name + "_scales", torch.rand(scales.shape, generator=g).to(dtype) / 8)
        setattr(experts, name + "_biases", getattr(experts, name + "_scales") * -8)
    fast = cpu_quant.swap(copy.deepcopy(experts))
    assert not any(n.endswith("_biases") for n, _ in fast.named_buffers())
    state = experts.state_dict()
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in state.items()) and fast.state_dict().keys() == state.keys()
    for counts in ([1, 0, 1, 1], [2, 9, 0, 3]):
        xs = torch.randn(sum(counts), hidden, generator=g).to(dtype)
        with torch.inference_mode():
            for a, b in zip(fast.grouped(xs, counts), experts.grouped(xs, counts)):
                assert rel_err(a, b) <= 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [QuantSpec("mxfp4", 4, 32), QuantSpec("affine", 4, 64), QuantSpec("nvfp4", 4, 16),
                                  QuantSpec("mxfp8", 8, 32), QuantSpec("affine", 3, 32)],
                         ids=lambda s: f"{s.mode}{s.bits}g{s.group_size}")
def test_packed_embedding_rows_in_c_equal_plain(spec, dtype, path):
    """The looked-up rows dequantized in C are the plain module's, bit for bit (a decode step's one id, a prompt's)."""
    torch.manual_seed(0)
    plain = PackedEmbedding(50, 256, spec, dtype)
    for name, t in zip(("weight", "scales", "biases"), spec.quantize(torch.randn(50, 256).to(dtype))):
        setattr(plain, name, t)
    fast = cpu_quant.swap(copy.deepcopy(plain))
    assert type(fast) is CpuPackedEmbedding
    for ids in (torch.tensor([[7]]), torch.randint(0, 50, (2, 9))):
        with torch.inference_mode():
            got, want = fast(ids), plain(ids)
        assert got.shape == want.shape and torch.equal(got, want)


def _mlx_policy(model, spec: QuantSpec) -> dict:
    """mlx-lm's kimi_linear quant_predicate: every Linear / Embedding / expert stack whose input divides the group,
    the router at affine 8-bit g64."""
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, TopkRouter) and m.weight.shape[-1] % 64 == 0:
            specs[name] = QuantSpec("affine", 8, 64)
        elif isinstance(m, StackedExperts):
            if m.gate_up_proj.shape[-1] % spec.group_size == 0 and m.down_proj.shape[-1] % spec.group_size == 0:
                specs[f"{name}.gate_up_proj"] = specs[f"{name}.down_proj"] = spec
        elif isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.shape[-1] % spec.group_size == 0:
            specs[name] = spec
    return specs


def _quantized_tiny(spec: QuantSpec, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = KimiLinearForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.1)
    swap_modules(model, _mlx_policy(model, spec), pack=True, dtype=dtype)
    return model


MODEL_SPECS = [QuantSpec("mxfp4", 4, 32), QuantSpec("affine", 4, 32), QuantSpec("affine", 8, 32),
               QuantSpec("affine", 2, 32), QuantSpec("mxfp8", 8, 32), QuantSpec("nvfp4", 4, 16)]


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: f"{s.mode}{s.bits}g{s.group_size}")
def test_prepared_quantized_model_equals_plain(spec, token_ids, monkeypatch):
    """fp32: prefill, then decode steps of one row and of two (the experts' few-row C call), against the plain
    quantized model; the state_dict is the plain one's, tensor for tensor."""
    monkeypatch.setattr(cpu, "INT4_KERNEL", False)  # affine 4-bit in quant.c here (the int4 kernel has its tests)
    plain = _quantized_tiny(spec, torch.float32)
    prepared = cpu.prepare(copy.deepcopy(plain))
    kinds = {type(m) for m in prepared.modules()}
    assert {CpuPackedLinear, CpuPackedStackedExperts, CpuSparseMoE, CpuPackedMLA, CpuKimiDeltaAttention, CpuMLP} <= kinds
    assert not {KimiDeltaAttention, MultiheadLatentAttention, MLP} & kinds  # every layer on the backend's path
    for m in prepared.modules():  # the input products of each layer in one C call, reading the quantized parts
        if isinstance(m, (CpuKimiDeltaAttention, CpuMLP)) or type(m) is CpuPackedMLA:
            fused = m.gate_up_proj if isinstance(m, CpuMLP) else m.in_proj
            assert isinstance(fused, FusedProducts) and all(type(p) is CpuPackedLinear for p in fused.parts)
    assert CpuPackedRouter in kinds or spec.group_size == 16  # the router (64 wide) is quantized at affine 8-bit g64
    want_state = plain.state_dict()
    assert prepared.state_dict().keys() == want_state.keys()
    assert all(torch.equal(v, want_state[k]) for k, v in prepared.state_dict().items())
    with torch.inference_mode():
        assert rel_err(prepared(token_ids), plain(token_ids)) <= 1e-4
        for ids in (token_ids[:1, :30], token_ids[:, :30]):
            caches = [prepared.make_cache(ids.shape[0]), plain.make_cache(ids.shape[0])]
            assert rel_err(prepared(ids[:, :20], cache=caches[0]), plain(ids[:, :20], cache=caches[1])) <= 1e-4
            for t in range(20, 30):
                got, want = prepared(ids[:, t : t + 1], cache=caches[0]), plain(ids[:, t : t + 1], cache=caches[1])
                assert rel_err(got, want) <= 1e-4


def test_prepared_bf16_quantized_model_is_as_close_to_fp32_as_plain(token_ids):
    """bf16: prepared and plain MXFP4 models, each compared with the fp32 plain model: as close (measured equal
    medians; the bound allows a few expert choices flipped by single bf16 roundings). Run to run the same: the C
    router once read a bf16 balancing bias as fp32, past its end, and landed 1-3x the plain model's distance."""
    exact = _quantized_tiny(QuantSpec("mxfp4", 4, 32), torch.float32)
    plain = _quantized_tiny(QuantSpec("mxfp4", 4, 32), torch.bfloat16)
    prepared = cpu.prepare(copy.deepcopy(plain))
    with torch.inference_mode():
        want = exact(token_ids)
        ours, reference = ((m(token_ids).float() - want).abs().median() for m in (prepared, plain))
        cache = prepared.make_cache(1)
        prepared(token_ids[:1, :10], cache=cache)
        step = prepared(token_ids[:1, 10:11], cache=cache)
    assert ours <= 1.25 * reference
    assert torch.isfinite(step).all()


@pytest.mark.parametrize("mode,bits,group", [("mxfp4", 4, 32), ("affine", 8, 64)])
def test_converted_checkpoint_loads_prepared_equal_to_plain(official_checkpoint, tmp_path, capsys, token_ids, mode,
                                                            bits, group):
    """``kimi-lm convert --quantize`` output, loaded with the backend (the default) and without (backend=None)."""
    dst = tmp_path / mode
    assert cli(["convert", "--quantize", str(official_checkpoint), str(dst), "--q-mode", mode, "--q-bits", str(bits),
                "--q-group-size", str(group), "--quiet"]) == 0
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prepared = kimi_lm.load(dst, dtype=torch.float32)
    plain = kimi_lm.load(dst, dtype=torch.float32, backend=None)
    assert any(isinstance(m, CpuPackedLinear) for m in prepared.modules())
    with torch.inference_mode():
        assert rel_err(prepared(token_ids), plain(token_ids)) <= 1e-4
        caches = [prepared.make_cache(2), plain.make_cache(2)]
        prepared(token_ids[:, :20], cache=caches[0])
        plain(token_ids[:, :20], cache=caches[1])
        for t in range(20, 24):
            got, want = prepared(token_ids[:, t : t + 1], cache=caches[0]), plain(token_ids[:, t : t + 1], cache=caches[1])
            assert rel_err(got, want) <= 1e-4


_BACKEND_LOAD_RSS = r'''
import ctypes, gc, json, sys, torch, kimi_lm
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
# the backend's one-time costs (libraries' pages, oneDNN's JIT kernels, the C kernels, thread pools) do not grow with
# the model: paid on a small checkpoint of the same family first, so the measurement is what *this* one adds
warm = kimi_lm.load(sys.argv[2], dtype=torch.bfloat16)
with torch.inference_mode():
    warm(torch.tensor([[1, 2]]))
del warm
gc.collect()
ctypes.CDLL(None).malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = kib("VmRSS:")
model = kimi_lm.load(sys.argv[1], dtype=torch.bfloat16)
print(json.dumps({"peak": kib("VmHWM:") - before, "after": kib("VmRSS:") - before}))
'''


def test_int4_checkpoint_with_the_backend_stays_near_the_files(tmp_path):
    """Issue 18: a K2-Thinking INT4 checkpoint loaded with the CPU backend holds ≤ 1.2× its files' bytes (resident
    growth after loading; the peak too). The experts stay in their packing on quant.c (no int4-kernel copy, no
    scales_zeros table) and their symmetric biases (−8·scale) are derived, not kept: the tensors come to ~1.0x."""
    import dataclasses
    import subprocess
    import sys

    pytest.importorskip("compressed_tensors")
    from k2_int4_checkpoints import write_random_int4_checkpoint

    cfg = dataclasses.replace(preset("tiny-k2"), hidden_size=1024, moe_intermediate_size=512, n_routed_experts=32,
                              n_group=1, topk_group=1, num_hidden_layers=4, dtype="bfloat16")
    ckpt = write_random_int4_checkpoint(cfg, tmp_path / "ckpt")
    small = write_random_int4_checkpoint(dataclasses.replace(preset("tiny-k2"), dtype="bfloat16"), tmp_path / "small")
    disk = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", _BACKEND_LOAD_RSS, str(ckpt), str(small)], capture_output=True,
                         text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print({k: round(v / disk, 3) for k, v in got.items()})
    assert got["after"] <= 1.2 * disk and got["peak"] <= 1.3 * disk
    model = kimi_lm.load(ckpt, dtype=torch.bfloat16)
    experts = [m for m in model.modules() if isinstance(m, CpuPackedStackedExperts)]
    assert experts and all(not any(n.endswith("_biases") for n, _ in m.named_buffers()) for m in experts)
    tensors = sum(t.numel() * t.element_size() for m in experts for t in m.buffers())
    assert tensors <= 0.9 * disk  # codes and scales only: what the files hold for the experts
