"""``kimi-lm serve --tp N / --ep N``: the serving engine run in lockstep on every rank of a split model.

    torchrun --nproc-per-node 2 -m kimi_lm serve --model DIR --tp 2 [--ep 2] [--port 8080]

A split model's forward is a collective: it broadcasts rank 0's ``input_ids`` and all-reduces after every
row-parallel product, so every rank must run the same forwards, in the same order, on caches of the same shapes.
Rank 0 runs uvicorn and a :class:`LockstepEngine`; every other rank runs the same engine without HTTP
(:func:`follow`). The scheduler (:class:`kimi_lm.server.engine.Engine`) is deterministic given its inputs, so each
iteration starts with rank 0 broadcasting those inputs, and every rank then takes the same decisions (admission,
chunk sizes, batched decode, prefix-cache pool hits and evictions: a pooled cache holds the same number of bytes on
every rank, since all ranks hold equal shares):

* what the HTTP side changed since the last iteration, collected on rank 0 only: new requests (prompt ids,
  sampling parameters and seed, max tokens, stop strings and ids, logprobs), cancellations (a client went away),
  shutdown. Everything that depends on wall-clock time or on which thread won a race is decided here, once;
* a digest of rank 0's scheduler state (queue, prefilling, decoding, pool sizes), which every rank checks against
  its own: a disagreement stops the run with a message instead of a collective hang;
* after each forward, the tokens rank 0 sampled: the other ranks feed them to their sequences' decoders (same stop
  strings, same lengths) through :class:`ForcedSampler` rather than sampling themselves.

The inputs travel as JSON in a uint8 tensor: no pickle, and a CUDA tensor under NCCL. Its length and the sampled
tokens travel in control messages of one fixed size that start with their kind, so a rank out of step (a bug)
reads a message of the wrong kind and stops with a message, instead of a collective of mismatched sizes. While idle,
rank 0 still sends an empty iteration every 50 ms, so followers never wait near the process group's timeout.

Shutdown: SIGTERM / Ctrl-C on rank 0 (uvicorn's handler stops the engine) sends a shutdown iteration and every rank
returns 0. torchrun forwards a signal it gets to every rank: a follower then waits for rank 0's shutdown
iteration, and exits on its own after :data:`FOLLOWER_GRACE_S` if none comes. A rank that dies makes the others'
next collective fail: the engine stops, rank 0 prints one line and exits 1, and torchrun ends the job.

Reference: vLLM's multi-process executor (the driver broadcasts each step's scheduler output to the workers);
mlx-lm's ``mlx.launch`` server (rank 0 serves, the others follow).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import sys
import threading

import torch
import torch.distributed as dist

from kimi_lm.sample import Sampler, SamplingParams
from kimi_lm.server.engine import Engine, Sequence

IDLE_WAIT_S = 0.05  # an idle rank 0 sends an empty iteration this often (also bounds its reaction to shutdown)
FOLLOWER_GRACE_S = 10.0  # a signalled follower exits on its own this long after the signal if rank 0 sent nothing
ITERATION, TOKENS = 1, 2  # the kinds of control message (the first value of each)
KINDS = {ITERATION: "an iteration's inputs", TOKENS: "the sampled tokens"}


class SplitRunError(RuntimeError):
    """The ranks can no longer run in lockstep (a rank failed or disagrees): the split run must end."""


class ForcedSampler(Sampler):
    """A follower's sampler: returns the token rank 0 sampled (``forced``), so the decoder stops where rank 0's
    does; logprobs are computed as usual (the logits are the same on every rank after the all-reduces)."""

    forced: int = -1

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.full(logits.shape[:1], self.forced, dtype=torch.long, device=logits.device)


def _spec(seq: Sequence, sid: int) -> dict:
    """What a follower needs to build rank 0's sequence ``seq``."""
    params = dataclasses.asdict(seq.sampler.params)
    params["logit_bias"] = sorted((params["logit_bias"] or {}).items()) or None  # JSON keys would become strings
    return {"id": sid, "ids": seq.ids, "params": params, "max_tokens": seq.max_tokens, "stop": seq.stop,
            "stop_token_ids": sorted(seq.stop_token_ids), "logprobs": seq.logprobs}


