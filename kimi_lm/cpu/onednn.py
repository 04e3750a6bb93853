"""Linear layers on oneDNN with weights pre-packed once at load: the CPU inference path for fp32 and bf16 weights.

``F.linear`` on CPU sends fp32 to MKL, whose one-row product (sgemv, every decode step) runs on one core at about a
third of the machine's memory bandwidth. oneDNN's inner product with a weight reordered once into its blocked layout
(``mkldnn._reorder_linear_weight``, the layout TorchInductor's CPU freezing pass uses) streams the weight on every
core: measured on a 2-core AVX-512 machine, a one-token product reads weights at ≈ 18–20 GB/s fp32 and ≈ 30 GB/s
bf16 instead of ≈ 8–10, and 1024-token GEMMs are 10–20 % faster. The result is the same product in the same dtype
(fp32 sums are merely reassociated: ≤ 1e-6 relative).

Each oneDNN call also costs ≈ 13 µs of set-up, so modules whose products read the same input (KDA's six input
projections, MLA's two, an MLP's gate and up) merge them into one packed matrix (``OneDNNFusedLinear``, made by the
CPU backend's layer modules in ``kimi_lm.cpu``). A packed module keeps only the packed weight (no second copy).
``state_dict`` still yields the plain ``weight`` (so a loaded model can be saved), and ``dense_weight`` gives it
back for code that needs the matrix itself.

Reference: PyTorch ``aten/src/ATen/native/mkldnn/Linear.cpp`` (``mkldnn_linear_pointwise``,
``mkldnn_reorder_linear_weight``); ``torch/_inductor/fx_passes/mkldnn_fusion.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.model.moe import StackedExperts
from kimi_lm.cpu import malloc, native

_DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype, device) -> bool:
    """True where packing applies: CPU tensors of a dtype oneDNN's packed inner product supports here."""
    if torch.device(device).type != "cpu" or dtype not in _DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] plain weight -> the same matrix in oneDNN's blocked layout (an opaque ``torch._mkldnn`` tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


# bf16 products with fewer than 4 input rows (decode steps) that do not run in C (a weight above the C products'
# size limit) run on an input padded with zero rows to 4 when the weight is large enough for it to pay: oneDNN's
# 4-row bf16 kernel streams the weight faster than its 1-row one (2 and 8 rows do not). Measured on a decode step of benchmarks/bench_kimi_linear.py --config real-layers
# (947 MB of bf16 products per step), 12 alternating rounds: 46.7 -> 44.0 ms (min), 47.9 -> 44.8 ms (median); its
# products replayed alone: 41.2 -> 37.9 ms. Below ~2 MiB of weight the extra ops cost what they save (bench preset:
# unchanged). fp32 keeps 1 row: there the 1-row kernel is the fastest.
_BF16_ROWS = 4
_BF16_PAD_MIN_BYTES = 2 << 20
# rows up to which a product with a C reader runs in C (the weight read once for all of them; kernels/common.h
# ROWS_MAX = 8), per dtype. Bench-model batched steps, fp32: B=4 15.0 -> 11.5 ms, B=8 20 -> 18 ms; bf16 B=4 9.7 -> 8.7
# ms. Beyond 4 bf16 rows oneDNN's bf16 kernel computes faster than the C loop (real-layers bf16 B=8: 53 vs 60 ms).
GEMV_ROWS = {torch.float32: 8, torch.bfloat16: 4}


