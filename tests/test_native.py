"""The C kernels (kimi_lm/cpu/native.py, sources in kimi_lm/cpu/kernels/) against the PyTorch code they stand in for
(the oracle)."""

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from kimi_lm.cpu import moe_kernels, native, onednn
from kimi_lm.ops.kda_naive import kda_recurrent_naive
from test_kda_ops import make_inputs

pytestmark = pytest.mark.skipif(native.library() is None or not onednn.available(torch.float32, "cpu"),
                                reason="no C compiler or no oneDNN here: the PyTorch path is all there is")

DTYPES = [torch.float32] + ([torch.bfloat16] if onednn.available(torch.bfloat16, "cpu") else [])


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_dispatch_groups_like_a_stable_sort(dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(70, 24, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(70)])  # [70, 3], experts 0..9 (some idle)
    idx[idx == 4] = 5  # expert 4 gets nothing
    xs, counts, slot_row = moe_kernels.moe_dispatch(x, idx, 10)
    order = idx.flatten().argsort(stable=True)
    assert counts == torch.bincount(idx.flatten(), minlength=10).tolist() and counts[4] == 0
    assert torch.equal(slot_row, order.argsort())
    assert torch.equal(xs, x[order // 3])
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        moe_kernels.moe_dispatch(x, torch.full((70, 3), 10), 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(40, 96), (100, 70), (513, 130), (64, 32)])
def test_packed_gemv_reads_onednn_layouts(dtype, shape):
    out_features, in_features = shape
    w = torch.randn(out_features, in_features).to(dtype)
    packed = onednn.pack(w)
    gemv = native.for_packed(packed, out_features, in_features)
    assert gemv is not None  # the layout was recognised and confirmed against oneDNN's own product
    x = torch.randn(1, in_features).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float())
    assert rel_err(gemv(x), want) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(41, 96), (100, 70), (513, 130), (7, 2304)])
def test_packed_gemv_of_several_rows_equals_the_product(dtype, rows, shape):
    """Several input rows through one pass over the weight (a batched decode step's): two weight rows at a time with
    an odd last one, input widths that are no multiple of 16, and rows too wide to stay in L1 together (the 4 x 4
    tile)."""
    out_features, in_features = shape
    g = torch.Generator().manual_seed(4)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    gemv = native.for_packed(onednn.pack(w), out_features, in_features)
    assert gemv is not None
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float())
    got = gemv(x)
    assert got.shape == (rows, out_features)
    assert rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)
    for r in range(rows):  # each row as its own product would give it, up to fp32 summation order
        assert rel_err(got[r], want[r]) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(torch.bfloat16 not in DTYPES, reason="no oneDNN bf16 here")
@pytest.mark.parametrize("shape", [(64, 32), (100, 70), (513, 131), (2304, 1024)])
def test_bf16_one_row_product_is_the_exact_sum_rounded_once(shape):
    """A bf16 one-row product in C on oneDNN's AB16b64a2b pairs: each output is the exact sum of exact products up to
    fp32 summation order, rounded once to bf16; odd widths (a last block ending mid-pair) and partial 64-output blocks
    included."""
    out_features, in_features = shape
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)
    gemv = native.for_packed(onednn.pack(w), out_features, in_features)
    assert gemv is not None
    x = torch.randn(1, in_features, generator=g).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), w.double())  # products and sums exact in float64
    got = gemv(x).double()
    order = in_features * 2.0**-24 * (x.double().abs() @ w.double().abs().T)  # fp32 summation-order bound
    assert ((got - exact).abs() <= 2.0**-8 * exact.abs() + order).all()


def test_one_row_runs_in_c_at_any_size_and_several_rows_up_to_the_limit(monkeypatch):
    """One-row products of a weight above the limit still run in C (they measured faster than oneDNN at every size);
    products of several rows of it go to oneDNN, whose many-row kernels compute faster on large weights."""
    monkeypatch.setattr(native, "GEMV_MAX_BYTES", 1000)
    linear = torch.nn.Linear(16, 16, bias=False)  # 1024 bytes of fp32
    packed = onednn.OneDNNLinear(linear)
    assert packed.gemv is not None
    assert native.gemv_takes(packed.gemv.nbytes, 1) and not native.gemv_takes(packed.gemv.nbytes, 2)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda a, *rest: calls.append(a.shape) or real(a, *rest))
    with torch.no_grad():
        x = torch.randn(2, 16)
        assert rel_err(packed(x[:1]), linear(x[:1])) <= 1e-6
        assert calls == []  # the C kernel
        assert rel_err(packed(x), linear(x)) <= 1e-6
    assert calls == [(2, 16)]


