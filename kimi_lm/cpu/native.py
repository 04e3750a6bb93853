"""The CPU kernels in C (``kernels/``): built once with the system C compiler, called through ctypes.

Decode: a CPU decode step of a small model is bound by per-op overhead, not arithmetic: each small PyTorch op costs
5–15 µs in place (dispatch, allocation, and code evicted from the caches by the weight stream), and a KDA layer's
decode math is ~40 of them. ``kda_decode`` does that math in one call; the MoE router, SwiGLU and weighted sum and the
one-row products (``PackedGemv``) follow the same idea.

Prefill: the KDA recurrence itself (``kda_scan``: one pass over an L1-resident slice of the state per token, 5x faster
than the chunked PyTorch form on 2 cores), what surrounds it (conv, norms, gates; the gated output norm), RMSNorm,
SwiGLU and the MoE routing, grouping and combining for many tokens; these run on PyTorch's own OpenMP threads.

The PyTorch path stays beside each kernel as the reference (tests compare the two) and as the fallback wherever the
library cannot be built: no C compiler, a compile error (warned once), ``KIMI_LM_NATIVE=0``, or inputs it does not
cover (training, non-CPU tensors, other dtypes).

The sources are one file per concern (``kernels/common.h`` lists them: threads, packed products, KDA, MoE, norms),
compiled together into one shared library with ``-O3 -march=native`` into ``$KIMI_LM_CACHE`` (default
``~/.cache/kimi_lm``)/native, named by a hash of the sources, the compiler, its flags and this CPU's feature flags (a
home directory shared by different machines never loads code built for another CPU), written to a temporary name and
renamed into place. Only the bundled sources are ever compiled; nothing from a checkpoint.

Reference: ``ctypes`` (foreign functions release the GIL during the call); GCC ``-fopenmp-simd``; the GCC OpenMP
ABI (``GOMP_parallel``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).with_name("kernels")  # the C files and their header, compiled into one library
# -fopenmp-simd: the kernels' `omp simd` loops vectorise; no OpenMP runtime is linked (PyTorch brings its own).
# -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC will not if-convert (so
# not vectorise) a loop with a select between two computed values (softplus). Values are unchanged.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fPIC", "-shared", "-std=c11", "-pthread")
PORTABLE_FLAGS = ("-O3", "-fno-trapping-math", "-fPIC", "-shared", "-std=c11", "-pthread")  # for compilers without -march=native (e.g. older Apple clang)

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


def enabled() -> bool:
    return os.environ.get("KIMI_LM_NATIVE", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("KIMI_LM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kimi_lm"
    return Path(root) / "native"


def _cpu_fingerprint() -> str:
    """The CPU's feature flags where Linux lists them, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _sources() -> list[Path]:
    """The library's C files and headers, in a fixed order (the hash's and the compiler's)."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def build(target: Path | None = None) -> Path:
    """Compile the C files of ``kernels/`` into one shared library (if not already there) and return its path.
    Raises ``RuntimeError`` with the compiler's message when no compiler works."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    sources = _sources()
    files = [part for p in sources for part in (p.name.encode(), p.read_bytes())]
    fingerprint = _cpu_fingerprint().encode()
    paths = {}
    for flags in (FLAGS, PORTABLE_FLAGS):
        key = hashlib.sha256(b"\0".join([*files, compiler.encode(), " ".join(flags).encode(), fingerprint]))
        paths[flags] = (target or cache_dir()) / f"kernels-{key.hexdigest()[:20]}.so"
    # a library built before (with either set of flags) is used as it is: no failing compile retried per process
    for path in paths.values():
        if path.exists():
            return path
    attempts = []
    for flags, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            c_files = [str(p) for p in sources if p.suffix == ".c"]
            result = subprocess.run([compiler, *flags, *c_files, "-o", str(built), "-lm"], capture_output=True,
                                    text=True)
            if result.returncode == 0:
                os.replace(built, path)  # atomic: another process never sees a half-written library
                return path
            attempts.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-500:]}")
    raise RuntimeError(f"compiling {SOURCE_DIR} failed:\n" + "\n".join(attempts))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (PyTorch fallback) when disabled or not buildable here (warned once)."""
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"kimi_lm: C kernels unavailable, using the PyTorch path ({e})", RuntimeWarning,
                      stacklevel=2)
        return None
    lib.kda_decode.argtypes = [_L, _L, _L, _L, _I, _P, _P, _P, _P, _P, _P, _I, _P, _I, _P, _P, _F, _F, _P, _I]
    lib.kda_decode.restype = _I
    lib.kda_decode_rows.argtypes = lib.kda_decode.argtypes
    lib.kda_decode_rows.restype = _I
    lib.fused_products.argtypes = [_L, _P, _P, _P, _L, _I, _L, _P, _P, _I]
    lib.fused_products.restype = _I
    lib.kda_scan.argtypes = [_L, _L, _L, _L, _L, _P, _P, _P, _P, _P, _P, _P, _I]
    lib.kda_scan.restype = _I
    lib.kda_prefill_inputs.argtypes = [_L, _L, _L, _L, _L, _L, _I, _P, _P, _P, _P, _P, _P, _F, _P, _P, _P, _P, _P, _I]
    lib.kda_prefill_inputs.restype = _I
    lib.gated_rms_norm.argtypes = [_L, _L, _L, _I, _P, _P, _P, _F, _P, _I]
    lib.gated_rms_norm.restype = _I
    lib.swiglu.argtypes = [_L, _L, _I, _P, _P, _I]
    lib.swiglu.restype = None
    lib.rms_norm.argtypes = [_L, _L, _I, _P, _P, _F, _P, _I]
    lib.rms_norm.restype = None
    lib.elementwise.argtypes = [_I, _L, _P, _P]
    lib.elementwise.restype = None
    lib.use_openmp.argtypes = [_P, _P, _P]
    lib.use_openmp.restype = None
    lib.use_openmp(*(_openmp_entry_points() or (None, None, None)))
    return lib


def _openmp_entry_points() -> tuple[int, int, int] | None:
    """Where PyTorch runs its CPU ops on an OpenMP runtime loaded into the process (GNU libgomp, or a runtime with
    its ABI): the addresses of its ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads``, so that
    multi-threaded kernels run on PyTorch's own thread team instead of competing with it. None elsewhere."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        process = ctypes.CDLL(None)
        names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
        return tuple(ctypes.cast(getattr(process, name), ctypes.c_void_p).value for name in names)
    except (OSError, TypeError, AttributeError):  # no global symbol table (Windows) or a runtime without them
        return None


