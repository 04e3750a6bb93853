"""The serving engine: one scheduler thread owns the model and decodes every active request together.

    engine = Engine(model, tokenizer, max_batch_size=32)
    seq = Sequence(ids, Sampler(params), max_tokens=64, stop=["\\n\\n"], emit=callback)
    engine.submit(seq)          # callback(Event) per token, from the scheduler thread; seq.cancel() to abandon it

Continuous batching (iteration-level scheduling, as Orca / vLLM / mlx-lm's ``BatchGenerator``): between two decode
steps the scheduler admits waiting requests (prefill, one request at a time, up to ``max_batch_size`` active) and
drops finished or cancelled ones; each step feeds every active sequence's last token through one batched forward
(:func:`kimi_lm.batching.decode_step`). Each sequence keeps its own batch-1 cache and its own sampler, so settings,
seeds and results are per request: greedy output is the single-request output.

Prefix reuse: every finished (or cancelled) request leaves its :class:`~kimi_lm.prompt_cache.PromptCache` in a pool,
an LRU bounded by bytes. A new request takes the cache that restores the longest prefix of its prompt *exactly*
(live end, or a KDA snapshot at a prompt boundary with MLA trimmed to it; never an approximation), so a chat that
resends its history re-computes only the new turn and still produces the tokens of a cold run.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from kimi_lm.batching import decode_step
from kimi_lm.chat import partial_suffix_len
from kimi_lm.generate import DEFAULT_PREFILL_STEP, prefill
from kimi_lm.prompt_cache import PromptCache
from kimi_lm.sample import Sampler

log = logging.getLogger("kimi_lm.server")


@dataclass
class Event:
    """One generated token (or the end): what a request's ``emit`` callback receives."""

    text: str  # new text (stop strings and text that may begin one are held back)
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None, "stop" or "length"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens restored from the prefix cache
    completion_tokens: int
    error: str | None = None  # set (with finish_reason "error") if the engine failed on this request


class Sequence:
    """One request's generation state; the scheduler thread is its only user after :meth:`Engine.submit`."""

    def __init__(self, ids: list[int], sampler: Sampler, max_tokens: int, emit: Callable[[Event], None],
                 stop: list[str] = (), stop_token_ids: set[int] = frozenset(), logprobs: int | None = None):
        self.ids, self.sampler, self.max_tokens, self.emit = ids, sampler, max_tokens, emit
        self.stops = [s for s in stop if s]
        self.stop_ids = set(stop_token_ids)
        self.logprobs = logprobs  # None: not requested; k: the chosen token's logprob and the top k
        self.cancelled = False
        self.pc: PromptCache | None = None
        self.cached = 0
        self.n = 0
        self.last_token = -1
        self.pending = ""
        p = sampler.params  # penalties look back a bounded window: keep only that much history
        self.window = max(p.repetition_context_size if p.repetition_penalty != 1 else 0,
                          p.penalty_context_size if p.presence_penalty or p.frequency_penalty else 0)
        self.recent = ids[-self.window:] if self.window else []

    def cancel(self) -> None:
        """Abandon the request (client gone): the scheduler frees its slot before the next step."""
        self.cancelled = True

    def accept(self, logits: torch.Tensor, tokenizer, detok) -> bool:
        """Sample the next token from ``logits`` [V] fp32, emit it; True when the sequence is finished."""
        if logits.shape[-1] > tokenizer.n_vocab:  # ids the tokenizer cannot decode must never be sampled
            logits = logits.clone()
            logits[tokenizer.n_vocab :] = float("-inf")
        history = torch.tensor([self.recent], device=logits.device) if self.window else None
        token_t, lp = self.sampler(logits[None], history)
        token = self.last_token = int(token_t)
        self.n += 1
        if self.window:
            self.recent = (self.recent + [token])[-self.window :]
        top = None
        if self.logprobs:
            values, indices = lp[0].topk(self.logprobs)
            top = list(zip(indices.tolist(), values.tolist()))
        finish = "stop" if token in self.stop_ids else None
        if not finish:
            self.pending += detok.add_token(token)
            finish = "length" if self.n >= self.max_tokens else None
        if finish:
            self.pending += detok.finalize()
        cut = min(((self.pending.find(s), s) for s in self.stops if s in self.pending), default=None)
        if cut is not None:
            text, finish = self.pending[: cut[0]], "stop"
        elif finish:
            text = self.pending
        else:
            keep = partial_suffix_len(self.pending, self.stops)
            text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        self.emit(Event(text, token, float(lp[0, token]), top, finish, len(self.ids), self.cached, self.n))
        return finish is not None


