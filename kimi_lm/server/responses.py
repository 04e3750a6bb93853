"""Engine events -> OpenAI responses: one JSON body, or Server-Sent Events ending in ``data: [DONE]``.

Tokens come back on the engine's thread and cross to the event loop through a :class:`Mailbox` (one wake-up for
all the events of a step) into each request's ``asyncio.Queue`` (:func:`submit`).
:func:`events` yields them until every choice has finished and, in its ``finally``, cancels whatever is left: a
streaming client that disconnects makes Starlette cancel the response generator; a non-streaming one is noticed by
polling ``request.is_disconnected()`` while waiting. Either way the scheduler drops the request at its next chunk
or step, even in the middle of a long prefill.

Chat replies go through the tokenizer's reply parser (:class:`~kimi_lm.chat.ToolCallParser`, or
:class:`~kimi_lm.xtml.XtmlReplyParser` for Kimi K3): tool-call markers -> ``tool_calls``; thinking -> both
``reasoning`` (vLLM's current name) and ``reasoning_content`` (SGLang's and older vLLM's), the same text, on messages
and stream deltas. A reply that made a usable tool call finishes with ``"tool_calls"``. A tool call that cannot be
read (invalid JSON arguments, no name, unterminated) is not dropped: its text, markers included, stays in
``content`` where the model wrote it (what vLLM does when its tool parser fails), the server logs a warning, and
only usable calls appear in ``tool_calls``.

References: OpenAI API reference (chat.completion(.chunk), text_completion, usage, logprobs); vLLM
``entrypoints/openai/serving_chat.py`` (chunk layout, the usage chunk).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
import uuid
import weakref

from fastapi.responses import StreamingResponse

from kimi_lm.server.engine import Event, Sequence, defer
from kimi_lm.server.protocol import APIError

log = logging.getLogger("kimi_lm.server")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class Mailbox:
    """Events from the scheduler thread to one event loop. Each is queued here and the loop woken only when no
    wake-up is pending (``call_soon_threadsafe`` writes to the loop's self-pipe): a decode step of 8 requests wakes it
    once rather than 8 times (those writes were 6.5 % of the scheduler thread's samples at 8 clients), and inside a
    scheduler iteration (``engine.deliver_at_end``) only at its end, after all of its sampling. Events keep their
    order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.pending, self.lock = loop, collections.deque(), False, threading.Lock()

    def put(self, q: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((q, item))
        if not defer(self.wake):
            self.wake()

    def wake(self) -> None:
        """Wake the loop for what is queued (unless a wake-up is pending already)."""
        with self.lock:
            if self.pending or not self.items:
                return
            self.pending = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.pending = self.items, collections.deque(), False
        for q, item in items:
            q.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Mailbox


async def submit(engine, make_sequences) -> tuple[asyncio.Queue, list[Sequence]]:
    """``make_sequences(emit_for)`` builds the sequences (``emit_for(i)``: choice i's callback); they are submitted
    and their events arrive on the returned queue as (choice index, Event)."""
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    if loop not in _mailboxes:
        _mailboxes[loop] = Mailbox(loop)
    mailbox = _mailboxes[loop]

    def emit_for(i):
        def emit(ev: Event):
            mailbox.put(q, (i, ev))
        return emit

    seqs = make_sequences(emit_for)
    for s in seqs:
        engine.submit(s)
    return q, seqs


async def events(q: asyncio.Queue, seqs: list[Sequence], request=None):
    """(index, Event) until every sequence has finished; cancels the rest if the consumer goes away. With
    ``request``, a client disconnect also ends it (non-streaming responses have no other way to notice)."""
    left = len(seqs)
    try:
        while left:
            if request is None:  # streaming: a disconnect cancels this generator; no timer per event
                i, ev = await q.get()
            else:
                try:
                    i, ev = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            if ev.finish_reason == "error":
                code, kind = ("server_shutting_down", "server_error") if ev.status == 503 else ("internal_error",
                                                                                              "server_error")
                raise APIError(f"generation failed: {ev.error}", None, code, ev.status, kind)
            left -= ev.finish_reason is not None
            yield i, ev
    finally:
        for s in seqs:
            s.cancel()


def usage(prompt_tokens: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class Reply:
    """Ids, timestamps and chunk framing shared by one response's chunks."""

    def __init__(self, prefix: str, obj: str, model: str, include_usage: bool):
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.obj, self.model, self.include_usage = obj, model, include_usage

    def body(self, choices: list[dict], usage_=None, obj: str | None = None) -> dict:
        out = {"id": self.id, "object": obj or self.obj, "created": self.created, "model": self.model,
               "choices": choices}
        if usage_ is not None:
            out["usage"] = usage_
        return out

    def chunk(self, choices: list[dict], usage_=None) -> str:
        return sse(self.body(choices, usage_ if self.include_usage else None))

    async def stream(self, body_chunks):
        """SSE of ``body_chunks`` (an async iterator of strings), an error event if generation fails, then
        ``[DONE]``."""
        try:
            async for text in body_chunks:
                yield text
        except APIError as exc:
            yield sse(exc.body())
            return
        yield "data: [DONE]\n\n"


def _token_text(tok, t: int) -> tuple[str, list[int]]:
    b = tok.token_bytes(t) if 0 <= t < tok.n_vocab else b""
    return b.decode("utf-8", errors="replace"), list(b)


# ---- chat ---------------------------------------------------------------------------------------------------------
class ChatReplies:
    """Turns each choice's events into chat deltas: content, reasoning and tool calls."""

    def __init__(self, tok, n: int, prompt_ids: list[int], forced: str, first_call: int, top_logprobs: int | None):
        self.tok, self.top_logprobs = tok, top_logprobs
        prompt = prompt_ids[: len(prompt_ids) - len(tok.encode(forced))] if forced else prompt_ids
        self.parsers = [tok.reply_parser(prompt, first_call) for _ in range(n)]
        self.called = [False] * n
        for p in self.parsers:  # the forced opening is part of the reply: the parser must see it
            p.feed(forced)

    def delta(self, i: int, ev: Event) -> tuple[dict, str | None]:
        """Event -> (delta message with ToolCall objects, finish_reason)."""
        d = self.parsers[i].feed(ev.text)
        if ev.finish_reason:
            d += self.parsers[i].finish()
        delta = {}
        if d.content:
            delta["content"] = d.content
        if d.reasoning:
            delta["reasoning"] = delta["reasoning_content"] = d.reasoning
        for bad in d.invalid_calls:
            log.warning("unusable tool call returned as content: %s: %r", bad.error, bad.raw[:200])
        if d.tool_calls:
            delta["tool_calls"] = d.tool_calls
            self.called[i] = True
        finish = ev.finish_reason
        return delta, "tool_calls" if finish == "stop" and self.called[i] else finish

    def logprobs(self, ev: Event) -> dict:
        text, b = _token_text(self.tok, ev.token)
        top = [{"token": _token_text(self.tok, t)[0], "logprob": lp, "bytes": _token_text(self.tok, t)[1]}
               for t, lp in ev.top_logprobs or []]
        return {"token": text, "logprob": ev.logprob, "bytes": b, "top_logprobs": top}


def chat_stream(reply: Reply, replies: ChatReplies, q, seqs) -> StreamingResponse:
    async def chunks():
        n_calls = [0] * len(seqs)
        completion, last = 0, None
        for i in range(len(seqs)):
            yield reply.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
        async for i, ev in events(q, seqs):
            delta, finish = replies.delta(i, ev)
            if "tool_calls" in delta:
                calls = delta["tool_calls"]
                delta["tool_calls"] = [{"index": n_calls[i] + j, **c.to_message()} for j, c in enumerate(calls)]
                n_calls[i] += len(calls)
            lp = {"content": [replies.logprobs(ev)]} if replies.top_logprobs is not None else None
            if delta or finish or lp:
                yield reply.chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}])
            completion += finish is not None and ev.completion_tokens
            last = ev
        if reply.include_usage:
            yield reply.chunk([], usage(last.prompt_tokens, completion, last.cached_tokens))

    return StreamingResponse(reply.stream(chunks()), media_type="text/event-stream")


async def chat_body(reply: Reply, replies: ChatReplies, q, seqs, prompt_tokens: int, request) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None} for i in range(len(seqs))]
    calls = [[] for _ in seqs]
    lps = [[] for _ in seqs]
    completion = cached = 0
    async for i, ev in events(q, seqs, request):
        delta, finish = replies.delta(i, ev)
        msg = choices[i]["message"]
        msg["content"] += delta.get("content", "")
        if "reasoning" in delta:
            msg["reasoning"] = msg["reasoning_content"] = msg.get("reasoning", "") + delta["reasoning"]
        calls[i] += delta.get("tool_calls", [])
        if replies.top_logprobs is not None:
            lps[i].append(replies.logprobs(ev))
        if finish:
            choices[i]["finish_reason"] = finish
            completion += ev.completion_tokens
            cached = ev.cached_tokens
    for i, c in enumerate(choices):
        if calls[i]:
            c["message"]["tool_calls"] = [t.to_message() for t in calls[i]]
            c["message"]["content"] = c["message"]["content"] or None
        if replies.top_logprobs is not None:
            c["logprobs"] = {"content": lps[i]}
    return reply.body(choices, usage(prompt_tokens, completion, cached), obj="chat.completion")