def release_thread_team() -> bool:
    """Let the calling thread's OpenMP worker threads end (``omp_pause_resource_all(omp_pause_soft)``, OpenMP 5.0;
    the runtime starts a new team if this thread runs parallel work again). For a process whose model work moves to
    another thread (the server's scheduler): GNU OpenMP throttles its workers' spin-waiting once more worker threads
    exist than CPUs, so with the loading thread's team still alive every parallel region of the scheduler thread paid
    a futex wake-up. Measured, bench preset fp32 decode on a second thread: 120 tok/s with the first thread's team
    alive, 166 after releasing it (177-180 vs 186 on the first thread). Returns whether the runtime did it."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (OSError, AttributeError):  # no global symbol table, or a runtime older than OpenMP 5.0
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(1) == 0  # 1: omp_pause_soft


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: CPU, contiguous, fp32/bf16, no autograd, library built."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if not all(t.is_cpu and t.dtype in _DTYPES and t.is_contiguous() for t in tensors):  # is_cpu: no device object
        return False
    return library() is not None


def kda_decode(proj: torch.Tensor, conv_state, state, taps: torch.Tensor, neg_A: torch.Tensor, dt_bias: torch.Tensor,
               f_b, g_b, norm_weight: torch.Tensor, norm_eps: float, l2_eps: float) -> torch.Tensor:
    """One KDA decode token (see ``kernels.c``). proj [B, 3D + 2K + H] in the model dtype; the caches, updated in
    place: conv_state [B, W − 1, 3D] (model dtype) and state [B, H, K, K] fp32, or lists of B such [1, …] tensors,
    each sequence's own (a batched step of sequences with caches of their own: read where they lie); f_b / g_b: the
    gate products' weights, read in place (``products.Reader``: ``layout`` and ``pointer()``; oneDNN-packed or
    MLX-quantized). Returns [B, D] in the model dtype."""
    B = proj.shape[0]
    rows = isinstance(state, list)
    H, K = (state[0] if rows else state).shape[1:3]
    W = taps.shape[0]
    out = torch.empty(B, H * K, dtype=proj.dtype)
    if rows:
        call = library().kda_decode_rows
        conv, st = (_P * B)(*(t.data_ptr() for t in conv_state)), (_P * B)(*(t.data_ptr() for t in state))
    else:
        call, conv, st = library().kda_decode, conv_state.data_ptr(), state.data_ptr()
    status = call(B, H, K, W, _DTYPES[proj.dtype], proj.data_ptr(), conv, st, taps.data_ptr(), neg_A.data_ptr(),
                  dt_bias.data_ptr(), f_b.layout, f_b.pointer(), g_b.layout, g_b.pointer(), norm_weight.data_ptr(),
                  norm_eps, l2_eps, out.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError("kda_decode: could not allocate its scratch memory")
    return out


# One-row products (a decode step of one sequence) on packed weights run in C at every size, output rows shared among
# torch's threads (≈ 1 µs of set-up on its OpenMP team, where oneDNN takes ≈ 15–20 µs). Measured on a 2-core AVX-512
# VM, each weight streamed from memory, C vs oneDNN (bf16: its input padded to 4 rows, its fastest): fp32 1024×512
# 55 vs 143 µs, 6144×2304 669 vs 992, 32768×2304 4404 vs 5727; bf16 2304×1024 85 vs 219, 6144×2304 350 vs 595,
# 32768×2304 1868 vs 2367. A real-layers decode step (Kimi-Linear-48B's layer sizes), alternating in one process:
# fp32 49.4 -> 39.5 ms, bf16 15.6 -> 13.9 ms (its large weights had gone to oneDNN under a 16 MiB limit).
# Products of several rows (a batched step) run in C up to GEMV_MAX_BYTES per weight: there oneDNN's many-row kernels
# compute faster on large weights (onednn.GEMV_ROWS). Measured at 2 threads: C ≥ oneDNN up to 16 MiB (fp32 2048×2304
# at 8 rows); with more threads the limit shrinks in proportion (not measured beyond 2 cores: a cautious guess), but
# never below the size where oneDNN's set-up alone costs what one core needs to read the weight (≈ 384 KiB).
GEMV_MAX_BYTES = 16 << 20
GEMV_MIN_BYTES = 512 << 10


def gemv_max_bytes(threads: int | None = None) -> int:
    """Largest weight whose products of several rows go to the C kernel at this many threads (default: torch's)."""
    threads = threads or torch.get_num_threads()
    return GEMV_MAX_BYTES if threads <= 2 else max(GEMV_MIN_BYTES, GEMV_MAX_BYTES * 2 // threads)


def gemv_takes(nbytes: int, rows: int, threads: int | None = None) -> bool:
    """Whether a product of ``rows`` input rows on a C-readable weight of ``nbytes`` runs in C: one row always."""
    return rows == 1 or nbytes <= gemv_max_bytes(threads)


_PLAIN, _AB16B64A2B = 0, 1
_layout_checked: dict[tuple, bool] = {}


def _guess_layout(packed: torch.Tensor, out_features: int, in_features: int) -> int | None:
    """The layout oneDNN gave this packed weight, judged by its size: fp32 plain [O, I]; bf16 AB16b64a2b blocks."""
    nbytes = torch.ops.mkldnn._nbytes(packed)
    if packed.dtype == torch.float32 and nbytes == out_features * in_features * 4:
        return _PLAIN
    if packed.dtype == torch.bfloat16 and nbytes == -(-out_features // 64) * 64 * -(-in_features // 32) * 32 * 2:
        return _AB16B64A2B
    return None


class PackedGemv:
    """One-row products ``x [1, in] -> [1, out]`` on a oneDNN-packed weight, computed by the C kernel straight from
    the packed memory (no second copy). Made by ``for_packed`` only after its layout has reproduced oneDNN's own
    product for that dtype and shape."""

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int, layout: int):
        self.packed, self.out_features, self.in_features, self.layout = packed, out_features, in_features, layout
        self.dtype_code = _DTYPES[packed.dtype]
        self._pointer = None
        self.nbytes = out_features * in_features * packed.element_size()

    def pointer(self) -> int:
        """The packed memory's address, read at the first call (a dispatcher call, ≈ 1 µs, 101 of them per decode
        step of the bench model) and kept: this reader holds the packed tensor itself, whose memory never moves, and
        packed tensors cannot be copied (deepcopy refuses opaque tensors), so no copy reads another's memory."""
        if self._pointer is None:
            self._pointer = torch.ops.mkldnn.data_ptr(self.packed)
        return self._pointer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] with up to 8 rows (kernels/common.h ROWS_MAX) -> [..., out]: the weight read once for all rows
        (``fused_products`` with this one part), output rows shared among torch's threads."""
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype)
        status = library().fused_products(1, ctypes.byref(_I(self.layout)), ctypes.byref(_P(self.pointer())),
                                          ctypes.byref(_L(self.out_features)), self.in_features, self.dtype_code,
                                          x.numel() // self.in_features, x.data_ptr(), y.data_ptr(),
                                          torch.get_num_threads())
        if status:
            raise MemoryError("packed products: could not allocate their scratch memory")
        return y


