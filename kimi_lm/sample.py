"""Sampling: logits [B, V] -> next token [B], vectorised over the batch and free of host syncs.

Two composable stages, as mlx-lm's ``make_logits_processors`` / ``make_sampler``:

1. logits processors (they change the model's distribution, and the reported logprobs): repetition penalty
   (CTRL-style: positive logits ÷ r, negative × r) over the last ``repetition_context_size`` tokens, presence and
   frequency penalties (OpenAI-style, additive) over the last ``penalty_context_size`` tokens, and a logit bias;
2. the sampler: temperature 0 is greedy argmax; otherwise the logits are divided by the temperature, then top-k,
   top-p (smallest set whose mass reaches p, at least one token) and min-p (drop tokens below min_p × the top
   probability) cut the tail, in that order (the order of transformers and vLLM), and a token is drawn.

Drawing uses the exponential race ``argmax(p / E)`` with E ~ Exp(1) (gpt-fast): the same as a categorical draw, with
no host sync. A ``seed`` gives the sampler its own ``torch.Generator``: identical inputs give identical outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kimi_lm.errors import UsageError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_context_size: int = 20
    logit_bias: dict[int, float] | None = None
    seed: int | None = None

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first parameter out of range."""
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 = off)"),
            ("repetition_context_size", self.repetition_context_size >= 0, "must be >= 0"),
            ("penalty_context_size", self.penalty_context_size >= 0, "must be >= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UsageError(f"{name} {rule}, got {getattr(self, name)!r}")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or token < 0:
                raise UsageError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")


# ---- logits processors: (logits [B, V] fp32, history [B, L] int64) -> logits ----------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)  # a token seen twice is written twice with the same value
    return logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def apply_presence_frequency(logits: torch.Tensor, history: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    if (presence == 0 and frequency == 0) or history.numel() == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, history, torch.ones_like(history, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    ids = torch.tensor(list(bias), device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(1, ids, values.expand(logits.shape[0], -1))


# ---- tail cutting on temperature-scaled logits ----------------------------------------------------------------------
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop = mass_before >= p  # keeps the smallest prefix reaching p; the top token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return logits
    logprobs = logits.log_softmax(-1)
    threshold = logprobs.max(-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logprobs < threshold, float("-inf"))


class Sampler:
    """``sampler(logits [B, V], history [B, L]) -> (tokens [B], logprobs [B, V])``.

    ``logprobs`` is the log-softmax of the processed logits (after penalties and bias, before temperature and tail
    cutting): the distribution the model, as adjusted, puts on each token.
    """

    def __init__(self, params: SamplingParams | None = None, device: torch.device | str = "cpu"):
        self.params = params = params or SamplingParams()
        params.validate()
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def process(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        p = self.params
        logits = logits.float()
        if history is not None and history.numel():
            if p.repetition_context_size:
                window = history[:, -p.repetition_context_size :]
                logits = apply_repetition_penalty(logits, window, p.repetition_penalty)
            if p.penalty_context_size:
                logits = apply_presence_frequency(logits, history[:, -p.penalty_context_size :], p.presence_penalty,
                                                  p.frequency_penalty)
        return apply_logit_bias(logits, p.logit_bias)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed logits [B, V] -> tokens [B]."""
        p = self.params
        if p.temperature == 0:
            return logits.argmax(-1)
        logits = min_p_filter(top_p_filter(top_k_filter(logits / p.temperature, p.top_k), p.top_p), p.min_p)
        probs = logits.softmax(-1)
        race = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return (probs / race).argmax(-1)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None):
        logits = self.process(logits, history)
        return self.sample(logits), logits.log_softmax(-1)
