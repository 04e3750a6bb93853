"""The CPU backend's FP8 block products (kimi_lm/cpu/kernels/fp8.c, kimi_lm/cpu/fp8.py) against the plain
dequantize-then-matmul reference (kimi_lm.quant.fp8_block), kernel by kernel, on every decoding path this CPU has,
and as a whole tiny Kimi K2 FP8 checkpoint loaded with the CPU backend."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import kimi_lm
from conftest import one_call_and_calls, rel_err
from k2_checkpoints import write_random_fp8_checkpoint
from kimi_lm.config import FP8_BLOCK_CONFIG, preset
from kimi_lm import cpu
from kimi_lm.cpu import fp8
from kimi_lm.cpu.fp8 import CpuFP8BlockLinear, CpuFP8StackedExperts
from kimi_lm.cpu.moe import CpuSparseMoE
from kimi_lm.cpu.quant import CpuPackedMLA
from kimi_lm.model.layers import MLP
from kimi_lm.model.moe import StackedExperts
from kimi_lm.quant import fp8_block
from kimi_lm.quant.fp8_block import FP8BlockLinear, FP8StackedExperts, dequantize, dequantize_rows, quantize

pytestmark = pytest.mark.skipif(fp8.fp8_library() is None, reason="no C compiler: the plain modules are all")

# out x in: whole blocks, partial blocks in both dims, widths below one vector (AVX-512: 32, AVX2: 16), one row
SHAPES = [(256, 384), (300, 200), (144, 192), (129, 257), (1, 5), (40, 1000), (7, 33)]
ROWS = [1, 2, 5, 8]


BEST = fp8.path() if fp8.fp8_library() is not None else "scalar"  # the path this CPU takes


@pytest.fixture(params=[name for name, level in fp8.PATHS.items() if level <= fp8.PATHS[BEST]])
def path(request):
    """Each test on every decoding path this CPU has (scalar table, AVX2, AVX-512, AVX-512 BF16)."""
    fp8.limit_path(request.param)
    assert fp8.path() == request.param
    yield request.param
    fp8.limit_path(BEST)


def _weights(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: each block its own scale; some codes subnormal
    w = torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g).pow(4) * 3
    return quantize(w)


def _check_bf16(y: torch.Tensor, want_fp32: torch.Tensor) -> None:
    """y (bf16) is the fp32 result rounded once: within half an ulp of bf16 (2^-8 of the value) plus fp32 noise."""
    assert y.dtype == torch.bfloat16
    bound = want_fp32.abs() * 2**-8 + want_fp32.abs().max() * 1e-5
    assert bool(((y.float() - want_fp32).abs() <= bound).all()), (y.float() - want_fp32).abs().max()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matmul_equals_dequantize_then_matmul(shape, path):
    q, s = _weights(*shape)
    w = dequantize(q, s)  # the reference: fp32 W = Q·S, scales expanded
    g = torch.Generator().manual_seed(1)
    for rows in ROWS + [11]:  # 11: more than one pass of 8 rows
        x = torch.randn(rows, shape[1], generator=g)
        assert rel_err(fp8.matmul(x, q, s), x @ w.T) <= 1e-5
        xb = x.bfloat16()
        _check_bf16(fp8.matmul(xb, q, s), xb.float() @ w.T)
        for threads in (1, 2):  # output rows split among threads: the same numbers
            assert torch.equal(fp8.matmul(x, q, s, threads=threads), fp8.matmul(x, q, s, threads=1))


def test_every_code_decodes_exactly(path):
    """All 254 finite e4m3 codes (subnormals included) in one row: each column's product is code value · x · scale."""
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    q = codes.view(torch.float8_e4m3fn)[None, :].contiguous()  # [1, 254]: two blocks, the second partial
    s = torch.tensor([[0.5, 2.0]])
    for j in range(codes.numel()):
        x = torch.zeros(1, codes.numel())
        x[0, j] = 1.0
        assert fp8.matmul(x, q, s).item() == q[0, j].float().item() * s[0, j // 128].item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_is_bit_exact(shape, path):
    q, s = _weights(*shape, seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fp8.dequantize(q, s, dtype), dequantize_rows(q, s, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_module_decode_and_prefill_rows(dtype, monkeypatch):
    torch.manual_seed(0)
    plain = FP8BlockLinear.from_float(torch.nn.Linear(300, 520, bias=False))
    fast = CpuFP8BlockLinear(plain)
    assert fast.weight is plain.weight and fast.state_dict().keys() == plain.state_dict().keys()
    monkeypatch.setattr(fp8_block, "TILE_ELEMENTS", 128 * 300)  # prefill tiles: 128 rows each, the last partial
    monkeypatch.setattr(fp8, "TILE_ELEMENTS", 128 * 300)
    w = dequantize(plain.weight, plain.weight_scale_inv)
    for shape in [(1, 300), (2, 3, 300), (1, 8, 300), (2, 20, 300)]:  # decode rows in C; 9+ rows: tiles + BLAS
        x = torch.randn(shape).to(dtype)
        want = F.linear(x.float(), w)
        got = fast(x)
        assert got.shape == (*shape[:-1], 520) and got.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(got, want) <= 1e-5
        elif x.numel() // 300 <= fp8.DECODE_ROWS:
            _check_bf16(got, want)
        else:  # many rows: exactly the plain module's computation (same dequantized tiles, same BLAS call)
            assert torch.equal(got, plain(x))
    x = torch.randn(300, 4).to(dtype).T  # a non-contiguous view: copied, then the same numbers
    assert torch.equal(fast(x), fast(x.contiguous()))


def _experts(E=6, hidden=200, inter=136, seed=0) -> tuple[StackedExperts, FP8StackedExperts]:
    torch.manual_seed(seed)
    dense = StackedExperts(E, hidden, inter)
    with torch.no_grad():
        dense.gate_up_proj.normal_(0, 0.1)
        dense.down_proj.normal_(0, 0.1)
    return dense, FP8StackedExperts.from_float(dense)


def _reference_expert(plain: FP8StackedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of expert e in fp32 from the reference dequantization (gate and up on their own block grids)."""
    I, rb = plain.intermediate_size, plain.gate_up_proj_scale_inv.shape[1] // 2
    q, s = plain.gate_up_proj[e], plain.gate_up_proj_scale_inv[e]
    gate = x.float() @ dequantize(q[:I], s[:rb]).T
    up = x.float() @ dequantize(q[I:], s[rb:]).T
    return (F.silu(gate) * up) @ dequantize(plain.down_proj[e], plain.down_proj_scale_inv[e]).T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_few_rows_in_one_call(dtype, path):
    """grouped(): experts with 1-8 rows in one C call, others by the many-row path; hidden and I not block multiples."""
    _, plain = _experts()
    fast = CpuFP8StackedExperts(plain)
    counts = [1, 0, 3, 8, 12, 2]  # expert 4 (12 rows) takes the many-row path
    xs = torch.randn(sum(counts), 200).to(dtype)
    got, want_plain = fast.grouped(xs, counts), plain.grouped(xs, counts)
    start = 0
    for out, ref, (e, n) in zip(got, want_plain, [(e, n) for e, n in enumerate(counts) if n]):
        want = _reference_expert(plain, e, xs[start : start + n])
        start += n
        assert out.shape == (n, 200) and out.dtype == dtype
        # bf16: the reference rounds each dequantized weight and each intermediate to bf16 (as the plain model does)
        assert rel_err(out, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_experts_shared_among_threads_give_the_same_numbers(monkeypatch):
    _, plain = _experts(seed=2)
    fast = CpuFP8StackedExperts(plain)
    counts, threads = [2, 1, 0, 3, 1, 1], torch.get_num_threads()
    xs = torch.randn(sum(counts), 200).bfloat16()
    one = fast.grouped(xs, counts)
    monkeypatch.setattr(fp8, "SMALL_BYTES", 0)  # these small experts shared among two threads
    torch.set_num_threads(2)
    try:
        shared = fast.grouped(xs, counts)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, shared))


def test_experts_single_products_equal_the_plain_module():
    _, plain = _experts(seed=1)
    fast = CpuFP8StackedExperts(plain)
    x = torch.randn(3, 200)
    for e in (0, 5):
        assert rel_err(fast.gate_up(e, x), plain.gate_up(e, x)) <= 1e-5
        h = F.silu(torch.randn(3, 136))
        assert rel_err(fast.down(e, h), plain.down(e, h)) <= 1e-5
        many = torch.randn(20, 200)  # many rows: dequantized tiles in C, then BLAS
        assert rel_err(fast.expert(e, many), plain.expert(e, many)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_in_one_call(dtype, path):
    """A dense / shared-expert MLP of fp8 blocks: gate, up, SwiGLU, down in one C call up to 8 rows, else per
    product."""
    torch.manual_seed(0)
    mlp = MLP(200, 136)
    plain = copy.deepcopy(mlp)
    fp8_block.quantize_modules(plain, lambda name, m: True, pack=True)
    assert fp8.fp8_mlp(plain) and not fp8.fp8_mlp(mlp)
    fast = fp8.CpuFP8MLP(plain)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    gate, up, down = (dequantize(p.weight, p.weight_scale_inv)
                      for p in (plain.gate_proj, plain.up_proj, plain.down_proj))
    for shape in [(1, 200), (1, 3, 200), (8, 200), (2, 10, 200)]:
        x = torch.randn(shape).to(dtype)
        want = (F.silu(x.float() @ gate.T) * (x.float() @ up.T)) @ down.T
        got = fast(x)
        assert got.shape == x.shape and got.dtype == dtype
        assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel_err(got, plain(x)) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.fixture(scope="module")
def k2_fp8(tmp_path_factory):
    cfg = dataclasses.replace(preset("tiny-k2"), quantization_config=dict(FP8_BLOCK_CONFIG))
    return write_random_fp8_checkpoint(cfg, tmp_path_factory.mktemp("k2fp8") / "ckpt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_k2_fp8_model_on_the_cpu_backend(k2_fp8, dtype):
    plain = kimi_lm.load(k2_fp8, dtype=dtype, backend=None)
    fast = kimi_lm.load(k2_fp8, dtype=dtype, backend=None)
    fp8_tensors = {name: t.data_ptr() for name, t in fast.state_dict().items() if t.dtype == fp8_block.FP8
                   or name.endswith("scale_inv")}
    cpu.prepare(fast)  # what kimi_lm.load(backend="auto") does on CPU
    layer = fast.model.layers[1]
    assert isinstance(layer.mlp, CpuSparseMoE) and isinstance(layer.mlp.experts, CpuFP8StackedExperts)
    assert isinstance(layer.self_attn, CpuPackedMLA) and isinstance(layer.self_attn.kv_b_proj, CpuFP8BlockLinear)
    assert isinstance(fast.model.layers[0].mlp, fp8.CpuFP8MLP) and isinstance(layer.mlp.shared_experts, fp8.CpuFP8MLP)
    assert not any(type(m) in (FP8BlockLinear, FP8StackedExperts) for m in fast.modules())  # every one swapped
    state = fast.state_dict()
    assert state.keys() == plain.state_dict().keys()
    assert {name: state[name].data_ptr() for name in fp8_tensors} == fp8_tensors  # codes and scales read in place

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2  # bf16: plain bf16 vs plain fp32 differ by 6e-3 here
    with torch.no_grad():
        full_plain, full = plain(ids), fast(ids)
        assert rel_err(full, full_plain) <= tol
        # decode: one token per step through the few-row kernels, against the plain model's full forward
        cache = fast.make_cache(batch_size=2)
        steps = [fast(ids[:, :16], cache=cache)] + [fast(ids[:, t : t + 1], cache=cache) for t in range(16, 24)]
        decoded = torch.cat(steps, dim=1)
        assert rel_err(decoded, full_plain) <= tol
        assert rel_err(decoded, full) <= tol
        one = fast.make_cache(batch_size=1)  # batch 1: the one-token MoE path (router and k experts in C)
        single = [fast(ids[:1, :16], cache=one)] + [fast(ids[:1, t : t + 1], cache=one) for t in range(16, 24)]
        assert rel_err(torch.cat(single, dim=1), full_plain[:1]) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_fp8_moe_token_in_one_call_equals_the_calls(k2_fp8, dtype, tokens, path, monkeypatch):
    """A decode step's MoE block with FP8 experts and FP8 shared expert in one C call (moe_kernels.moe_decode: the
    fp8_weight descriptors), for one token and for the 3 of a batched step, against the same block's multi-call path
    (one token: bit for bit, the same row products on the same prepared inputs) and the plain block; on every
    decoding path."""
    from kimi_lm.cpu import moe_kernels

    plain = kimi_lm.load(k2_fp8, dtype=dtype, backend=None)
    fast = cpu.prepare(kimi_lm.load(k2_fp8, dtype=dtype, backend=None))
    blocks = [(p.mlp, f.mlp) for p, f in zip(plain.model.layers, fast.model.layers) if isinstance(f.mlp, CpuSparseMoE)]
    calls = []
    real = moe_kernels.moe_decode
    monkeypatch.setattr(moe_kernels, "moe_decode", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for reference, ours in blocks:
            for _ in range(4):
                x = torch.randn(tokens, 1, reference.gate.weight.shape[1], generator=g).to(dtype)
                one_call, calls_path = one_call_and_calls(ours, x)
                if tokens == 1:
                    assert torch.equal(one_call, calls_path)
                else:  # the router's product for several tokens at once: rounded otherwise
                    assert rel_err(one_call, calls_path) <= (1e-6 if dtype == torch.float32 else 2e-2)
                assert rel_err(one_call, reference(x)) <= (1e-5 if dtype == torch.float32 else 2e-2)
            assert ours._plan is not None and ours._plan.dtype is None
    assert len(calls) == 4 * len(blocks) > 0