def packed_linear(x: torch.Tensor, packed: torch.Tensor, gemv: native.PackedGemv | None = None) -> torch.Tensor:
    """x [..., in] (the weight's dtype) @ packedᵀ -> [..., out]. Up to ``GEMV_ROWS`` rows (a decode step, of one
    sequence or a few; per dtype) go to ``gemv``, the C kernel on the same packed memory, where the weight has one
    (``native.for_packed``)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (0 < rows <= GEMV_ROWS.get(x.dtype, 1) and gemv is not None and native.gemv_takes(gemv.nbytes, rows)
            and x.dtype == packed.dtype and not (torch.is_grad_enabled() and x.requires_grad)):
        return gemv(x)
    if 0 < rows < _BF16_ROWS and x.dtype == torch.bfloat16 and packed.numel() * 2 >= _BF16_PAD_MIN_BYTES:
        padded = torch.cat([x.reshape(rows, -1), x.new_zeros(_BF16_ROWS - rows, x.shape[-1])])
        out = torch.ops.mkldnn._linear_pointwise(padded, packed, None, "none", [], "")
        return out[:rows].view(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class OneDNNLinear(nn.Module):
    """Drop-in for a bias-free ``nn.Linear`` at inference, its weight held packed for oneDNN."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", pack(linear.weight), persistent=False)
        self.gemv = native.for_packed(self.packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.gemv)

    @property
    def weight(self) -> torch.Tensor:
        """The plain [out, in] matrix (a copy: writing to it does not change the packed weight)."""
        return self.packed.to_dense()

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.packed.to_dense()
        return w if dtype is None else w.to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()

    def _apply(self, fn, recurse=True):
        return refuse_conversion(self, fn, self.packed.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.packed.dtype}, packed"


class OneDNNFusedLinear(nn.Module):
    """Several bias-free linears that read the same input, packed as one [Σ out, in] matrix: one oneDNN call instead
    of several (each call costs ≈ 15–20 µs of set-up besides streaming its weight, which adds up over the ~140
    products of a decode step). ``forward`` returns the concatenated output [..., Σ out]; ``sizes`` splits it.
    ``state_dict`` writes each part back under its own name, so the checkpoint names are unchanged."""

    def __init__(self, parts: dict[str, nn.Module], name: str):
        super().__init__()
        weights = [module.weight for module in parts.values()]
        self.part_names, self.sizes, self.name = list(parts), [w.shape[0] for w in weights], name
        self.register_buffer("packed", pack(torch.cat(weights)), persistent=False)
        self.gemv = native.for_packed(self.packed, sum(self.sizes), weights[0].shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.gemv)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        owner = prefix.removesuffix(self.name + ".")
        for part, w in zip(self.part_names, self.packed.to_dense().split(self.sizes)):
            destination[owner + part + ".weight"] = w.clone()

    def _apply(self, fn, recurse=True):
        return refuse_conversion(self, fn, self.packed.dtype)

    def extra_repr(self) -> str:
        return f"{' | '.join(self.part_names)}: {self.sizes}, dtype={self.packed.dtype}, packed"


def refuse_conversion(module: nn.Module, fn, dtype: torch.dtype) -> nn.Module:
    """``Module._apply`` for packed modules: a no-op conversion (``.cpu()``, ``.to(same dtype)``) is fine; a real one
    (``.float()``, ``.cuda()``) cannot be done to a packed weight, so it is refused instead of half-applied."""
    probe = fn(torch.zeros(1, dtype=dtype))
    if probe.dtype == dtype and probe.device.type == "cpu":
        return module
    raise RuntimeError(f"weights packed for oneDNN ({dtype}, cpu) cannot be converted to {probe.dtype} on "
                       f"{probe.device}; load the checkpoint again with kimi_lm.load(path, dtype=..., device=...)")


def pack_linears(model: nn.Module, experts_class=None) -> int:
    """Swap every plain bias-free ``nn.Linear`` of ``model`` (not a weight tied to an embedding) for ``OneDNNLinear``,
    and every plain ``StackedExperts`` for ``experts_class(experts)`` if given. Returns how many were swapped."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    swapped = 0
    trim = malloc.ReleaseEvery(16 << 20)
    # names, not modules: a list of the modules would keep every replaced plain weight alive until the end (2x the
    # model in memory at the peak of loading); this way each one is freed as soon as its packed copy exists
    for name in [name for name, _ in model.named_modules()]:
        module = model.get_submodule(name)
        if type(module) is nn.Linear and module.bias is None and id(module.weight) not in tied:
            new: nn.Module = OneDNNLinear(module)
        elif type(module) is StackedExperts and experts_class is not None:
            new = experts_class(module)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        swapped += 1
        nbytes = module_nbytes(module)
        del module  # the last reference to the plain weight: its pages go back every 16 MiB, not at the end
        trim.freed(nbytes)
    return swapped


def module_nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