def test_gemv_limit_shrinks_with_threads_and_is_followed(monkeypatch):
    assert native.gemv_max_bytes(1) == native.gemv_max_bytes(2) == 16 << 20
    assert native.gemv_max_bytes(8) == 4 << 20 and native.gemv_max_bytes(256) == 512 << 10
    linear = torch.nn.Linear(512, 1024, bias=False)  # 2 MiB of fp32
    packed = onednn.OneDNNLinear(linear)
    assert packed.gemv is not None
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda a, *rest: calls.append(a.shape) or real(a, *rest))
    x = torch.randn(2, 512)  # a batched step's two rows: the limit applies
    with torch.no_grad():
        monkeypatch.setattr(native, "gemv_max_bytes", lambda threads=None: 16 << 20)  # as with 2 threads
        packed(x)
        assert calls == []  # the C kernel
        monkeypatch.setattr(native, "gemv_max_bytes", lambda threads=None: 1 << 20)  # as with 32 threads
        assert rel_err(packed(x), linear(x)) <= 1e-6
        assert calls == [(2, 512)]
        packed(x[:1])  # one row: C at any size
    assert calls == [(2, 512)]


def test_packed_gemv_refuses_a_layout_it_cannot_confirm(monkeypatch):
    """A layout that does not reproduce oneDNN's product (here: claimed plain for a bf16 block layout) is not used."""
    if torch.bfloat16 not in DTYPES:
        pytest.skip("no bf16 oneDNN here")
    monkeypatch.setattr(native, "_layout_checked", {})
    monkeypatch.setattr(native, "_guess_layout", lambda packed, o, i: native._PLAIN)
    assert native.for_packed(onednn.pack(torch.randn(128, 64).bfloat16()), 128, 64) is None


