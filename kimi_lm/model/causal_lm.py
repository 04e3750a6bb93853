"""What both model families share around their decoder stacks: embedding -> layers -> final norm -> lm_head.

``CausalLM`` holds the public API every caller relies on (``model(input_ids, cache=..., logits_to_keep=...)``,
``make_cache``, ``dtype``, ``device``, ``num_parameters``); ``KimiLinearForCausalLM`` and ``KimiK2ForCausalLM`` give it
their ``model`` (``embed_tokens``, ``layers``, ``norm``) and may replace ``decoder_stack`` (Block AttnRes does).

Reference: transformers' ``*ForCausalLM`` layout (``model.*`` + ``lm_head``), which the checkpoint names follow.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lm.cache import ModelCache, check_forward_inputs, make_model_cache


class CausalLM(nn.Module):
    def __init__(self, config, model: nn.Module):
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                logits_to_keep: int | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. With ``cache``, the T tokens continue the cached sequences.

        ``logits_to_keep=n`` computes logits for the last n positions only ([B, n, vocab]): a prefill needs one row,
        and the full [T, 163840] matrix of the real model is 1.3 GB per 2048-token chunk in fp32.
        """
        check_forward_inputs(input_ids, cache, logits_to_keep)
        T = input_ids.shape[1]
        positions = (torch.arange(T, device=input_ids.device)[None] if cache is None
                     else cache.positions(T, input_ids.device))  # [B or 1, T]
        h = self.decoder_stack(self.model.embed_tokens(input_ids), cache, positions)
        if cache is not None:
            cache.offset += input_ids.shape[1]
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(h))

    def decoder_stack(self, h: torch.Tensor, cache: ModelCache | None, positions: torch.Tensor) -> torch.Tensor:
        """Embedding [B, T, D] at ``positions`` [B or 1, T] -> input of the final norm [B, T, D]: the layers in order,
        each with its cache."""
        for i, layer in enumerate(self.model.layers):
            h = layer(h, None if cache is None else cache[i], positions)
        return h

    def make_cache(self, batch_size: int = 1) -> ModelCache:
        """Fresh per-layer state for ``batch_size`` sequences (KDA state fp32, MLA latents in the compute dtype)."""
        return make_model_cache(self, batch_size)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: read off the final norm, which is never quantized (a packed lm_head is uint32)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def num_parameters(self) -> int:
        """Every stored value: parameters and buffers (router bias, fp8 block scales) alike."""
        return sum(p.numel() for p in self.parameters()) + sum(b.numel() for b in self.buffers())