# ---- completions --------------------------------------------------------------------------------------------------
def _completion_logprobs(tok, ev: Event, offset: int) -> dict:
    return {"tokens": [_token_text(tok, ev.token)[0]], "token_logprobs": [ev.logprob], "text_offset": [offset],
            "top_logprobs": [{_token_text(tok, t)[0]: lp for t, lp in ev.top_logprobs or []}]}


def completion_stream(reply: Reply, tok, q, seqs, echo: list[str], logprobs: int | None,
                      prompt_tokens: int) -> StreamingResponse:
    async def chunks():
        offsets = [len(e) for e in echo]
        completion = cached = 0
        for i, e in enumerate(echo):
            if e:
                yield reply.chunk([{"index": i, "text": e, "logprobs": None, "finish_reason": None}])
        async for i, ev in events(q, seqs):
            lp = _completion_logprobs(tok, ev, offsets[i]) if logprobs is not None else None
            offsets[i] += len(ev.text)
            yield reply.chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
            if ev.finish_reason:
                completion += ev.completion_tokens
                cached += ev.cached_tokens
        if reply.include_usage:
            yield reply.chunk([], usage(prompt_tokens, completion, cached))

    return StreamingResponse(reply.stream(chunks()), media_type="text/event-stream")


async def completion_body(reply: Reply, tok, q, seqs, echo: list[str], logprobs: int | None, prompt_tokens: int,
                          request) -> dict:
    choices = [{"index": i, "text": e, "logprobs": None, "finish_reason": None} for i, e in enumerate(echo)]
    merged = [{"tokens": [], "token_logprobs": [], "text_offset": [], "top_logprobs": []} for _ in choices]
    completion = cached = 0
    async for i, ev in events(q, seqs, request):
        if logprobs is not None:
            for key, v in _completion_logprobs(tok, ev, len(choices[i]["text"])).items():
                merged[i][key] += v
        choices[i]["text"] += ev.text
        if ev.finish_reason:
            choices[i]["finish_reason"] = ev.finish_reason
            completion += ev.completion_tokens
            cached += ev.cached_tokens
    if logprobs is not None:
        for c, m in zip(choices, merged):
            c["logprobs"] = m
    return reply.body(choices, usage(prompt_tokens, completion, cached))

