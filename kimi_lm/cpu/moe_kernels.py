"""ctypes bindings of the mixture-of-experts kernels (``kernels/moe.c``), part of the one library ``native.py`` builds;
used by the backend's MoE block (``cpu/moe.py``) and quantized experts (``cpu/quant.py``).

One token (a decode step): the router (``moe_route``), SwiGLU of a few gate | up rows, the weighted sum with the
shared expert, and ``moe_decode``: the whole block of a decode step's few tokens in one call, reading every expert
where it lies (oneDNN-packed, MLX-quantized or FP8 blocks, ``MoEDecodePlan``) once for its tokens. Many tokens:
selection from router logits, grouping by expert (a counting sort), the combine back to tokens, and experts on a few
rows each read in place.

Reference: ``ctypes``; DeepSeek-V3 ``inference/model.py`` (Gate, MoE); the PyTorch path in ``kimi_lm/model/moe.py``
(tests compare).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

import torch

from kimi_lm.cpu import native
from kimi_lm.cpu.native import _DTYPES, _F, _I, _L, _P


@functools.cache
def moe_library() -> ctypes.CDLL:
    """``native.library()`` with the MoE kernels bound (callers check ``native.supports`` first)."""
    lib = native.library()
    lib.moe_route.argtypes = [_L, _L, _L, _L, _L, _I, _F, _I, _P, _P, _P, _P, _P]
    lib.moe_route.restype = _I
    lib.swiglu_rows.argtypes = [_L, _L, _I, _P, _P]
    lib.swiglu_rows.restype = None
    lib.weighted_sum_rows.argtypes = [_L, _L, _I, _P, _P, _P, _P]
    lib.weighted_sum_rows.restype = None
    lib.moe_combine.argtypes = [_L, _L, _L, _I, _P, _P, _P, _P, _I]
    lib.moe_combine.restype = None
    lib.moe_route_logits.argtypes = [_L, _L, _L, _L, _L, _I, _F, _P, _P, _P, _P, _I]
    lib.moe_route_logits.restype = _I
    lib.moe_dispatch.argtypes = [_L, _L, _L, _L, _I, _P, _P, _P, _P, _P, _P, _I]
    lib.moe_dispatch.restype = _I
    lib.moe_experts_rows.argtypes = [_L, _L, _L, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I]
    lib.moe_experts_rows.restype = _I
    lib.moe_decode_rows.argtypes = [_L, _L, _L, _L, _L, _L, _L, _I, _F, _I, _P, _I, _P, _P, _P, _P, _P, _P, _L, _I,
                                    _P, _I, _P, _P, _P, _P, _I]
    lib.moe_decode_rows.restype = _I
    return lib


def _check_bias(bias: torch.Tensor, experts: int) -> None:
    """The kernels read the balancing bias as E contiguous fp32 values (a bf16 one would be read past its end)."""
    if bias.dtype != torch.float32 or bias.numel() != experts or not bias.is_contiguous():
        raise ValueError(f"e_score_correction_bias: expected {experts} contiguous fp32 values, "
                         f"found {tuple(bias.shape)} {bias.dtype}")


def moe_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
              renormalize: bool, scaling: float) -> tuple[list[int], torch.Tensor]:
    """The router of one token (``moe.TopkRouter.forward``): x [1, hidden] model dtype, weight [E, hidden] and bias [E]
    fp32 -> (the k chosen experts, their weights [1, k] fp32)."""
    E, hidden = weight.shape
    _check_bias(bias, E)
    idx = (ctypes.c_int64 * top_k)()
    weights = torch.empty(1, top_k)
    status = moe_library().moe_route(E, hidden, top_k, n_group, topk_group, int(renormalize), scaling, _DTYPES[x.dtype],
                                 x.data_ptr(), weight.data_ptr(), bias.data_ptr(), idx, weights.data_ptr())
    if status:
        raise MemoryError("moe_route: could not allocate its scratch memory")
    return list(idx), weights



def _row_pointers(rows: list[torch.Tensor]) -> ctypes.Array:
    return (_P * len(rows))(*(r.data_ptr() for r in rows))


def swiglu_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """n contiguous [1, 2I] gate | up rows (model dtype) -> silu(gate) · up [n, I], rounded as PyTorch does."""
    I = rows[0].shape[-1] // 2
    out = torch.empty(len(rows), I, dtype=rows[0].dtype)
    moe_library().swiglu_rows(len(rows), I, _DTYPES[out.dtype], _row_pointers(rows), out.data_ptr())
    return out


def weighted_sum_rows(rows: list[torch.Tensor], weights: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """Σ weights[r] · rows[r] (rows [1, hidden] model dtype, weights [1, n] fp32; fp32 sum, one rounding), plus
    ``shared`` [1, hidden] when given -> [1, hidden]."""
    out = torch.empty_like(rows[0])
    moe_library().weighted_sum_rows(len(rows), out.shape[-1], _DTYPES[out.dtype], _row_pointers(rows),
                                weights.data_ptr(), None if shared is None else shared.data_ptr(), out.data_ptr())
    return out



def moe_combine(outputs: list[torch.Tensor], counts: list[int], expert_of_slot: torch.Tensor, slot_row: torch.Tensor,
                weights: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """Routed experts' outputs back to their tokens (``moe.StackedExperts.forward``), read where the experts wrote
    them: ``outputs`` [n_e, hidden] per active expert (model dtype, contiguous; ``counts`` [E] rows per expert, in
    expert order), expert_of_slot / slot_row [N·k] int64 (token t's j-th expert at t·k + j, and that pair's row in
    the expert-sorted order), weights [N, k] fp32, shared [N, hidden] or None
    -> Σ_j weights[t, j] · (row of slot t·k + j) (+ shared[t]), [N, hidden]."""
    N, k = weights.shape
    hidden, dtype = outputs[0].shape[-1], outputs[0].dtype
    active = iter(outputs)
    # address of expert e's first row, as if it sat at row starts[e] of one sorted block: address of a slot's row
    # = base[e] + (sorted row − starts[e]) · row bytes
    starts = torch.tensor([0] + counts[:-1]).cumsum(0)
    bases = torch.tensor([next(active).data_ptr() if n else 0 for n in counts])
    row_bytes = hidden * outputs[0].element_size()
    addresses = bases[expert_of_slot] + (slot_row - starts[expert_of_slot]) * row_bytes  # [N·k] int64
    out = torch.empty(N, hidden, dtype=dtype)
    moe_library().moe_combine(N, k, hidden, _DTYPES[dtype], addresses.data_ptr(), weights.data_ptr(),
                          None if shared is None else shared.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out



def moe_route_logits(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                     renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe.TopkRouter.forward`` after its product: logits [N, E] fp32, bias [E] fp32
    -> (weights [N, k] fp32, expert indices [N, k] int64)."""
    N, E = logits.shape
    _check_bias(bias, E)
    idx = torch.empty(N, top_k, dtype=torch.int64)
    weights = torch.empty(N, top_k)
    if moe_library().moe_route_logits(N, E, top_k, n_group, topk_group, int(renormalize), scaling, logits.data_ptr(),
                                  bias.data_ptr(), idx.data_ptr(), weights.data_ptr(), torch.get_num_threads()):
        raise MemoryError("moe_route_logits: could not allocate its scratch memory")
    return weights, idx


