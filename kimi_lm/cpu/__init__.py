"""The CPU backend: applied to a built plain model from outside, as quantization is (a module swap).

    model = kimi_lm.checkpoint.load(path, dtype)   # plain PyTorch modules (kimi_lm.model), the oracle
    kimi_lm.cpu.prepare(model)                     # the same model, its hot modules swapped for CPU fast paths

``kimi_lm.load`` calls ``prepare`` on CPU unless asked for the plain model (``backend=None``).
"""

from __future__ import annotations

import torch
from torch import nn


def prepare(model: nn.Module) -> nn.Module:
    """Set up a loaded inference model (eval, no grads) for fast CPU execution, in place; returns it."""
    from kimi_lm.ops import malloc, onednn
    from kimi_lm.quant.packed import use_int4_kernels

    use_int4_kernels(model)  # affine 4-bit modules on PyTorch's CPU int4 kernel (same bytes)
    malloc.keep_freed_memory()  # activations reuse freed pages instead of faulting fresh ones in each forward
    if onednn.available(model.dtype, "cpu"):
        onednn.use_onednn_linears(model)
    malloc.release_free_memory()  # what the replaced plain weights occupied: not 2x at rest
    return model
