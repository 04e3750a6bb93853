"""The FastAPI app: OpenAI's ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``.

Each request is validated (pydantic, then the checks only the model can make: model name, context length, sampler
ranges), turned into token ids and :class:`~kimi_lm.server.engine.Sequence` objects (``n`` per prompt), and handed
to the engine. Tokens come back on the engine's thread and cross to the event loop through an ``asyncio.Queue``.
Streams are Server-Sent Events ending in ``data: [DONE]``; when a client disconnects, Starlette cancels the response
generator and its ``finally`` cancels the sequences, so the scheduler frees their slots at the next step.

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input (schema errors included, with
``param`` naming the field), 401 for a missing or wrong API key, 500 if the engine fails on a request.

References: OpenAI API reference; vLLM ``entrypoints/openai/serving_chat.py`` (chunk layout, usage chunk);
mlx-lm ``server.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from kimi_lm.chat import SECTION_BEGIN, CALL_BEGIN, ARGS_BEGIN, ToolCallParser, count_tool_calls
from kimi_lm.sample import Sampler, SamplingParams
from kimi_lm.server.engine import Engine, Event, Sequence
from kimi_lm.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_param


class ServerConfig:
    def __init__(self, model_name: str, context_length: int, api_key: str | None = None,
                 default_max_tokens: int = 512, default_temperature: float = 1.0):
        self.model_name, self.context_length, self.api_key = model_name, context_length, api_key
        self.default_max_tokens, self.default_temperature = default_max_tokens, default_temperature


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="kimi-lm", docs_url=None, redoc_url=None)
    app.state.engine, app.state.config = engine, config
    tok = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return JSONResponse(APIError("malformed JSON body: " + err.get("msg", ""), None, "invalid_json").body(), 400)
        param = error_param(tuple(err.get("loc", ())))
        return JSONResponse(APIError(f"{param or 'body'}: {err.get('msg')}", param, "invalid_value").body(), 400)

    async def auth(request: Request) -> None:
        if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise APIError("missing or wrong API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key",
                           status=401)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.num_active}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "kimi-lm", "max_model_len": config.context_length}]}

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {config.model_name!r}", "model",
                           "model_not_found")

    def sequences(req, ids: list[int], param: str, logprobs: int | None, emit_for) -> list[Sequence]:
        """``n`` sequences for one prompt, after every check that needs the model."""
        if not ids:
            raise APIError("the prompt is empty", param)
        vocab = engine.model.config.vocab_size
        if any(not 0 <= i < min(vocab, tok.n_vocab) for i in ids):
            raise APIError(f"prompt token ids must be in [0, {min(vocab, tok.n_vocab)})", param)
        limit = config.context_length
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if len(ids) + (max_tokens or 1) > limit:
            raise APIError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                           f"tokens and {max_tokens or 1} more were requested", param, "context_length_exceeded")
        max_tokens = max_tokens or min(config.default_max_tokens, limit - len(ids))
        try:
            bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        except ValueError:
            raise APIError("logit_bias keys must be token ids", "logit_bias") from None
        if any(not 0 <= k < vocab for k in bias) or any(abs(v) > 100 for v in bias.values()):
            raise APIError(f"logit_bias keys must be token ids in [0, {vocab}) and values in [-100, 100]",
                           "logit_bias")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        out = []
        for i in range(req.n):
            params = SamplingParams(
                temperature=config.default_temperature if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                logit_bias=bias or None, seed=None if req.seed is None else req.seed + i)
            try:
                sampler = Sampler(params, device=engine.model.device)
            except ValueError as exc:
                raise APIError(str(exc), str(exc).split()[0]) from None
            stop_ids = tok.stop_token_ids | set(req.stop_token_ids or [])
            out.append(Sequence(ids, sampler, max_tokens, emit_for(i), stop, stop_ids, logprobs))
        return out

    async def run(seqs_for) -> tuple[asyncio.Queue, list[Sequence]]:
        """Submit sequences; events arrive on the returned queue as (choice index, Event)."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def emit_for(i):
            def emit(ev: Event):
                try:
                    loop.call_soon_threadsafe(q.put_nowait, (i, ev))
                except RuntimeError:  # the loop is closed: the server is shutting down
                    pass
            return emit

        seqs = seqs_for(emit_for)
        for s in seqs:
            engine.submit(s)
        return q, seqs

    async def events(q: asyncio.Queue, seqs: list[Sequence]):
        """(index, Event) until every sequence has finished; cancels the rest if the consumer goes away."""
        left = len(seqs)
        try:
            while left:
                i, ev = await q.get()
                if ev.finish_reason == "error":
                    raise APIError(f"generation failed: {ev.error}", None, "internal_error", 500, "server_error")
                left -= ev.finish_reason is not None
                yield i, ev
        finally:
            for s in seqs:
                s.cancel()

    def token_text(t: int) -> tuple[str, list[int]]:
        b = tok.token_bytes(t) if 0 <= t < tok.n_vocab else b""
        return b.decode("utf-8", errors="replace"), list(b)

    def chat_logprobs(ev: Event) -> dict:
        text, b = token_text(ev.token)
        top = [{"token": token_text(t)[0], "logprob": lp, "bytes": token_text(t)[1]} for t, lp in ev.top_logprobs or []]
        return {"token": text, "logprob": ev.logprob, "bytes": b, "top_logprobs": top}

    def usage(prompt_tokens: int, completion: int, cached: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- /v1/chat/completions -----------------------------------------------------------------------------------
    def chat_prompt(req: ChatCompletionRequest) -> tuple[list[int], str, int]:
        """Token ids, the forced start of the reply (tool_choice), and the first tool-call index."""
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:
            for call in m.get("tool_calls") or []:  # the template wants arguments as the JSON text the model wrote
                if isinstance(call["function"]["arguments"], dict):
                    call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice
        first = count_tool_calls(messages)
        forced = ""
        if choice is not None and choice != "none" and choice != "auto" and not tools:
            raise APIError("tool_choice needs tools", "tool_choice")
        if choice == "required":  # the reply must open a call; the model picks the function
            forced = f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions."
        elif choice not in (None, "none", "auto"):
            name = choice.function["name"]
            if name not in {t["function"]["name"] for t in tools}:
                raise APIError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
            forced = f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions.{name}:{first}{ARGS_BEGIN}"
        try:
            text = tok.apply_chat_template(messages, tools=None if choice == "none" else tools,
                                           add_generation_prompt=True, **(req.chat_template_kwargs or {}))
        except ValueError as exc:
            raise APIError(str(exc), "messages") from None
        return tok.encode(text + forced), forced, first

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        ids, forced, first = chat_prompt(req)
        k = (req.top_logprobs or 0) if req.logprobs else None
        q, seqs = await run(lambda emit_for: sequences(req, ids, "messages", k, emit_for))
        parsers = [ToolCallParser(first, thinking=tok.has_thinking) for _ in seqs]
        called = [False] * len(seqs)  # a reply that made a good tool call finishes with "tool_calls"
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def parse(i: int, ev: Event) -> tuple[dict, str | None]:
            """Event -> (delta message, finish_reason), tool-call markers turned into tool_calls."""
            d = parsers[i].feed(ev.text)
            if ev.finish_reason:
                d += parsers[i].finish()
            delta = {}
            if d.content:
                delta["content"] = d.content
            if d.reasoning:
                delta["reasoning_content"] = d.reasoning
            calls = [c for c in d.tool_calls if c.error is None]
            if calls:
                delta["tool_calls"] = calls
                called[i] = True
            finish = ev.finish_reason
            return delta, "tool_calls" if finish == "stop" and called[i] else finish

        for p in parsers:  # the forced opening is part of the reply: the parser must see it
            p.feed(forced)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices, usage_=None) -> str:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": config.model_name, "choices": choices}
                if include_usage:
                    body["usage"] = usage_
                return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

            async def stream():
                n_calls = [0] * len(seqs)
                completion, last = 0, None
                for i in range(len(seqs)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                try:
                    async for i, ev in events(q, seqs):
                        delta, finish = parse(i, ev)
                        if "tool_calls" in delta:
                            calls = delta["tool_calls"]
                            delta["tool_calls"] = [{"index": n_calls[i] + j, **c.to_message()} for j, c in enumerate(calls)]
                            n_calls[i] += len(calls)
                        lp = {"content": [chat_logprobs(ev)]} if k is not None else None
                        if delta or finish or lp:
                            yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}])
                        completion += finish is not None and ev.completion_tokens
                        last = ev
                except APIError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    return
                if include_usage:
                    yield chunk([], usage(last.prompt_tokens, completion, last.cached_tokens))
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(len(seqs))]
        calls = [[] for _ in seqs]
        lps = [[] for _ in seqs]
        completion = cached = 0
        async for i, ev in events(q, seqs):
            delta, finish = parse(i, ev)
            msg = choices[i]["message"]
            msg["content"] += delta.get("content", "")
            if "reasoning_content" in delta:
                msg["reasoning_content"] = msg.get("reasoning_content", "") + delta["reasoning_content"]
            calls[i] += delta.get("tool_calls", [])
            if k is not None:
                lps[i].append(chat_logprobs(ev))
            if finish:
                choices[i]["finish_reason"] = finish
                completion += ev.completion_tokens
                cached = ev.cached_tokens
        for i, c in enumerate(choices):
            if calls[i]:
                c["message"]["tool_calls"] = [t.to_message() for t in calls[i]]
                c["message"]["content"] = c["message"]["content"] or None
            if k is not None:
                c["logprobs"] = {"content": lps[i]}
        return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": choices, "usage": usage(len(ids), completion, cached)}

    # ---- /v1/completions ------------------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: CompletionRequest):
        check_model(req.model)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError("the prompt is empty", "prompt")
        ids_list = [tok.encode(x) if isinstance(x, str) else list(x) for x in prompts]

        def make(emit_for):
            return [s for j, ids in enumerate(ids_list)
                    for s in sequences(req, ids, "prompt", req.logprobs,
                                       lambda i, j=j: emit_for(j * req.n + i))]

        q, seqs = await run(make)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [tok.decode(ids) if req.echo else "" for ids in ids_list for _ in range(req.n)]

        def logprobs_of(ev: Event, offset: int) -> dict:
            text = token_text(ev.token)[0]
            return {"tokens": [text], "token_logprobs": [ev.logprob], "text_offset": [offset],
                    "top_logprobs": [{token_text(t)[0]: lp for t, lp in ev.top_logprobs or []}]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices, usage_=None) -> str:
                body = {"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                        "choices": choices}
                if include_usage:
                    body["usage"] = usage_
                return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

            async def stream():
                offsets = [len(e) for e in echo]
                totals = [0, 0, 0]
                for i, e in enumerate(echo):
                    if e:
                        yield chunk([{"index": i, "text": e, "logprobs": None, "finish_reason": None}])
                try:
                    async for i, ev in events(q, seqs):
                        lp = logprobs_of(ev, offsets[i]) if req.logprobs is not None else None
                        offsets[i] += len(ev.text)
                        yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
                        if ev.finish_reason:
                            totals[1] += ev.completion_tokens
                            totals[2] += ev.cached_tokens
                except APIError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    return
                if include_usage:
                    yield chunk([], usage(sum(map(len, ids_list)) * req.n, totals[1], totals[2]))
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        choices = [{"index": i, "text": e, "logprobs": None, "finish_reason": None} for i, e in enumerate(echo)]
        merged = [{"tokens": [], "token_logprobs": [], "text_offset": [], "top_logprobs": []} for _ in choices]
        completion = cached = 0
        async for i, ev in events(q, seqs):
            if req.logprobs is not None:
                for key, v in logprobs_of(ev, len(choices[i]["text"])).items():
                    merged[i][key] += v
            choices[i]["text"] += ev.text
            if ev.finish_reason:
                choices[i]["finish_reason"] = ev.finish_reason
                completion += ev.completion_tokens
                cached += ev.cached_tokens
        if req.logprobs is not None:
            for c, m in zip(choices, merged):
                c["logprobs"] = m
        return {"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                "choices": choices, "usage": usage(sum(map(len, ids_list)) * req.n, completion, cached)}

    return app