def _elementwise(which: int, x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    native.library().elementwise(which, x.numel(), x.data_ptr(), y.data_ptr())
    return y


@pytest.mark.parametrize("which,reference", [
    (0, lambda x: x.double().exp().float()), (2, lambda x: x.double().sigmoid().float()),
    (3, torch.nn.functional.silu),  # fp32 semantics: silu(x < -88.7) is -0, as torch's own float silu
    (4, lambda x: torch.nn.functional.softplus(x.double()).float())])
def test_vectorised_math_matches_torch(which, reference):
    """The kernels' own exp / sigmoid / silu / softplus (libm's stay scalar in SIMD loops) over fp32's whole range:
    within 4e-7 relative where the result is normal, within a subnormal step below, inf and NaN where torch has them."""
    x = torch.cat([torch.linspace(-110, 95, 400_001), torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])])
    got, want = _elementwise(which, x), reference(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    normal = finite & (want.abs() >= 1.2e-38)
    assert ((got[normal] - want[normal]).abs() / want[normal].abs()).max() <= 4e-7
    assert (got[finite & ~normal] - want[finite & ~normal]).abs().max() <= 1.2e-38


def test_vectorised_log1p_matches_torch():
    u = torch.cat([torch.logspace(-30, 9, 200_001), torch.tensor([0.0])])
    got, want = _elementwise(1, u), torch.log1p(u.double()).float()
    assert got[-1] == 0 and ((got[:-1] - want[:-1]).abs() / want[:-1]).max() <= 2e-7


@pytest.fixture(params=["openmp", "pthreads", "one thread"])
def threading(request, monkeypatch):
    """Run the multi-threaded kernels on PyTorch's OpenMP team, on their own pthreads, or on one thread."""
    lib = native.library()
    if request.param == "openmp" and native._openmp_entry_points() is None:
        pytest.skip("PyTorch does not run on an OpenMP runtime here")
    if request.param == "pthreads":
        lib.use_openmp(None, None, None)
    if request.param == "one thread":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    yield request.param
    lib.use_openmp(*(native._openmp_entry_points() or (None, None, None)))


@pytest.mark.parametrize("B,T,H,K,V", [(2, 77, 3, 5, 37), (1, 130, 2, 128, 128), (2, 65, 2, 33, 64),
                                       (1, 3, 1, 256, 130)])
@pytest.mark.parametrize("decay_scale", [0.5, 30.0])
def test_kda_scan_equals_recurrent_oracle(B, T, H, K, V, decay_scale, threading):
    """Odd and even key dims, value dims that are not whole 64-column slices, several slices per head, one head per
    thread or many, an initial state, decays from slow to within a few tokens."""
    q, k, v, g, beta, state = make_inputs(B, T, H, K, V, decay_scale, seed=K + V)
    want_o, want_state = kda_recurrent_naive(q, k, v, g, beta, state)
    final = state.clone()
    o = native.kda_scan(q, k, v, g.exp(), beta, final)
    assert rel_err(o, want_o) <= 2e-6
    assert rel_err(final, want_state) <= 2e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_kernel_equals_pytorch(dtype):
    gate_up = (torch.randn(3, 29, 2 * 40, generator=torch.Generator().manual_seed(7)) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert rel_err(native.swiglu(gate_up), torch.nn.functional.silu(gate) * up) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_kernel_equals_pytorch(dtype):
    weight = torch.empty(1100).uniform_(0.5, 1.5)  # rows longer than the kernel's 1024-value blocks
    x = (torch.randn(2, 9, 1100, generator=torch.Generator().manual_seed(8)) * 3).to(dtype)
    want = torch.nn.functional.rms_norm(x.float(), (1100,), weight, eps=1e-5).to(dtype)
    assert rel_err(native.rms_norm(x, weight, 1e-5), want) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_build_is_cached_and_atomic(tmp_path):
    first = native.build(tmp_path)
    assert first.exists() and native.build(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_build_compiles_every_c_file_into_one_library_named_by_all_sources(monkeypatch, tmp_path):
    """One compiler call takes all the .c files (the header only through them); a change to any source, the header
    included, names (so builds) a new library."""
    sources = tmp_path / "kernels"
    shutil.copytree(native.SOURCE_DIR, sources)
    monkeypatch.setattr(native, "SOURCE_DIR", sources)
    commands = []

    def compiler(command, **kwargs):  # stands in for the compiler: writes an empty "library"
        commands.append(command)
        Path(command[command.index("-o") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(native.subprocess, "run", compiler)
    first = native.build(tmp_path / "cache")
    c_files = sorted(str(p) for p in sources.glob("*.c"))
    assert len(c_files) > 1 and [a for a in commands[0] if a.endswith((".c", ".h"))] == c_files
    with open(sources / "common.h", "a") as f:
        f.write("\n")
    second = native.build(tmp_path / "cache")
    assert len(commands) == 2 and second != first and first.exists() and second.exists()


def test_library_exports_only_its_entry_points():
    """What one C file lends another (``INTERNAL`` in common.h) stays inside the library: ctypes cannot find it."""
    lib = native.library()
    assert hasattr(lib, "kda_scan") and hasattr(lib, "elementwise")
    for name in ("parallel_for", "product_f32", "product_rows_f32", "load_row", "exp_f32"):
        assert not hasattr(lib, name), name


def test_build_falls_back_to_portable_flags_and_then_reuses_that_build(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "FLAGS", ("-fno-such-flag-anywhere", *native.PORTABLE_FLAGS))
    portable = native.build(tmp_path)
    assert portable.exists()

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again although a build was there")

    monkeypatch.setattr(native.subprocess, "run", no_compiling)
    assert native.build(tmp_path) == portable  # the failing flags are not retried


def test_unavailable_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KIMI_LM_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="C kernels unavailable"):
            assert native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None  # cached: warned once
        assert not native.supports(torch.zeros(1))
    finally:
        native.library.cache_clear()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("KIMI_LM_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()


def test_release_thread_team_ends_this_threads_openmp_workers():
    """The server's Engine lets the loading thread's OpenMP workers go before its scheduler thread takes the model
    (more workers than CPUs make GNU OpenMP throttle their spin-waits); a later parallel op starts a team again."""
    import sys

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("PyTorch here does not run on OpenMP")
    script = """
import os, torch
from kimi_lm.cpu import native
tasks = lambda: len(os.listdir("/proc/self/task"))
torch.set_num_threads(2)
torch.randn(2048, 2048).sum()  # a parallel op: this thread's team of 2 exists
before = tasks()
released = native.release_thread_team()
after = tasks()
torch.randn(2048, 2048).sum()
print(before, released, after, tasks())
"""
    before, released, after, again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                                    check=True).stdout.split()
    assert released == "True" and int(after) == int(before) - 1 and int(again) == int(before)


def test_the_kernels_compile_with_the_native_flags(tmp_path):
    """A compile error under the native flags falls back to the portable build without a word (the fallback is for
    compilers without -march=native), and every test stays green at a fraction of the speed: wherever the compiler
    takes the native flags, the kernels must compile under them."""
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    probe = tmp_path / "probe.c"
    probe.write_text("int probe(void) { return 0; }\n")
    if subprocess.run([cc, *native.FLAGS, str(probe), "-o", str(tmp_path / "probe.so")], capture_output=True).returncode:
        pytest.skip(f"{cc} does not take the native flags")
    sources = [str(p) for p in native._sources() if p.suffix == ".c"]
    built = subprocess.run([cc, *native.FLAGS, *sources, "-o", str(tmp_path / "kernels.so"), "-lm"], capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr[-3000:]
