"""The CPU backend: fast paths applied to a built plain model from outside, as quantization is (a module swap).

    model = kimi_lm.checkpoint.load(path, dtype)   # plain PyTorch modules (kimi_lm.model): the oracle
    kimi_lm.cpu.prepare(model)                     # the same model, its hot modules swapped for CPU fast paths

``kimi_lm.load`` calls ``prepare`` on CPU unless asked for the plain model (``backend=None``). What it swaps:

    nn.Linear                 -> onednn.OneDNNLinear            weight packed once for oneDNN (+ a C one-row reader)
    StackedExperts            -> moe.OneDNNStackedExperts       each expert packed; few-row experts in one C call
    KimiDeltaAttention        -> kda.CpuKimiDeltaAttention      fused input product; decode/prefill math in C
    MultiheadLatentAttention  -> mla.CpuMultiheadLatentAttention fused input product; absorbed halves kept
    SparseMoE                 -> moe.CpuSparseMoE               routing, grouping, combining in C
    MLP                       -> layers.CpuMLP                  gate|up as one product, SwiGLU in C
    RMSNorm                   -> layers.CpuRMSNorm              one C pass
    DecoderLayer (KDA)        -> layer.CpuDecoderLayer          a one-sequence decode step: the whole layer in one call
    PackedLinear              -> quant.CpuPackedLinear         MLX-quantized (affine 2-8 bit, MXFP4, MXFP8, NVFP4):
    PackedRouter              -> quant.CpuPackedRouter          few-row products read the packed bytes in C
    PackedEmbedding           -> quant.CpuPackedEmbedding       looked-up rows dequantized in C
    PackedStackedExperts      -> quant.CpuPackedStackedExperts  a decode step's experts in one C call
    FP8BlockLinear            -> fp8.CpuFP8BlockLinear          FP8 128x128 blocks (Kimi K2 / DeepSeek-V3):
    FP8StackedExperts         -> fp8.CpuFP8StackedExperts       e4m3 bytes read in C (an fp8 kv_b_proj: CpuPackedMLA)
    MLP of FP8 blocks         -> fp8.CpuFP8MLP                  a decode step's gate, up, SwiGLU, down: one call
    MLA (quantized kv_b_proj) -> quant.CpuPackedMLA             absorbed halves kept dense, not rebuilt per step
    quantized KDA / MLA / MLP input products                    one C call reading every part in place
                                                                (products.FusedProducts; KDA's gates read in C too)
    affine 4-bit packed       -> PyTorch's CPU int4 kernel layout (same bytes; kimi_lm.quant.packed) only if
                                 ``INT4_KERNEL`` is set (off: quant.c reads MLX's packing faster)
    symmetric affine biases   -> not kept (−2^(bits−1)·scales: compressed-tensors INT4), derived in the kernels

plus glibc malloc thresholds raised so activations reuse freed pages (``malloc.py``), and the weights moved onto
transparent huge pages in place (``pages.py``: fewer TLB misses in the decode stream). Each swapped module computes
what the plain one does (tests compare them, the plain one being the oracle); each swap happens only where it
applies (oneDNN for the dtype, the C kernels built, plain float weights or an MLX packing the kernels read), so an
unusual model keeps its plain modules. A quantized model's layers take the same paths as a bf16 model's (KDA's C
decode step and scan, MLA's fused projection, the MLP's fused gate|up): their products read the packed bytes. The
prepared model is for inference at its dtype on the CPU: packed weights refuse ``.to()``.

Environment: ``KIMI_LM_NATIVE=0`` turns the C kernels off, ``KIMI_LM_MALLOC=default`` keeps glibc's defaults,
``KIMI_LM_CACHE`` moves the compiled kernels' directory, ``KIMI_LM_HUGE_PAGES=0`` keeps the weights on the pages they
were given. Only this package reads them; model code reads none.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.cpu import fp8, malloc, native, onednn, pages, quant
from kimi_lm.cpu.kda import CpuKimiDeltaAttention
from kimi_lm.cpu.kda import applies as kda_applies
from kimi_lm.cpu.layer import CpuDecoderLayer
from kimi_lm.cpu.layers import CpuMLP, CpuRMSNorm
from kimi_lm.cpu.mla import CpuMultiheadLatentAttention
from kimi_lm.cpu.products import fusable
from kimi_lm.cpu.moe import CpuSparseMoE, OneDNNStackedExperts
from kimi_lm.model.kda import KimiDeltaAttention
from kimi_lm.model.kimi_linear import DecoderLayer
from kimi_lm.model.layers import MLP, RMSNorm
from kimi_lm.model.mla import MultiheadLatentAttention
from kimi_lm.model.moe import SparseMoE
from kimi_lm.quant.fp8_block import FP8BlockLinear
from kimi_lm.quant.packed import PackedLinear, SplitKVB, use_int4_kernels


# affine 4-bit on PyTorch's int4 kernel (a scales_zeros table beside scales and biases) instead of kernels/quant.c: off.
# quant.c is the faster (one-row products, min of 300, 2 threads: 1024x2304 g64 52 vs 71 us, g32 57 vs 73 us; its
# prefill dequantizes a tile and runs BLAS) and keeps the checkpoint's bytes (INT4 experts: 1.09x the files, not 1.49x)
INT4_KERNEL = False


def _layer_swap(module: nn.Module, kernels: bool, dtype: torch.dtype) -> nn.Module | None:
    """The backend module for a plain layer module, or None to keep it."""
    kind = type(module)
    if kind is KimiDeltaAttention:
        return CpuKimiDeltaAttention(module) if kda_applies(module) else None
    if kind is MultiheadLatentAttention:
        quantized = kernels and isinstance(module.kv_b_proj, (PackedLinear, SplitKVB, FP8BlockLinear))
        return quant.CpuPackedMLA(module, dtype) if quantized else CpuMultiheadLatentAttention(module)
    if kind is MLP and kernels and fp8.fp8_mlp(module):  # FP8 blocks: gate, up, SwiGLU, down in one C call
        return fp8.CpuFP8MLP(module)
    if kind is MLP:
        parts = (module.gate_proj, module.up_proj)
        packed = all(type(p) is onednn.OneDNNLinear for p in parts) and parts[0].packed.dtype == parts[1].packed.dtype
        return CpuMLP(module) if packed or (kernels and fusable(list(parts))) else None
    if not kernels:
        return None
    if kind is SparseMoE:
        return CpuSparseMoE(module)
    if kind is RMSNorm:
        return CpuRMSNorm(module)
    if kind is DecoderLayer and module.is_kda:  # its decode step in one call once its parts have C readers
        return CpuDecoderLayer(module)
    return None


def prepare(model: nn.Module) -> nn.Module:
    """Swap ``model``'s modules for the CPU backend's (see the module docstring), in place; returns the model.
    Expects an inference model (``eval()``, no grads) on the CPU, as ``kimi_lm.checkpoint.load`` returns it."""
    from kimi_lm.prompt_cache import model_fingerprint

    model_fingerprint(model)  # kept for its prompt caches: once prepared, state_dict() densifies every packed weight
    if INT4_KERNEL:
        use_int4_kernels(model)  # affine 4-bit modules on PyTorch's CPU int4 kernel (same bytes)
    malloc.keep_freed_memory()  # activations reuse freed pages instead of faulting fresh ones in each forward
    if onednn.available(model.dtype, "cpu"):
        onednn.pack_linears(model, OneDNNStackedExperts)
    kernels = native.library() is not None
    if kernels:  # packed modules first: the layer swaps look at what their parts became
        for name in [name for name, m in model.named_modules() if quant.swap(m, check_only=True)]:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quant.swap(model.get_submodule(name)))
        for name in [name for name, m in model.named_modules() if fp8.swap(m, check_only=True)]:  # FP8 blocks
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, fp8.swap(model.get_submodule(name)))
    trim = malloc.ReleaseEvery(16 << 20)
    for name in [name for name, _ in model.named_modules()]:  # names: each replaced module is freed as it goes
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a part an earlier swap fused away (q_proj into in_proj); adopted parts keep their names
        new = _layer_swap(module, kernels, model.dtype)
        if new is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        trim.freed(onednn.module_nbytes(module))  # the separately packed parts fusing replaced
    malloc.release_free_memory()  # what the replaced plain weights occupied: not 2x at rest
    pages.to_huge_pages(model)  # the weights a decode step streams, on 2 MiB pages (Linux, THP on request)
    return model