def for_packed(packed: torch.Tensor, out_features: int, in_features: int) -> PackedGemv | None:
    """A ``PackedGemv`` for this packed weight, or None (no kernels, unknown or unconfirmed layout). Whether a call
    of several rows uses it also depends on the weight's size and the thread count then (``gemv_takes``)."""
    if packed.dtype not in _DTYPES or library() is None:
        return None
    if not (hasattr(torch.ops.mkldnn, "data_ptr") and hasattr(torch.ops.mkldnn, "_nbytes")):
        return None  # a torch without the accessors of packed memory
    layout = _guess_layout(packed, out_features, in_features)
    if layout is None:
        return None
    gemv = PackedGemv(packed, out_features, in_features, layout)
    key = (packed.dtype, out_features, in_features, layout)
    if key not in _layout_checked:  # once per dtype and shape: the layout is oneDNN's choice for those
        with torch.inference_mode():
            x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(0)).to(packed.dtype)
            want = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "").float()
            got = gemv(x).float()
        tolerance = 1e-4 if packed.dtype == torch.float32 else 2e-2  # bf16: an output rounding apart at most
        _layout_checked[key] = bool(torch.allclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max()))
    return gemv if _layout_checked[key] else None


SCAN_MAX_K = 256  # kernels.c keeps a [K, 64] slice of the state on the stack


