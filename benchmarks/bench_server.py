"""Serving throughput: one streaming client vs 8 concurrent ones, through HTTP and the real ``openai`` client.

    python benchmarks/bench_server.py [--model DIR] [--tokens 64] [--clients 8] [--repeats 3]

The server runs as ``kimi-lm serve`` in its own process, the clients in this one. Without ``--model`` it serves a
random model of the ``bench`` preset (~66M parameters, fp32) with the tiny test tokenizer. Stop tokens get a -100
logit bias so every request generates exactly ``--tokens`` tokens. Continuous batching should make the 8-client
aggregate several times one client's rate (the issue asks for >= 3x). The two measurements alternate for
``--repeats`` rounds and the best of each is kept (this shared box moves single runs by 30 %; the clients share its
cores with the server). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import urllib.request
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def random_bench_checkpoint(directory: Path) -> Path:
    from tiny_chat import CORPUS, TEMPLATE, train_bpe, write_tokenizer

    from kimi_lm.config import preset
    from kimi_lm.model.kimi_linear import KimiLinearForCausalLM

    n = write_tokenizer(directory, train_bpe(CORPUS, merges=60), TEMPLATE.read_text())
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(dataclasses.replace(preset("bench"), vocab_size=n + 256))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return directory


def start_server(path: Path, threads: int, clients: int) -> tuple[subprocess.Popen, str]:
    """``kimi-lm serve`` in its own process (as it runs for users), on a free localhost port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kimi_lm.cli", "serve", "--model", str(path), "--dtype", "float32", "--port", str(port),
         "--served-model-name", "bench", "--max-batch-size", str(clients), "--prompt-cache-bytes", "0",
         "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit("bench_server: the server did not start")
            time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: a random bench-preset model)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server process")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (1 client, N clients); the best of each kept")
    args = p.parse_args()

    from openai import OpenAI

    import kimi_lm

    tmp_dir = tempfile.TemporaryDirectory(prefix="kimi-bench-server-")  # removed when the script ends
    path = Path(args.model) if args.model else random_bench_checkpoint(Path(tmp_dir.name))
    tok = kimi_lm.load_tokenizer(path)
    proc, url = start_server(path, args.threads, args.clients)
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    bias = {str(i): -100 for i in tok.stop_token_ids}

    def one(i: int) -> int:
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"hello world {i}"}], max_tokens=args.tokens,
            temperature=0, logit_bias=bias, stream=True, stream_options={"include_usage": True})
        return [c for c in stream][-1].usage.completion_tokens

    try:
        one(-1)  # warm-up
        best = {}
        for _ in range(args.repeats):  # alternating, so that other load on the box hits both alike; best of each
            for clients in (1, args.clients):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    total = sum(pool.map(one, range(clients)))
                dt = time.perf_counter() - t0
                if clients not in best or total / dt > best[clients][3]:
                    best[clients] = (clients, total, dt, total / dt)
        rows = [best[1], best[args.clients]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"{'clients':>8} {'tokens':>8} {'seconds':>8} {'tok/s':>8}")
    for c, n, dt, tps in rows:
        print(f"{c:>8} {n:>8} {dt:>8.2f} {tps:>8.1f}")
    single, multi = rows[0][3], rows[1][3]
    print(json.dumps({"model": str(args.model or "random bench preset"), "threads": args.threads,
                      "tokens_per_request": args.tokens, "repeats": args.repeats,
                      "single_client_tok_s": round(single, 1),
                      f"{args.clients}_client_aggregate_tok_s": round(multi, 1), "ratio": round(multi / single, 2)}))


if __name__ == "__main__":
    main()