class PromptCachePool:
    """Caches left by finished requests, least recently used first, at most ``max_bytes`` in all."""

    def __init__(self, model, max_bytes: int, max_kv_size: int | None = None):
        self.model, self.max_bytes, self.max_kv_size = model, max_bytes, max_kv_size
        self.entries: list[PromptCache] = []

    @property
    def nbytes(self) -> int:
        return sum(pc.nbytes for pc in self.entries)

    def take(self, ids: list[int]) -> PromptCache:
        """The pooled cache that restores most of ``ids`` (removed from the pool), or a fresh one."""
        scored = [(pc.restorable(ids), i) for i, pc in enumerate(self.entries)]
        best, i = max(scored, default=(0, -1))
        if best > 0:
            return self.entries.pop(i)
        return PromptCache(self.model, self.max_kv_size)

    def put(self, pc: PromptCache) -> None:
        if self.max_bytes <= 0 or pc.nbytes > self.max_bytes:
            return
        self.entries.append(pc)
        while self.nbytes > self.max_bytes:
            self.entries.pop(0)


class Engine:
    """Owns the model on one scheduler thread; :meth:`submit` is the only call other threads make."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_kv_size: int | None = None,
                 prompt_cache_bytes: int = 2 << 30, prefill_step_size: int = DEFAULT_PREFILL_STEP):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.pool = PromptCachePool(model, prompt_cache_bytes, max_kv_size)
        self.active: list[tuple[Sequence, object]] = []  # (sequence, its streaming detokenizer)
        self._waiting: queue.Queue[Sequence] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kimi-lm-scheduler", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        self._waiting.put(seq)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)

    @property
    def num_active(self) -> int:
        return len(self.active)

    # ---- scheduler thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # per thread: this thread only runs inference
        while not self._closed.is_set():
            self._admit()
            self._drop_cancelled()
            if self.active:
                self._step()

    def _admit(self) -> None:
        """Prefill waiting requests until the batch is full; wait briefly for work when idle."""
        while len(self.active) < self.max_batch_size:
            try:
                seq = self._waiting.get(timeout=0.05) if not self.active else self._waiting.get_nowait()
            except queue.Empty:
                return
            if seq.cancelled:
                continue
            try:
                self._prefill(seq)
            except Exception as exc:  # one bad request never stops the others
                log.exception("prefill failed")
                self._fail(seq, exc)

    def _prefill(self, seq: Sequence) -> None:
        pc = seq.pc = self.pool.take(seq.ids)
        seq.cached = pc.reuse(seq.ids)
        todo = seq.ids[seq.cached :]
        if todo:
            pc.advance(todo, prefill(self.model, pc.cache, todo, self.prefill_step_size))
            pc.snapshot()  # the request's next turn can resume exactly from the end of this prompt
        detok = self.tokenizer.detokenizer()
        if seq.accept(pc.logits, self.tokenizer, detok):
            self._release(seq)
        else:
            self.active.append((seq, detok))

    def _step(self) -> None:
        seqs = [s for s, _ in self.active]
        try:
            logits = decode_step(self.model, [s.pc.cache for s in seqs], [s.last_token for s in seqs])
        except Exception as exc:
            log.exception("decode step failed")
            for s in seqs:
                self._fail(s, exc)
            self.active = []
            return
        still = []
        for b, (seq, detok) in enumerate(self.active):
            seq.pc.advance([seq.last_token], logits[b])
            if seq.accept(logits[b], self.tokenizer, detok):
                self._release(seq)
            else:
                still.append((seq, detok))
        self.active = still

    def _drop_cancelled(self) -> None:
        for seq, _ in self.active:
            if seq.cancelled:
                self._release(seq)
        self.active = [(s, d) for s, d in self.active if not s.cancelled]

    def _release(self, seq: Sequence) -> None:
        # the cache is consistent (its tokens are exactly what it consumed), so even a cancelled request's is reusable
        if seq.pc is not None:
            self.pool.put(seq.pc)
            seq.pc = None

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        seq.pc = None  # its state may be half-updated: never reuse it
        seq.emit(Event("", -1, 0.0, None, "error", len(seq.ids), 0, seq.n, error=f"{type(exc).__name__}: {exc}"))
