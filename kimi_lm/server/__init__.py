"""``kimi-lm serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching and prefix reuse.

    kimi-lm serve --model DIR [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--max-batch-size 32]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="KEY or anything")
    client.chat.completions.create(model="DIR-name", messages=[{"role": "user", "content": "Hi"}], stream=True)

Layout: ``protocol.py`` (request schemas, error body) · ``engine.py`` (scheduler thread, batching, prefix-cache
pool) · ``app.py`` (routes, SSE). It binds 127.0.0.1 unless ``--host`` says otherwise; chat templates render in the
jinja2 sandbox (:mod:`kimi_lm.chat`).

Reference: mlx-lm ``server.py`` (flags, defaults); vLLM's OpenAI server (request fields, errors, usage chunk).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from kimi_lm.generate import DEFAULT_PREFILL_STEP, Parser, add_model_args, load_model_and_tokenizer, run_command
from kimi_lm.server.app import ServerConfig, create_app
from kimi_lm.server.engine import Engine

__all__ = ["Engine", "ServerConfig", "create_app", "main"]


def _parser() -> Parser:
    p = Parser(prog="kimi-lm serve", description="Serve a Kimi Linear model with an OpenAI-compatible API.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", help="the model id clients send (default: the model directory's name)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-kv-size", type=int, help="MLA layers keep only the last N tokens (sliding window)")
    p.add_argument("--max-context", type=int, help="longest prompt + completion (default: the model's limit)")
    p.add_argument("--max-tokens", type=int, default=512, help="completion length when a request gives none")
    p.add_argument("--temp", type=float, default=1.0, help="temperature when a request gives none (OpenAI: 1)")
    p.add_argument("--prompt-cache-bytes", type=int, default=2 << 30,
                   help="prefix-cache pool size in bytes (default 2 GiB; 0 disables prefix reuse)")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP, help="prompt tokens per forward")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return p


def context_length(config) -> int:
    """The model's own limit: Kimi Linear's ``model_max_length``, K2's ``max_position_embeddings``."""
    return getattr(config, "model_max_length", None) or getattr(config, "max_position_embeddings", None) or 1 << 20


def _load_without_a_thread_team(args):
    """Load on this thread with one torch thread, so that the scheduler thread is the only one that ever starts an
    OpenMP team. GNU OpenMP throttles its workers' spin-waiting once more worker threads exist than CPUs (here: the
    main thread's team plus the scheduler's), and then every parallel product pays a futex wake-up: measured, a
    packed 1 MB decode product took 140 µs on the scheduler thread instead of 62 µs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_model_and_tokenizer(args)
    finally:
        torch.set_num_threads(threads)


def _main(argv) -> int:
    import uvicorn

    args = _parser().parse_args(argv)
    for flag, value in (("--port", args.port), ("--max-batch-size", args.max_batch_size),
                        ("--max-tokens", args.max_tokens), ("--max-context", args.max_context),
                        ("--max-kv-size", args.max_kv_size)):
        if value is not None and value < (0 if flag == "--port" else 1):
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    model, tokenizer = _load_without_a_thread_team(args)
    if tokenizer.chat_template is None:
        logging.warning("%s has no chat template: /v1/chat/completions will answer 400", args.model)
    engine = Engine(model, tokenizer, args.max_batch_size, args.max_kv_size, args.prompt_cache_bytes,
                    args.prefill_step_size)
    config = ServerConfig(args.served_model_name or Path(args.model).resolve().name,
                          args.max_context or context_length(model.config), args.api_key, args.max_tokens, args.temp)
    try:
        uvicorn.run(create_app(engine, config), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm serve``; bad flags or checkpoint: one line on stderr and exit 2."""
    return run_command("kimi-lm serve", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
