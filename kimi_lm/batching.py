"""One decode step for many independent sequences: B batch-1 caches of different lengths -> one [B, 1] forward; and a
packed prefill of several sequences' chunks in one forward (:func:`prefill_packed`).

Continuous batching (the server's scheduler) keeps one :class:`~kimi_lm.cache.ModelCache` per request, so requests
can join and leave between steps and keep their own prefix-cache state. To decode them together, a step builds a
temporary batched cache:

* KDA layers: the conv tails [1, W−1, 3D] and recurrent states [1, H, K, V] are concatenated along the batch; after
  the forward the updated rows are copied back into each request's cache. The CPU backend reads each row's where it
  lies instead (``BatchedKDACache.rows``): nothing concatenated or copied back.
* MLA layers: each request's cache still appends its own new latent (so its buffer, sliding window and length stay
  exact) and hands back its own history; the layer attends row by row over these ragged histories (projections,
  KDA and MoE run batched). Padding them into one [B, S_max, 576] tensor would copy every history at every step,
  which costs more than the per-row attention. Each row equals the sequence decoded alone (up to float rounding of
  the batched matmuls).

Positions are explicit (``ModelCache.positions``): the batched cache gives each row its own, so rotary MLA (K2)
batches exactly like NoPE MLA (Kimi Linear).

Reference: vLLM / SGLang continuous batching (iteration-level scheduling, Orca, OSDI '22); mlx-lm ``BatchKVCache``
(left-padded batch caches with per-row offsets).
"""

from __future__ import annotations

import itertools

import torch

from kimi_lm.cache import KDACache, ModelCache, PackedLayerCache


class BatchedKDACache:
    """The rows' KDA states stacked along the batch on first use (copies: written back by :meth:`scatter`). A layer
    that reads each row's state where it lies (``rows``: the CPU backend's decode step) never stacks them."""

    def __init__(self, rows: list[KDACache]):
        self.rows = rows
        self._stacked = None

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stacked is None:
            self._stacked = (torch.cat([r.conv_state for r in self.rows]),  # [B, W − 1, 3D]
                             torch.cat([r.state for r in self.rows]))  # [B, H, K, V] fp32
        return self._stacked

    @property
    def conv_state(self) -> torch.Tensor:
        return self._stack()[0]

    @property
    def state(self) -> torch.Tensor:
        return self._stack()[1]

    def scatter(self) -> None:
        if self._stacked is None:
            return
        for b, r in enumerate(self.rows):
            r.conv_state.copy_(self.conv_state[b : b + 1])
            r.state.copy_(self.state[b : b + 1])


class BatchedMLACache:
    """Appends each row's latent to its own cache and returns the rows' histories as a list (ragged, no copies)."""

    def __init__(self, rows: list):
        self.rows = rows
        self.length = max(r.length for r in rows)

    def append(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """latent [B, 1, W] -> every row's history, [S_b, W] each (views into the rows' own buffers)."""
        return [r.append(latent[b : b + 1])[0] for b, r in enumerate(self.rows)]


class BatchedModelCache(ModelCache):
    """A :class:`ModelCache` over B batch-1 caches; ``rows`` are the per-sequence caches it stands for."""

    def __init__(self, rows: list[ModelCache]):
        layers = [BatchedKDACache([r[i] for r in rows]) if isinstance(rows[0][i], KDACache)
                  else BatchedMLACache([r[i] for r in rows]) for i in range(len(rows[0]))]
        super().__init__(layers, len(rows))
        self.rows = rows

    def positions(self, T: int, device=None) -> torch.Tensor:
        """Each row's own next positions, [B, T]."""
        offsets = torch.tensor([r.offset for r in self.rows], device=device)
        return offsets[:, None] + torch.arange(T, device=device)[None]

    def scatter(self) -> None:
        """Write the stepped state back into every row's own cache."""
        for layer in self.layers:
            if isinstance(layer, BatchedKDACache):
                layer.scatter()
        for r in self.rows:
            r.offset += 1


@torch.no_grad()
def decode_step(model, caches: list[ModelCache], tokens: list[int]) -> torch.Tensor:
    """Feed ``tokens[b]`` to sequence ``caches[b]`` for every b in one forward; returns logits [B, V] fp32.

    Each cache advances exactly as ``model(tensor([[tokens[b]]]), cache=caches[b])`` would advance it.
    """
    device = model.device
    ids = torch.tensor(tokens, device=device).view(-1, 1)
    if len(caches) == 1:
        return torch.cat([model(ids[b : b + 1], cache=c)[:, -1] for b, c in enumerate(caches)]).float()
    batched = BatchedModelCache(caches)
    logits = model(ids, cache=batched)[:, -1].float()
    batched.scatter()
    return logits


class PackedModelCache(ModelCache):
    """A :class:`ModelCache` over B batch-1 caches whose next tokens lie side by side in one row (a packed prefill):
    each layer a :class:`~kimi_lm.cache.PackedLayerCache`."""

    def __init__(self, rows: list[ModelCache], lengths: list[int]):
        ends = list(itertools.accumulate(lengths))
        self.bounds = [(end - n, end) for end, n in zip(ends, lengths)]  # each sequence's [start, end) of the row
        super().__init__([PackedLayerCache([r[i] for r in rows], self.bounds) for i in range(len(rows[0]))], 1)


@torch.no_grad()
def prefill_packed(model, caches: list[ModelCache], chunks: list[list[int]]) -> torch.Tensor:
    """Feed ``chunks[b]`` to sequence ``caches[b]`` for every b in one forward; returns the logits of each chunk's last
    token, [B, V] fp32.

    The chunks lie side by side in one row of Σ len tokens: the per-token parts of every layer (products, MoE, norms)
    run once over all of them, reading each weight once rather than once per prompt, while each sequence mixer (KDA,
    MLA) runs every sequence's conv, recurrence and attention with that sequence's own cache
    (``cache.PackedLayerCache``), so nothing attends across sequences. Each cache advances as
    ``generate.forward_chunk(model, caches[b], chunks[b])`` would (up to the rounding of products over more rows; one
    chunk alone goes through the model's own forward). Several short prompts that arrive together (a burst of chat requests) are
    prefilled in about the time of their total length rather than once per prompt: 8 prompts of 22 tokens on the
    bench model (fp32, CPU backend, 2 threads) 80 ms one by one, 35 ms in one forward (one prompt of 176 tokens: 37).
    The CPU backend's KDA and every MLA run their products over all tokens at once too; the plain KDA layer runs
    each sequence's tokens as a forward of their own (``cache.per_sequence``).
    """
    device = model.device
    lengths = [len(c) for c in chunks]
    if min(lengths, default=0) < 1:
        raise ValueError("prefill_packed: every chunk needs at least one token")
    ids = torch.tensor([[t for chunk in chunks for t in chunk]], device=device)
    if len(chunks) == 1:
        return model(ids, cache=caches[0], logits_to_keep=1)[:, -1].float()
    positions = torch.cat([c.positions(n, device) for c, n in zip(caches, lengths)], dim=1)  # [1, Σ len]
    packed = PackedModelCache(caches, lengths)
    h = model.decoder_stack(model.model.embed_tokens(ids), packed, positions)
    last = torch.tensor([end - 1 for _, end in packed.bounds], device=device)
    logits = model.lm_head(model.model.norm(h[:, last]))[0].float()  # [B, V]
    for cache, n in zip(caches, lengths):
        cache.offset += n
    return logits
