"""The serving engine: one scheduler thread owns the model, prefills prompts in chunks and decodes every request.

    engine = Engine(model, tokenizer, max_batch_size=32)
    seq = Sequence(ids, Sampler(params), max_tokens=64, emit=callback, stop=["\\n\\n"])
    engine.submit(seq)          # callback(Event) per token, from the scheduler thread; seq.cancel() to abandon it

Continuous batching with chunked prefill (iteration-level scheduling, as Orca / vLLM / mlx-lm's ``BatchGenerator``).
Each iteration of the scheduler loop:

1. admits waiting requests (up to ``max_batch_size`` admitted) and drops cancelled ones, prefilling or decoding;
2. runs *one* prefill chunk, taking the prefilling requests in turn, so a 100k-token prompt is spread over many
   iterations instead of one forward that stalls everyone (vLLM's chunked prefill, with a budget of one chunk per
   iteration; our requests keep separate caches, so the chunk and the decode step are two forwards rather than one
   fused batch). The chunk is ``prefill_step_size`` tokens when nothing decodes, and at most ``decode_chunk_size``
   (256) while something does: each decode step waits for one chunk, and on the bundled model a 2048-token chunk
   takes ~1 s of CPU, a 256-token one ~0.15 s, for ~25 % less prefill throughput. Short prompts share a chunk: the
   first request's next tokens, then the next requests' while the budget lasts, in one packed forward
   (:func:`kimi_lm.batching.prefill_packed`), so a burst of chat requests starts decoding together;
3. feeds every decoding sequence's last token through one batched forward (:func:`kimi_lm.batching.decode_step`)
   and lets each sequence's :class:`~kimi_lm.generate.Decoder` sample, detokenise and stop, exactly as
   ``stream_generate`` does, so greedy output is the single-request output.

A short request that arrives while a long prompt prefills is prefilled at the next turn and then decodes one token
per iteration; a cancelled request (client gone) stops at the next chunk boundary; :meth:`Engine.stop` ends the
loop within one chunk and answers every unfinished request with a "shutting down" error, so the HTTP server can
close its connections at once.

Prefix reuse: every finished (or cancelled) request leaves its :class:`~kimi_lm.prompt_cache.PromptCache` in a pool,
an LRU bounded by bytes. A new request takes the cache that restores the longest prefix of its prompt *exactly*
(live end, or a KDA snapshot at a prompt boundary with MLA trimmed to it; never an approximation), so a chat that
resends its history re-computes only the new turn and still produces the tokens of a cold run.

A model split over processes runs :class:`kimi_lm.distributed.serve.LockstepEngine`, which overrides the loop's
inputs (``_sync``), cancellation (``_cancelled``), sampling (``_accept``) and failure (``_fail_all``) so that every
rank takes rank 0's decisions.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from kimi_lm.batching import decode_step, prefill_packed
from kimi_lm.cpu import native
from kimi_lm.generate import DEFAULT_PREFILL_STEP, Decoder
from kimi_lm.prompt_cache import MAX_SNAPSHOTS, PromptCache
from kimi_lm.sample import Sampler

log = logging.getLogger("kimi_lm.server")
DECODE_CHUNK = 256  # prefill tokens per iteration while other requests decode (bounds their time per token)
POOL_CONTEXT = 4096  # tokens per pooled cache assumed when the pool is sized from the model
MAX_POOL_BYTES = 2 << 30


_deferred = threading.local()  # the scheduler iteration's pending deliveries (deliver_at_end), per thread


@contextlib.contextmanager
def deliver_at_end():
    """Within it, an emit target that calls :func:`defer` hands its delivery to the end of the block: each once, in
    order. The scheduler wraps an iteration in it, so that a step's events reach the HTTP event loop in one hand-over
    after all of the step's sampling, rather than waking the loop's thread in the middle of it to contend with the
    sampling for the interpreter (measured at 8 clients: the step's sampling took 1.7 ms with the loop woken at the
    first event, 0.25 ms without HTTP)."""
    outer = getattr(_deferred, "pending", None)
    _deferred.pending = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            pending, _deferred.pending = _deferred.pending, None
            for deliver in pending:
                deliver()


def defer(deliver: Callable[[], None]) -> bool:
    """Schedule ``deliver`` for the end of the enclosing :func:`deliver_at_end` block on this thread (once however
    often it is asked); False where no block is open (the caller delivers now)."""
    pending = getattr(_deferred, "pending", None)
    if pending is None:
        return False
    pending[deliver] = None
    return True


@dataclass
class Event:
    """One generated token (or the end): what a request's ``emit`` callback receives."""

    text: str  # new text (stop strings and text that may begin one are held back)
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None, "stop", "length" or "error"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens restored from the prefix cache
    completion_tokens: int
    error: str | None = None  # set (with finish_reason "error") if the engine failed on this request or stopped
    status: int = 500  # the HTTP status that error maps to


