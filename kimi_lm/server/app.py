"""The FastAPI app: OpenAI's ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``.

Each route is a few lines: validate (pydantic, then :mod:`kimi_lm.server.translate` for the checks that need the
model), submit ``n`` sequences per prompt to the engine, and answer through :mod:`kimi_lm.server.responses` (one
JSON body or Server-Sent Events). Prompts are rendered and tokenised on a worker thread: a megabyte of text takes
about a second to encode and must not stall the event loop that streams everyone else's tokens.

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input (schema errors included, with
``param`` naming the field), 401 for a missing or wrong API key (compared in constant time), 404 / 405 for unknown
routes or methods, 500 if the engine fails on a request, 503 while it shuts down.

References: OpenAI API reference; vLLM ``entrypoints/openai/api_server.py`` (error bodies, /health); mlx-lm
``server.py``.
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kimi_lm.server import responses, translate
from kimi_lm.server.engine import Engine
from kimi_lm.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_param
from kimi_lm.server.translate import ServerConfig

ROUTES = "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health"


def _add_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):  # unknown route (404), wrong method (405), ...
        if exc.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}; this server has {ROUTES}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}; routes: {ROUTES}", \
                "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return JSONResponse(APIError(message, None, code, exc.status_code).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="kimi-lm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config = engine, config
    tok = engine.tokenizer
    _add_error_handlers(app)
    expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def auth(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):  # constant time: no timing oracle
            raise APIError("missing or wrong API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key",
                           status=401)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "active": engine.num_active, **engine.stats()}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "kimi-lm", "max_model_len": config.context_length}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        translate.check_model(config, req.model)
        prompt = await asyncio.to_thread(translate.chat_prompt, tok, req)
        k = (req.top_logprobs or 0) if req.logprobs else None
        q, seqs = await responses.submit(
            engine, lambda emit_for: translate.sequences(engine, config, req, prompt.ids, "messages", k, emit_for))
        replies = responses.ChatReplies(tok, len(seqs), prompt.ids, prompt.forced, prompt.first_call, k)
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        reply = responses.Reply("chatcmpl", "chat.completion.chunk", config.model_name, include_usage)
        if req.stream:
            return responses.chat_stream(reply, replies, q, seqs)
        return await responses.chat_body(reply, replies, q, seqs, len(prompt.ids), request)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: CompletionRequest, request: Request):
        translate.check_model(config, req.model)
        ids_list = await asyncio.to_thread(translate.completion_prompts, tok, req)

        def make(emit_for):
            return [s for j, ids in enumerate(ids_list)
                    for s in translate.sequences(engine, config, req, ids, "prompt", req.logprobs,
                                                 lambda i, j=j: emit_for(j * req.n + i))]

        q, seqs = await responses.submit(engine, make)
        echo = [tok.decode(ids) if req.echo else "" for ids in ids_list for _ in range(req.n)]
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        reply = responses.Reply("cmpl", "text_completion", config.model_name, include_usage)
        prompt_tokens = sum(map(len, ids_list)) * req.n
        if req.stream:
            return responses.completion_stream(reply, tok, q, seqs, echo, req.logprobs, prompt_tokens)
        return await responses.completion_body(reply, tok, q, seqs, echo, req.logprobs, prompt_tokens, request)

    return app