def kda_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor,
             state: torch.Tensor) -> torch.Tensor:
    """The KDA recurrence over T tokens (see ``kernels.c``), all fp32 contiguous: q, k, decay = exp(g)
    [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state [B, H, K, V] (initial state in, final state out, in place).
    Runs on torch's intra-op thread count. Returns o [B, T, H, V] fp32."""
    B, T, H, K = k.shape
    out = torch.empty(B, T, H, v.shape[-1])
    if library().kda_scan(B, T, H, K, v.shape[-1], q.data_ptr(), k.data_ptr(), v.data_ptr(), decay.data_ptr(),
                          beta.data_ptr(), state.data_ptr(), out.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"kda_scan: key dim {K} is above the kernel's limit of {SCAN_MAX_K}")
    return out


def kda_prefill_inputs(proj: torch.Tensor, history: torch.Tensor | None, f_b: torch.Tensor, taps: torch.Tensor,
                       neg_A: torch.Tensor, dt_bias: torch.Tensor, l2_eps: float) -> tuple[torch.Tensor, ...]:
    """A KDA layer's prefill inputs to the scan (see ``kernels.c``). proj [B, T, 3D + 2K + H] (the fused input
    product, model dtype), history [B, W − 1, 3D] (the conv cache, model dtype, updated in place) or None (zeros),
    f_b [B, T, D] = f_b_proj(f_a) (model dtype), taps [W, 3D], neg_A [H, 1], dt_bias [H, K] fp32.
    Returns q, k, v, decay [B, T, H, K] and beta [B, T, H], fp32."""
    B, T, P = proj.shape
    H, K = dt_bias.shape
    q, k, v, decay = (torch.empty(B, T, H, K) for _ in range(4))
    beta = torch.empty(B, T, H)
    if library().kda_prefill_inputs(
            B, T, H, K, taps.shape[0], P, _DTYPES[proj.dtype], proj.data_ptr(),
            None if history is None else history.data_ptr(), f_b.data_ptr(), taps.data_ptr(), neg_A.data_ptr(),
            dt_bias.data_ptr(), l2_eps, q.data_ptr(), k.data_ptr(), v.data_ptr(), decay.data_ptr(), beta.data_ptr(),
            torch.get_num_threads()):
        raise MemoryError("kda_prefill_inputs: could not allocate its scratch memory")
    return q, k, v, decay, beta


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """KDA's gated output norm (``layers.GatedRMSNorm``): o [..., H, K] fp32, z [..., H·K] (model dtype), weight [K]
    fp32, all contiguous -> (o / rms(o)) · weight · sigmoid(z), [..., H·K] in z's dtype."""
    H, K = o.shape[-2:]
    rows = o.numel() // (H * K)
    out = torch.empty(*z.shape, dtype=z.dtype)
    if library().gated_rms_norm(rows, H, K, _DTYPES[z.dtype], o.data_ptr(), z.data_ptr(), weight.data_ptr(), eps,
                                out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("gated_rms_norm: could not allocate its scratch memory")
    return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for contiguous gate | up rows [..., 2I] -> [..., I], rounded as PyTorch does."""
    I = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype)
    library().swiglu(gate_up.numel() // (2 * I), I, _DTYPES[out.dtype], gate_up.data_ptr(), out.data_ptr(),
                     torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dim: x [..., D] (model dtype), weight [D] fp32 -> x's shape
    and dtype; fp32 math, one rounding."""
    out = torch.empty_like(x)
    library().rms_norm(x.numel() // x.shape[-1], x.shape[-1], _DTYPES[x.dtype], x.data_ptr(), weight.data_ptr(), eps,
                       out.data_ptr(), torch.get_num_threads())
    return out