class Sequence:
    """One request's generation state; the scheduler thread is its only user after :meth:`Engine.submit`."""

    def __init__(self, ids: list[int], sampler: Sampler, max_tokens: int, emit: Callable[[Event], None],
                 stop: list[str] = (), stop_token_ids: set[int] = frozenset(), logprobs: int | None = None):
        self.ids, self.sampler, self.max_tokens, self.emit = ids, sampler, max_tokens, emit
        self.stop, self.stop_token_ids = list(stop), set(stop_token_ids)
        self.logprobs = logprobs  # None: not requested; k: the chosen token's logprob and the top k
        self.cancelled = False
        self.pc: PromptCache | None = None
        self.decoder: Decoder | None = None
        self.cached = 0  # prompt tokens restored from the pool
        self.prefilled = 0  # prompt tokens in the cache so far (restored + computed)

    def cancel(self) -> None:
        """Abandon the request (client gone): the scheduler frees its slot before the next chunk or step."""
        self.cancelled = True

    def accept(self, logits: torch.Tensor) -> bool:
        """Sample the next token from ``logits`` [V] fp32 and emit it; True when the sequence is finished."""
        d = self.decoder.step(logits)
        self.emit(Event(d.text, d.token, d.logprob, d.top_logprobs, d.finish_reason, len(self.ids), self.cached,
                        self.decoder.n))
        return d.finish_reason is not None

    def fail(self, message: str, status: int = 500) -> None:
        n = self.decoder.n if self.decoder else 0
        self.emit(Event("", -1, 0.0, None, "error", len(self.ids), self.cached, n, error=message, status=status))


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


def pool_bytes_for(model, max_batch_size: int, context: int = POOL_CONTEXT) -> int:
    """A prefix-cache budget sized from the model: ``max_batch_size`` caches of ``context`` tokens (KDA state with
    its snapshots, MLA latents), at most 2 GiB. For the bundled 8M model that is ~110 MB rather than 2 GiB; for
    Kimi Linear 48B the cap applies."""
    cache = model.make_cache(1)
    per_token = sum(layer.buffer.shape[-1] * layer.buffer.element_size()
                    for layer in cache.layers if hasattr(layer, "buffer"))  # MLA latents; empty at length 0
    per_request = cache.nbytes * (1 + MAX_SNAPSHOTS) + per_token * context
    return min(MAX_POOL_BYTES, max_batch_size * per_request)