def moe_dispatch(x: torch.Tensor, idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Tokens grouped by expert (``moe.StackedExperts.forward``): x [N, hidden], idx [N, k] int64 -> (xs [N·k, hidden]:
    each (token, slot) pair's input row, grouped by expert, slot order kept within an expert; counts: rows per
    expert; slot_row [N·k]: where pair t·k + j went)."""
    N, k = idx.shape
    xs = torch.empty(N * k, x.shape[-1], dtype=x.dtype)
    counts = torch.empty(num_experts, dtype=torch.int64)
    slot_row, order = torch.empty(N * k, dtype=torch.int64), torch.empty(N * k, dtype=torch.int64)
    status = moe_library().moe_dispatch(N, k, num_experts, x.shape[-1], _DTYPES[x.dtype], idx.data_ptr(), x.data_ptr(),
                                    counts.data_ptr(), slot_row.data_ptr(), order.data_ptr(), xs.data_ptr(),
                                    torch.get_num_threads())
    if status == 1:
        raise ValueError(f"moe_dispatch: an expert index outside [0, {num_experts})")
    if status:
        raise MemoryError("moe_dispatch: could not allocate its scratch memory")
    return xs, counts.tolist(), slot_row


def moe_experts_rows(xs: torch.Tensor, counts: list[int], experts: list[int], gate_up: list[native.PackedGemv],
                     down: list[native.PackedGemv]) -> torch.Tensor:
    """The SwiGLU of each expert in ``experts`` on its rows of xs [rows, hidden] (grouped by expert, ``counts`` rows
    per expert), products read from the experts' packed weights (``gate_up`` [2I, hidden] and ``down`` [hidden, I]
    readers, indexed by expert) -> out [rows, hidden], those experts' rows filled."""
    n = len(experts)
    firsts = [0] * len(counts)
    for e in range(1, len(counts)):
        firsts[e] = firsts[e - 1] + counts[e - 1]
    starts, sizes = (ctypes.c_int64 * n)(*(firsts[e] for e in experts)), (ctypes.c_int64 * n)(*(counts[e] for e in experts))
    out = torch.empty_like(xs)
    status = moe_library().moe_experts_rows(
        n, xs.shape[-1], down[experts[0]].in_features, _DTYPES[xs.dtype], starts, sizes,
        (_I * n)(*(gate_up[e].layout for e in experts)), (_P * n)(*(gate_up[e].pointer() for e in experts)),
        (_I * n)(*(down[e].layout for e in experts)), (_P * n)(*(down[e].pointer() for e in experts)),
        xs.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError("moe_experts_rows: could not allocate its scratch memory")
    return out


class TensorWatch:
    """The tensors a plan's addresses point into, as (module, attribute) pairs: ``stale()`` once one of them was
    replaced (a new tensor under the name) or moved (its memory changed). Checked in the module's own buffer or
    parameter dict: ``getattr`` on a module goes through ``nn.Module.__getattr__``, and a plan's check of dozens of
    tensors per step cost ~15 % of a quantized bench decode step that way."""

    def __init__(self, pairs):
        self.entries = []
        for m, name in pairs:
            held = m._buffers if name in m._buffers else m._parameters if name in m._parameters else m.__dict__
            t = held[name]
            self.entries.append((held, name, t, t.data_ptr()))

    def stale(self) -> bool:
        for held, name, t, address in self.entries:
            if held.get(name) is not t or t.data_ptr() != address:
                return True
        return False


@dataclasses.dataclass
class DecodeParts:
    """Experts (routed, or the shared one) as ``moe_decode`` reads them: per expert its gate | up and down
    ``(layout, address)`` (``kernels/moe.c``: oneDNN layouts 0 / 1 and the packed memory, or ``LAYOUT_QUANT`` and the
    address of two qweight pointers, gate's and up's, for gate | up and of one qweight for down), the intermediate
    size, ``dtype``: the input dtype oneDNN parts need (None: quantized parts only, which take fp32 and bf16), ``keep``:
    what the addresses point into (ctypes structs, readers), ``sources``: (module, attribute) of the tensors they were
    made from (a tensor replaced there makes the parts stale)."""

    gate_up: list[tuple[int, int]]
    down: list[tuple[int, int]]
    intermediate: int
    dtype: torch.dtype | None
    keep: tuple = ()
    sources: tuple = ()


@dataclasses.dataclass
class DecodeRouter:
    """The router as ``moe_decode`` reads it: ``layout`` 0 (``address`` of an fp32 [E, hidden] weight) or
    ``LAYOUT_QUANT`` (of a qweight), its ``num_experts`` and ``hidden`` size; ``keep`` and ``sources`` as
    ``DecodeParts``'."""

    layout: int
    address: int
    num_experts: int
    hidden: int
    keep: tuple = ()
    sources: tuple = ()


def described_experts(layout: int, struct: type, args: list[tuple], intermediate: int, sources: tuple) -> DecodeParts:
    """Experts whose gate, up and down are each a ctypes descriptor (``kernels/common.h`` qweight, fp8_weight):
    ``args[3e + k]`` builds expert e's gate (k = 0), up (1) and down (2) as ``struct(*args)``. As ``moe_decode``
    reads them: gate | up as the address of a (gate, up) pair of descriptor pointers, down as one descriptor's."""
    E = len(args) // 3
    structs = (struct * (3 * E))(*(struct(*a) for a in args))
    base, size = ctypes.addressof(structs), ctypes.sizeof(struct)
    pairs = (_P * (2 * E))(*(base + (3 * e + k) * size for e in range(E) for k in (0, 1)))
    step = 2 * ctypes.sizeof(_P)
    return DecodeParts([(layout, ctypes.addressof(pairs) + e * step) for e in range(E)],
                       [(layout, base + (3 * e + 2) * size) for e in range(E)], intermediate, None,
                       keep=(structs, pairs), sources=sources)


class MoEDecodePlan:
    """What ``moe_decode`` reads of an MoE block besides the token, as ctypes arrays made once: the router, the routed
    experts' ``DecodeParts`` and the shared expert's (or None)."""

    def __init__(self, router: DecodeRouter, routed: DecodeParts, shared: DecodeParts | None):
        E = len(routed.gate_up)
        self.router, self.intermediate, self.parts = router, routed.intermediate, (router, routed, shared)
        self.dtype = shared.dtype if shared is not None and shared.dtype is not None else routed.dtype
        self.gate_up_layouts = (_I * E)(*(l for l, _ in routed.gate_up))
        self.gate_up = (_P * E)(*(a for _, a in routed.gate_up))
        self.down_layouts, self.down = (_I * E)(*(l for l, _ in routed.down)), (_P * E)(*(a for _, a in routed.down))
        self.shared = (0, 0, None, 0, None) if shared is None else (shared.intermediate, *shared.gate_up[0],
                                                                     *shared.down[0])
        self.watch = TensorWatch([pair for p in self.parts if p is not None for pair in p.sources])

    def stale(self) -> bool:
        """Whether a tensor the plan reads was replaced since (a module's weights loaded anew)."""
        return self.watch.stale()

    def takes(self, x: torch.Tensor, max_rows: int = 1) -> bool:
        """Whether ``moe_decode`` runs this plan on x [N, hidden], N <= ``max_rows`` (the caller's rule for how many
        tokens the C products take: ``CpuSparseMoE.rows_in_one_call``)."""
        return 0 < x.shape[0] <= max_rows and self.dtype in (None, x.dtype) and native.supports(x)


def moe_decode(x: torch.Tensor, plan: MoEDecodePlan, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
               renormalize: bool, scaling: float) -> torch.Tensor:
    """A whole MoE block for the N <= 8 tokens of a decode step in one call (``kernels/moe.c`` moe_decode_rows):
    x [N, hidden] model dtype, bias [E] fp32 -> [N, hidden]: what the router (``moe_route``), the experts, the shared
    expert and ``weighted_sum_rows`` compute in turn, each expert's weights read once for the tokens routed to it."""
    r = plan.router
    _check_bias(bias, r.num_experts)
    N = x.shape[0]
    out = torch.empty_like(x)
    idx, weights = (ctypes.c_int64 * (N * top_k))(), (ctypes.c_float * (N * top_k))()
    if moe_library().moe_decode_rows(N, r.num_experts, r.hidden, plan.intermediate, top_k, n_group, topk_group,
                                     int(renormalize), scaling, _DTYPES[x.dtype], x.data_ptr(), r.layout, r.address,
                                     bias.data_ptr(), plan.gate_up_layouts, plan.gate_up, plan.down_layouts,
                                     plan.down, *plan.shared, idx, weights, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("moe_decode_rows: could not allocate its scratch memory")
    return out
