"""``kimi-lm serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching, chunked prefill
and prefix reuse.

    kimi-lm serve --model DIR [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--max-batch-size 32]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="KEY or anything")
    client.chat.completions.create(model="DIR-name", messages=[{"role": "user", "content": "Hi"}], stream=True)

Layout: ``protocol.py`` (request schemas, error body) · ``translate.py`` (request -> token ids and sequences, the
checks that need the model) · ``engine.py`` (scheduler thread: chunked prefill, batched decode, prefix-cache pool)
· ``responses.py`` (events -> JSON bodies and SSE) · ``app.py`` (routes, error handlers, auth). It binds 127.0.0.1
unless ``--host`` says otherwise (and warns when another address is bound without ``--api-key``); chat templates
render in the jinja2 sandbox (:mod:`kimi_lm.chat`). At start it prints one line saying what it serves and where;
SIGTERM or Ctrl-C stops the engine at once (in-flight requests get a 503), so shutdown takes seconds even in the
middle of a long prefill.

A model split over processes (``torchrun --nproc-per-node N -m kimi_lm serve --tp N [--ep N]``) is served by rank 0
while every rank runs the same scheduler in lockstep (:mod:`kimi_lm.distributed.serve`).

Reference: mlx-lm ``server.py`` (flags, defaults); vLLM's OpenAI server (request fields, errors, usage chunk,
``--max-model-len``-style limits).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import uvicorn

from kimi_lm.cli_args import (DEFAULT_PREFILL_STEP, Parser, add_model_args, check_positive, load_model_and_tokenizer,
                              run_command)
from kimi_lm.errors import UsageError
from kimi_lm.generate import add_chat_template_arg
from kimi_lm.server.app import create_app
from kimi_lm.server.engine import Engine, pool_bytes_for
from kimi_lm.server.translate import DEFAULT_MAX_PROMPT_TOKENS, ServerConfig

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

__all__ = ["Engine", "ServerConfig", "create_app", "exposure_warning", "main"]


def _parser() -> Parser:
    p = Parser(prog="kimi-lm serve", description="Serve a Kimi Linear model with an OpenAI-compatible API.")
    add_model_args(p)
    add_chat_template_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (unset: no key)")
    p.add_argument("--served-model-name", help="the model id clients send (unset: the model directory's name)")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests prefilled or decoded together")
    p.add_argument("--max-kv-size", type=int, help="MLA layers keep only the last N tokens (sliding window; "
                                                    "unset: all)")
    p.add_argument("--max-context", type=int, help="longest prompt + completion (unset: the model's limit)")
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help="longer prompts get HTTP 400 before any work (capped by --max-context)")
    p.add_argument("--max-tokens", type=int, default=512, help="completion length when a request gives none")
    p.add_argument("--temp", type=float, default=1.0, help="temperature when a request gives none (OpenAI's)")
    p.add_argument("--prompt-cache-bytes", type=int,
                   help="prefix-cache pool size in bytes; 0 disables prefix reuse (unset: room for --max-batch-size "
                        "requests of 4096 tokens, at most 2 GiB)")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP,
                   help="prompt tokens per forward; other requests decode between two such chunks")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    return p


def context_length(config) -> int:
    """The model's own limit: Kimi Linear's ``model_max_length``, K2's ``max_position_embeddings``."""
    return getattr(config, "model_max_length", None) or getattr(config, "max_position_embeddings", None) or 1 << 20


def _check_flags(args) -> None:
    check_positive(("--max-batch-size", args.max_batch_size), ("--max-tokens", args.max_tokens),
                   ("--max-context", args.max_context), ("--max-kv-size", args.max_kv_size),
                   ("--max-prompt-tokens", args.max_prompt_tokens), ("--prefill-step-size", args.prefill_step_size))
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 0:
        raise UsageError(f"--prompt-cache-bytes must be >= 0, got {args.prompt_cache_bytes}")


def startup_line(args, model, config: ServerConfig, pool_bytes: int) -> str:
    """The one line that says what is served, where, and with which limits."""
    import torch

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    host = f"[{args.host}]" if ":" in args.host else args.host
    plan = getattr(model, "parallel_plan", None)
    split = f", {plan.size} ranks: --tp {plan.tp} --ep {plan.ep}" if plan is not None and plan.size > 1 else ""
    return (f"kimi-lm serve: {args.model} as {config.model_name!r} ({model.config.model_type}, "
            f"{str(dtype).removeprefix('torch.')}, {model.device}{split}) at http://{host}:{args.port}/v1; prompts up to "
            f"{config.max_prompt_tokens} tokens, context {config.context_length}, prefix cache "
            f"{pool_bytes / 2**20:.0f} MiB")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server is reachable from other machines and anyone there may use it."""
    if host in LOOPBACK or api_key:
        return None
    return (f"kimi-lm serve: warning: binding {host} without --api-key: anyone who can reach this address can use "
            f"the model; pass --api-key KEY (or bind 127.0.0.1)")


class _Server(uvicorn.Server):
    """uvicorn.Server whose first SIGINT / SIGTERM also stops the engine: in-flight requests then end with a 503
    at once, instead of uvicorn waiting for them (a long prefill would keep it waiting for minutes)."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine
        self.signals: list[int] = []

    def handle_exit(self, sig, frame):
        self.engine.stop()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signals it caught once it has stopped, and SIGTERM's default action would end the
        # process before the engine is closed (a split run's other ranks would never hear of the shutdown): keep
        # them for _main to re-raise afterwards
        self.signals += getattr(self, "_captured_signals", [])
        self._captured_signals = []


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    _check_flags(args)
    model, tokenizer = load_model_and_tokenizer(args)  # the Engine lets this thread's OpenMP team go
    if not tokenizer.has_chat_format:
        logging.warning("%s has no chat template: /v1/chat/completions will answer 400", args.model)
    pool = pool_bytes_for(model, args.max_batch_size) if args.prompt_cache_bytes is None else args.prompt_cache_bytes
    engine_args = (model, tokenizer, args.max_batch_size, args.max_kv_size, pool, args.prefill_step_size)
    plan, servers = getattr(model, "parallel_plan", None), []  # servers: what a failed split run stops
    if plan is not None and plan.size > 1:  # a split run: every rank runs the engine, rank 0 alone serves HTTP
        from kimi_lm.distributed.serve import LockstepEngine, follow

        engine = LockstepEngine(*engine_args, on_fatal=lambda: servers and setattr(servers[0], "should_exit", True))
        if not engine.is_main:
            return follow(engine)
    else:
        engine = Engine(*engine_args)
    context = args.max_context or context_length(model.config)
    config = ServerConfig(args.served_model_name or Path(args.model).resolve().name, context, args.api_key,
                          args.max_tokens, args.temp, min(args.max_prompt_tokens, context))
    print(startup_line(args, model, config, pool), file=sys.stderr, flush=True)
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    server = _Server(uvicorn.Config(create_app(engine, config), host=args.host, port=args.port,
                                    log_level=args.log_level, timeout_graceful_shutdown=5), engine)
    servers.append(server)
    try:
        if not getattr(engine, "error", None):
            server.run()
    finally:
        engine.close()
    if plan is None or plan.size == 1:  # one process: end as uvicorn would (by the signal)
        for sig in reversed(server.signals):
            signal.raise_signal(sig)
    return 1 if getattr(engine, "error", None) else 0  # a split run stopped by a signal ends 0: torchrun ends quietly


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm serve``; bad flags or checkpoint: one line on stderr and exit 2."""
    return run_command("kimi-lm serve", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