class Engine:
    """Owns the model on one scheduler thread; :meth:`submit`, :meth:`stats` and :meth:`stop` are the calls other
    threads make."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_kv_size: int | None = None,
                 prompt_cache_bytes: int | None = None, prefill_step_size: int = DEFAULT_PREFILL_STEP,
                 decode_chunk_size: int = DECODE_CHUNK):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.decode_chunk_size = min(decode_chunk_size, prefill_step_size)
        if prompt_cache_bytes is None:
            prompt_cache_bytes = pool_bytes_for(model, max_batch_size)
        self.pool = PromptCachePool(model, prompt_cache_bytes, max_kv_size)
        self.prefilling: list[Sequence] = []  # in turn order: the first gets the next chunk
        self.active: list[Sequence] = []  # decoding
        self._waiting: queue.Queue[Sequence] = queue.Queue()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # submit's check-then-put against the final drain: no request is stranded
        self._thread = threading.Thread(target=self._run, name="kimi-lm-scheduler", daemon=True)
        native.release_thread_team()  # the model's parallel work is the scheduler thread's from now on
        self._thread.start()  # last: a subclass sets its own state before calling this __init__

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if not self._closed.is_set():
                self._waiting.put(seq)
                return
        seq.fail("the server is shutting down", 503)

    def stop(self) -> None:
        """Ask the scheduler to stop (returns at once): it finishes the chunk or step it is in, then answers every
        unfinished request with an error."""
        self._closed.set()

    def close(self, timeout: float = 10) -> None:
        self.stop()
        self._thread.join(timeout=timeout)

    @property
    def num_active(self) -> int:
        """Admitted requests: prefilling or decoding."""
        return len(self.prefilling) + len(self.active)

    def stats(self) -> dict:
        """What ``/health`` shows: requests waiting, prefilling (with progress) and decoding."""
        prefilling = list(self.prefilling)  # a snapshot: the scheduler replaces these lists, never mutates a copy
        return {"waiting": self._waiting.qsize(), "decoding": len(self.active),
                "prefilling": [{"prompt_tokens": len(s.ids), "prefilled": s.prefilled} for s in prefilling]}

    # ---- scheduler thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # per thread: this thread only runs inference
        try:
            while self._sync():
                with deliver_at_end():  # the iteration's events leave together, after its sampling
                    self._admit()
                    self._drop_cancelled()
                    if self.prefilling:
                        self._prefill_chunk()
                    if self.active:
                        self._step()
        finally:
            self._abort_all()

    def _sync(self) -> bool:
        """False once the loop should end. (A split run's engine exchanges the iteration's inputs here.)"""
        return not self._closed.is_set()

    def _cancelled(self, seq: Sequence) -> bool:
        """Whether the scheduler drops ``seq`` now (a split run decides this on rank 0 for every rank)."""
        return seq.cancelled

    def _accept(self, seqs: list[Sequence], logits) -> list[bool]:
        """Sample each sequence's next token from its row of ``logits`` and emit it; which ones finished."""
        return [seq.accept(row) for seq, row in zip(seqs, logits)]

    def _admit(self) -> None:
        """Start prefilling waiting requests until the batch is full; wait briefly for work when idle."""
        while self.num_active < self.max_batch_size:
            try:
                seq = self._waiting.get(timeout=0.05) if not self.num_active else self._waiting.get_nowait()
            except queue.Empty:
                return
            if self._cancelled(seq):
                continue
            try:
                self._start(seq)
            except Exception as exc:  # one bad request never stops the others
                self._log_failure("prefill failed")
                self._fail(seq, exc)

    def _start(self, seq: Sequence) -> None:
        pc = seq.pc = self.pool.take(seq.ids)
        seq.cached = seq.prefilled = pc.reuse(seq.ids)
        seq.decoder = Decoder(self.tokenizer, seq.sampler, seq.ids, seq.max_tokens, seq.stop, seq.stop_token_ids,
                              seq.logprobs or 0)
        if seq.cached < len(seq.ids):
            self.prefilling = self.prefilling + [seq]
        else:
            self._begin_decoding(seq)

    def _prefill_chunk(self) -> None:
        """One chunk of prefill: the next chunk of the first prefilling request, and, within the same budget of tokens,
        the next chunks of the requests after it in turn order, all in one forward (``batching.prefill_packed``: a
        burst of short prompts is prefilled in about the time of their total length). The requests it took go to
        the back of the turn order, or start decoding when their prompt is done."""
        budget = self.decode_chunk_size if self.active else self.prefill_step_size
        taken, chunks = [], []
        for seq in self.prefilling:
            chunk = seq.ids[seq.prefilled : seq.prefilled + budget]
            taken.append(seq)
            chunks.append(chunk)
            budget -= len(chunk)
            if budget <= 0:
                break
        rest = self.prefilling[len(taken):]
        try:
            logits = prefill_packed(self.model, [seq.pc.cache for seq in taken], chunks)
            for seq, chunk, row in zip(taken, chunks, logits):
                seq.pc.advance(chunk, row)
                seq.prefilled += len(chunk)
        except Exception as exc:
            self._log_failure("prefill failed")
            self.prefilling = rest
            self._fail_all(taken, exc)
            return
        unfinished = [seq for seq in taken if seq.prefilled < len(seq.ids)]
        self.prefilling = rest + unfinished
        for seq in taken:
            if seq.prefilled == len(seq.ids):
                seq.pc.snapshot()  # the request's next turn can resume exactly from the end of this prompt
                self._begin_decoding(seq)

    def _begin_decoding(self, seq: Sequence) -> None:
        if self._accept([seq], [seq.pc.logits])[0]:
            self._release(seq)
        else:
            self.active = self.active + [seq]

    def _step(self) -> None:
        seqs = self.active
        try:
            logits = decode_step(self.model, [s.pc.cache for s in seqs], [s.decoder.last_token for s in seqs])
        except Exception as exc:
            self._log_failure("decode step failed")
            self.active = []
            self._fail_all(seqs, exc)
            return
        for b, seq in enumerate(seqs):
            seq.pc.advance([seq.decoder.last_token], logits[b])
        done = self._accept(seqs, logits)
        for seq, finished in zip(seqs, done):
            if finished:
                self._release(seq)
        self.active = [seq for seq, finished in zip(seqs, done) if not finished]

    def _drop_cancelled(self) -> None:
        dropped = [s for s in self.prefilling + self.active if self._cancelled(s)]
        for seq in dropped:
            self._release(seq)
        self.prefilling = [s for s in self.prefilling if s not in dropped]
        self.active = [s for s in self.active if s not in dropped]

    def _release(self, seq: Sequence) -> None:
        # the cache is consistent (its tokens are exactly what it consumed), so even a cancelled request's is reusable
        if seq.pc is not None:
            self.pool.put(seq.pc)
            seq.pc = None

    def _log_failure(self, what: str) -> None:
        log.exception(what)  # called in the except block: the traceback of the failure

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        seq.pc = None  # its state may be half-updated: never reuse it
        seq.fail(f"{type(exc).__name__}: {exc}")

    def _fail_all(self, seqs: list[Sequence], exc: Exception) -> None:
        for seq in seqs:
            self._fail(seq, exc)

    def _abort_all(self) -> None:
        """After the loop: every request still admitted or waiting gets a 503, so no HTTP handler waits forever."""
        unfinished, self.prefilling, self.active = self.prefilling + self.active, [], []
        with self._lock:
            while not self._waiting.empty():
                unfinished.append(self._waiting.get_nowait())
        for seq in unfinished:
            seq.pc = None
            if not seq.cancelled:
                seq.fail("the server is shutting down", 503)
