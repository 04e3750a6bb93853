"""Inference state, one object per layer, created by ``model.make_cache(batch_size)``.

* ``KDACache``: the short-conv tail (last W−1 pre-activation inputs of q, k, v; model dtype) and the recurrent
  state [B, H, K, V] (always fp32). Constant size whatever the context length.
* ``MLACache``: the compressed latent of every past token, [B, T, kv_lora_rank + qk_rope_head_dim] = 576 values
  per token for the real model, never the expanded per-head keys and values. Storage doubles when full so a decode
  step writes in place instead of re-copying the whole history.

``ModelCache`` holds the layers' states and the absolute position of each sequence's next token (``positions``): rotary
MLA (K2) rotates by it, so a sliding window (which stops a layer's stored length from growing) and a batch of
sequences of different lengths (``kimi_lm.batching``) keep exact positions.

``nbytes`` counts the bytes that hold state (for the MLA cache: the tokens written so far), which is what the
memory estimator predicts.
"""

from __future__ import annotations

import functools

import torch

_GROW_STEP = 256  # smallest MLA buffer allocation, in tokens; it doubles when full


class KDACache:
    def __init__(self, batch_size: int, conv_channels: int, conv_width: int, heads: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        # [B, W − 1, 3D]: the last W − 1 pre-activation inputs of the q | k | v convs
        self.conv_state = torch.zeros(batch_size, conv_width - 1, conv_channels, dtype=dtype, device=device)
        self.state = torch.zeros(batch_size, heads, k_dim, v_dim, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return self.conv_state.nbytes + self.state.nbytes


class MLACache:
    def __init__(self, batch_size: int, width: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.buffer = torch.empty(batch_size, 0, width, dtype=dtype, device=device)
        self.length = 0

    def append(self, latent: torch.Tensor) -> torch.Tensor:
        """Store latent [B, T, W]; return every cached latent so far [B, length, W] (a view, no copy)."""
        B, T, W = latent.shape
        end = self.length + T
        if end > self.buffer.shape[1]:
            # geometric growth: amortised O(1) copying per token instead of re-copying the history every 256
            capacity = max(-(-end // _GROW_STEP) * _GROW_STEP, 2 * self.buffer.shape[1])
            grown = self.buffer.new_zeros(B, capacity, W)  # zeros: ``padded`` may expose rows past the end
            grown[:, : self.length] = self.buffer[:, : self.length]
            self.buffer = grown
        self.buffer[:, self.length : end] = latent
        self.length = end
        return self.buffer[:, :end]

    def padded(self, multiple: int) -> torch.Tensor | None:
        """The history ``append`` just returned, extended to a multiple of ``multiple`` tokens with spare rows of the
        buffer (finite values, to be masked out by the caller), or None if the buffer has no room for that."""
        n = -(-self.length // multiple) * multiple
        return self.buffer[:, :n] if n <= self.buffer.shape[1] else None

    @property
    def nbytes(self) -> int:
        b = self.buffer
        return b.shape[0] * self.length * b.shape[2] * b.element_size()


class ModelCache:
    """Per-layer caches of one batch of sequences, plus how many tokens they have consumed (``offset``, the same for
    every row)."""

    def __init__(self, layers: list, batch_size: int):
        self.layers = layers
        self.batch_size = batch_size
        self.offset = 0

    def positions(self, T: int, device=None) -> torch.Tensor:
        """Absolute positions [B or 1, T] of the next T tokens of each sequence."""
        return torch.arange(self.offset, self.offset + T, device=device)[None]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int):
        return self.layers[i]


class PackedLayerCache:
    """One layer's caches of several sequences whose next tokens lie side by side in one row: a packed prefill
    (``kimi_lm.batching.prefill_packed``), sequence b's tokens at ``bounds[b]`` = [start, end) of [1, Σ lengths].
    A sequence mixer takes it itself (MLA, the CPU backend's KDA: products over all tokens, attention or recurrence per
    sequence) or through :func:`per_sequence` (the plain KDA layer); every other part of a layer is per token."""

    def __init__(self, caches: list, bounds: list[tuple[int, int]]):
        self.caches, self.bounds = caches, bounds


def sequence_pieces(cache, T: int) -> list[tuple]:
    """(cache, start, end) of each sequence in an input of T tokens: the whole input with ``cache`` (a layer's own,
    or None), or each sequence's tokens with its cache for a :class:`PackedLayerCache`."""
    if isinstance(cache, PackedLayerCache):
        return [(c, s0, s1) for c, (s0, s1) in zip(cache.caches, cache.bounds)]
    return [(cache, 0, T)]


def per_sequence(forward):
    """Decorator for a sequence mixer's ``forward(x, cache, *args)`` (KDA, MLA): given a :class:`PackedLayerCache`, it
    runs each sequence's tokens x[:, start:end] through ``forward`` with that sequence's own cache (and its slice of a
    [B or 1, T] positions argument) and returns the outputs side by side; anything else goes straight through. The
    tokens of different sequences never mix: each sees its own history, as if prefilled alone."""

    @functools.wraps(forward)
    def run(self, x: torch.Tensor, cache=None, *args, **kwargs):
        if not isinstance(cache, PackedLayerCache):
            return forward(self, x, cache, *args, **kwargs)
        T = x.shape[1]

        def cut(a, s0, s1):  # a positions tensor [B or 1, T]: this sequence's slice
            return a[:, s0:s1] if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[1] == T else a

        return torch.cat([forward(self, x[:, s0:s1], c, *(cut(a, s0, s1) for a in args),
                                  **{k: cut(v, s0, s1) for k, v in kwargs.items()})
                          for c, s0, s1 in sequence_pieces(cache, T)], dim=1)

    return run


def check_forward_inputs(input_ids: torch.Tensor, cache: ModelCache | None, logits_to_keep: int | None) -> None:
    """The argument checks every model family's forward makes, with errors that name the argument."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens]; got shape {tuple(input_ids.shape)}")
    if cache is not None and input_ids.shape[0] != cache.batch_size:
        raise ValueError(f"input_ids batch {input_ids.shape[0]} does not match the cache's {cache.batch_size}")
    if logits_to_keep is not None and not 1 <= logits_to_keep <= input_ids.shape[1]:
        raise ValueError(f"logits_to_keep must be in 1..{input_ids.shape[1]} (the tokens given); got {logits_to_keep}")


def make_model_cache(model, batch_size: int) -> ModelCache:
    """Fresh caches for a decoder stack (``model.model.layers[i].self_attn.make_cache``), in the compute dtype: the
    final norm's, which is never quantized (a packed lm_head holds uint32)."""
    dtype, device = model.model.norm.weight.dtype, model.model.norm.weight.device
    return ModelCache([layer.self_attn.make_cache(batch_size, dtype, device) for layer in model.model.layers], batch_size)
