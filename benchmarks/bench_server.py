"""Serving throughput: one streaming client vs 8 concurrent ones, through HTTP and the real ``openai`` client.

    python benchmarks/bench_server.py [--model DIR] [--tokens 64] [--clients 8]

Without ``--model`` it serves a random model of the ``bench`` preset (~66M parameters, fp32) with the tiny test
tokenizer. Stop tokens get a -100 logit bias so every request generates exactly ``--tokens`` tokens. Continuous
batching should make the 8-client aggregate several times one client's rate (the issue asks for >= 3x). Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def random_bench_checkpoint(directory: Path) -> Path:
    from tiny_chat import CORPUS, train_bpe, write_tokenizer

    from kimi_lm.config import preset
    from kimi_lm.model.kimi_linear import KimiLinearForCausalLM

    n = write_tokenizer(directory, train_bpe(CORPUS, merges=60))
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(dataclasses.replace(preset("bench"), vocab_size=n + 256))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: a random bench-preset model)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import kimi_lm
    from kimi_lm.server import ServerConfig, create_app
    from kimi_lm.server.engine import Engine
    from test_server import Server  # uvicorn on a free localhost port, in a thread

    path = Path(args.model) if args.model else random_bench_checkpoint(Path(tempfile.mkdtemp()))
    model, tok = kimi_lm.load(path, dtype=torch.float32), kimi_lm.load_tokenizer(path)
    engine = Engine(model, tok, max_batch_size=max(args.clients, 1), prompt_cache_bytes=0)
    server = Server(create_app(engine, ServerConfig("bench", 1 << 20)))
    client = server.client()
    bias = {str(i): -100 for i in tok.stop_token_ids}

    def one(i: int) -> int:
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"hello world {i}"}], max_tokens=args.tokens,
            temperature=0, logit_bias=bias, stream=True, stream_options={"include_usage": True})
        return [c for c in stream][-1].usage.completion_tokens

    one(-1)  # warm-up
    rows = []
    for clients in (1, args.clients):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            total = sum(pool.map(one, range(clients)))
        dt = time.perf_counter() - t0
        rows.append((clients, total, dt, total / dt))
    server.close()
    engine.close()

    print(f"{'clients':>8} {'tokens':>8} {'seconds':>8} {'tok/s':>8}")
    for c, n, dt, tps in rows:
        print(f"{c:>8} {n:>8} {dt:>8.2f} {tps:>8.1f}")
    single, multi = rows[0][3], rows[1][3]
    print(json.dumps({"model": str(args.model or "random bench preset"), "threads": args.threads,
                      "tokens_per_request": args.tokens, "single_client_tok_s": round(single, 1),
                      f"{args.clients}_client_aggregate_tok_s": round(multi, 1), "ratio": round(multi / single, 2)}))


if __name__ == "__main__":
    main()