def _sequence(spec: dict, device) -> Sequence:
    params = dict(spec["params"])
    params["logit_bias"] = {int(k): float(v) for k, v in params["logit_bias"]} if params["logit_bias"] else None
    seq = Sequence(spec["ids"], ForcedSampler(SamplingParams(**params), device=device), spec["max_tokens"],
                   lambda ev: None, spec["stop"], set(spec["stop_token_ids"]), spec["logprobs"])
    seq.lockstep_id = spec["id"]
    return seq


class LockstepEngine(Engine):
    """:class:`Engine` whose every iteration is driven by rank 0 (see the module docstring). On rank 0,
    :meth:`submit`, :meth:`stats` and :meth:`stop` work as in one process; on the other ranks nothing is submitted:
    requests arrive from rank 0. ``on_fatal`` (rank 0: stop the HTTP server) runs if the lockstep breaks."""

    def __init__(self, model, tokenizer, *args, on_fatal=None, **kwargs):
        self.rank, self.device = dist.get_rank(), model.device
        self.on_fatal = on_fatal
        self.error: BaseException | None = None
        self.shut_down = False  # set when the shutdown iteration was sent / received
        self._pending: list[Sequence] = []  # sent to every rank, not yet admitted: the same list everywhere
        self._next_id = 0
        super().__init__(model, tokenizer, *args, **kwargs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def stats(self) -> dict:
        out = super().stats()
        out["waiting"] += len(self._pending)
        return out

    # ---- scheduler thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.device.type == "cuda":  # the current CUDA device is per thread: NCCL calls come from this one
            torch.cuda.set_device(self.device)
        try:
            super()._run()
        except Exception as exc:
            self.error = exc
            self._closed.set()
            # the other ranks' sys.stderr is /dev/null (launch.quiet_other_ranks): this line goes to the real one
            print(f"kimi-lm serve: the split run stopped on rank {self.rank}: {type(exc).__name__}: {exc}; torchrun "
                  f"ends the job (its report names a rank that exited or failed)",
                  file=sys.stderr if self.is_main else sys.__stderr__, flush=True)
            if self.on_fatal is not None:
                self.on_fatal()

    def _state(self) -> list[int]:
        return [len(self._pending), len(self.prefilling), len(self.active), len(self.pool.entries)]

    def _sync(self) -> bool:
        message = self._broadcast_json(self._collect() if self.is_main else None)
        if message.get("shutdown"):
            self.shut_down = True
            return False
        if not self.is_main and message["state"] != self._state():
            raise SplitRunError(f"rank {self.rank}'s scheduler state {self._state()} differs from rank 0's "
                                f"{message['state']} (queued, prefilling, decoding, pooled caches)")
        if not self.is_main:
            self._pending += [_sequence(spec, self.device) for spec in message["new"]]
        dropped = set(message["cancel"])
        for seq in self._pending + self.prefilling + self.active:
            if seq.lockstep_id in dropped:
                seq.dropped = True
        return True

    def _collect(self) -> dict:
        """Rank 0: this iteration's inputs (new requests, cancellations, or shutdown)."""
        if self._closed.is_set():
            return {"shutdown": True}
        state = self._state()  # before the new requests: what every rank's lists hold now
        new = []
        try:
            if not (self.num_active or self._pending):  # idle: wait a little for work
                new.append(self._waiting.get(timeout=IDLE_WAIT_S))
            while True:
                new.append(self._waiting.get_nowait())
        except queue.Empty:
            pass
        specs = []
        for seq in new:
            if seq.cancelled:  # gone before any rank saw it
                continue
            seq.lockstep_id, self._next_id = self._next_id, self._next_id + 1
            specs.append(_spec(seq, seq.lockstep_id))
            self._pending.append(seq)
        cancel = [s.lockstep_id for s in self._pending + self.prefilling + self.active
                  if s.cancelled and not getattr(s, "dropped", False)]
        return {"state": state, "new": specs, "cancel": cancel}

    def _control(self, kind: int, values: list[int] = ()) -> list[int]:
        """Rank 0's ``[kind, *values]`` on every rank, in an int64 tensor of one fixed size (max_batch_size + 2), so
        that a rank out of step receives a message of the wrong kind, and says so, rather than one of the wrong
        size; returns the values (zero-padded)."""
        t = torch.zeros(self.max_batch_size + 2, dtype=torch.int64, device=self.device)
        if self.is_main:
            t[: len(values) + 1] = torch.tensor([kind, *values])
        dist.broadcast(t, src=0)
        got = t.tolist()
        if got[0] != kind:
            raise SplitRunError(f"rank {self.rank} is out of step with rank 0: it expected {KINDS.get(kind)}, rank 0 "
                                f"sent {KINDS.get(got[0], got[0])}")
        return got[1:]

    def _broadcast_json(self, message: dict | None) -> dict:
        """Rank 0's ``message`` on every rank: its length (a control message), then its UTF-8 JSON bytes."""
        data = json.dumps(message).encode() if self.is_main else b""
        n = self._control(ITERATION, [len(data)])[0]
        if self.is_main:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=0)
        return message if self.is_main else json.loads(buf.cpu().numpy().tobytes())

    def _cancelled(self, seq: Sequence) -> bool:
        return getattr(seq, "dropped", False)

    def _admit(self) -> None:
        """Admit from the list every rank shares, in order, until the batch is full (never from the live queue)."""
        while self.num_active < self.max_batch_size and self._pending:
            seq = self._pending.pop(0)
            if self._cancelled(seq):
                continue
            try:
                self._start(seq)
            except Exception as exc:
                self._fail(seq, exc)

    def _accept(self, seqs: list[Sequence], logits) -> list[bool]:
        """Rank 0 samples and broadcasts the tokens; the other ranks feed those tokens to their decoders."""
        if self.is_main:
            done = super()._accept(seqs, logits)
            self._control(TOKENS, [len(seqs), *(s.decoder.last_token for s in seqs)])
            return done
        n, *tokens = self._control(TOKENS)
        if n != len(seqs):
            raise SplitRunError(f"rank {self.rank} is out of step with rank 0: it sampled {n} sequences' tokens, "
                                f"this rank decoded {len(seqs)}")
        for seq, token in zip(seqs, tokens):
            seq.sampler.forced = token
        return super()._accept(seqs, logits)

    def _abort_all(self) -> None:
        self._closed.set()  # first: from now on submit() answers 503 itself (no request is left in the queue)
        pending, self._pending = self._pending, []
        for seq in pending:
            if not seq.cancelled:
                seq.fail("the server is shutting down", 503)
        super()._abort_all()

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        self._fail_all([seq], exc)

    def _fail_all(self, seqs: list[Sequence], exc: Exception) -> None:
        """A failed forward or prefill may have left the ranks mid-collective or with different caches: the
        lockstep cannot continue, so the whole run stops (one process would fail these requests only). ``seqs``
        are answered here: the caller has already taken them off the scheduler's lists."""
        for seq in seqs:
            seq.pc = None
            seq.fail("the server is shutting down: the split run stopped", 503)
        raise SplitRunError(f"{type(exc).__name__}: {exc}") from exc

    def _log_failure(self, what: str) -> None:
        pass  # the run stops: _run prints the one line that says why


def follow(engine: LockstepEngine) -> int:
    """A rank > 0's main thread: wait for the engine to end (rank 0's shutdown, or a failed collective); 0 on a
    clean shutdown. A SIGTERM / SIGINT (torchrun forwards its own) starts a grace period for rank 0's shutdown."""
    def on_signal(sig, frame):
        def give_up():
            if engine._thread.is_alive():
                os._exit(128 + sig)
        timer = threading.Timer(FOLLOWER_GRACE_S, give_up)
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while engine._thread.is_alive():  # a short join: signal handlers run on this thread between the waits
        engine._thread.join(timeout=0.2)
    return 0 if engine.error is None and engine.shut_down else 1

