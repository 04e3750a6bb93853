"""``torchrun --nproc-per-node 2 -m kimi_lm serve --tp 2 --ep 2``: the OpenAI server over a split model (issue 22).

Real launches (``torchrun --standalone``, gloo on CPU) serving the tiny chat checkpoint (tests/tiny_chat.py: 2 MLA
heads, 2 KDA heads, 8 experts), fp32. The oracle is ``kimi_lm.generate`` on the same checkpoint in this process:
greedy replies (one request, two at once, streamed) must be its text. Then the shutdown paths: SIGTERM to torchrun
(what Ctrl-C or a service manager does) ends every process within seconds without torchrun's SIGKILL; a rank that
dies makes rank 0 print one line and the job end. Without a launch: two lockstep engines in this process over a
stand-in for ``torch.distributed.broadcast`` check that the follower takes rank 0's decisions (admission, sampled
tokens, cancellation, prefix-cache pool) and that a follower whose scheduler disagrees stops with a message.
"""

from __future__ import annotations

import json
import os
import threading
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import kimi_lm
from kimi_lm.distributed import serve as lockstep
from kimi_lm.sample import Sampler, SamplingParams
from kimi_lm.server.engine import Sequence
from tiny_chat import chat_checkpoint

HERE = Path(__file__).resolve().parent
SHUTDOWN_S = 10  # every process gone this long after the signal (torchrun's own SIGKILL comes at 30 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its parent has not reaped it yet)


class SplitServer:
    """``torchrun --standalone --nproc-per-node 2 -m kimi_lm serve ARGS`` on a free localhost port."""

    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
        env.pop("WORLD_SIZE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kimi_lm",
             "serve", "--model", str(model), "--port", str(self.port), "--dtype", "float32", "--temp", "0",
             "--log-level", "warning", *args], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.time() < deadline, "the split server did not come up"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        self.ranks = children(self.proc.pid)

    def post(self, route: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + route, json=body, timeout=120)

    def stop(self, sig=signal.SIGTERM, pid: int | None = None) -> tuple[float, str]:
        """Send ``sig`` to ``pid`` (default torchrun); (seconds until torchrun and both ranks are gone, its stderr)."""
        t0 = time.monotonic()
        os.kill(pid or self.proc.pid, sig)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            for r in self.ranks:
                os.kill(r, signal.SIGKILL)
            raise
        while any(alive(r) for r in self.ranks) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        return time.monotonic() - t0, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            for r in self.ranks:
                if alive(r):
                    os.kill(r, signal.SIGKILL)
            self.proc.communicate()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = chat_checkpoint(tmp_path_factory)
    return path, kimi_lm.load(path, dtype=torch.float32), kimi_lm.load_tokenizer(path)


def greedy(model, tok, ids: list[int], max_tokens: int) -> tuple[str, str]:
    """One process's greedy text and finish reason for ``ids``."""
    steps = list(kimi_lm.stream_generate(model, tok, ids, max_tokens=max_tokens, temperature=0))
    return "".join(s.text for s in steps), steps[-1].finish_reason


def sse_text(body: str) -> tuple[str, str | None]:
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0].get("text", "") for c in chunks if c["choices"])
    return text, [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]


def test_split_serve_matches_one_process_and_stops_on_sigterm(chat_model):
    path, model, tok = chat_model
    server = SplitServer(path, "--tp", "2", "--ep", "2")
    try:
        assert len(server.ranks) == 2
        # one chat completion: the reply of one process
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
        ids = tok.apply_chat_template(messages, tokenize=True)
        expected, finish = greedy(model, tok, ids, 12)
        r = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0}).json()
        assert r["choices"][0]["message"]["content"] == expected and r["choices"][0]["finish_reason"] == finish
        assert r["usage"]["prompt_tokens"] == len(ids)
        again = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 12}).json()
        assert again["choices"][0]["message"]["content"] == expected  # from the prefix-cache pool, on every rank
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(ids)

        # two requests at once (batched decode steps over both ranks): each gets its own one-process reply
        prompts = ["The quick brown fox", "12345 hello again, world. the then"]
        want = [greedy(model, tok, tok.encode(p), 16) for p in prompts]
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: server.post("/v1/completions", {"prompt": p, "max_tokens": 16}).json(),
                                prompts))
        assert [(g["choices"][0]["text"], g["choices"][0]["finish_reason"]) for g in got] == want

        # streamed: the chunks add up to the same text
        stream = server.post("/v1/completions", {"prompt": prompts[0], "max_tokens": 16, "stream": True})
        assert sse_text(stream.text) == want[0]

        # a client that goes away mid-stream: every rank drops its sequence, and the server goes on
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": prompts[1], "max_tokens": 400, "stream": True}) as gone:
            for n, _ in enumerate(gone.iter_lines()):
                if n == 6:
                    break
        assert server.post("/v1/completions", {"prompt": prompts[1], "max_tokens": 16}).json()["choices"][0][
            "text"] == want[1][0]
        deadline = time.time() + 10  # (a reply is sent before the scheduler's lists are updated: poll)
        while (health := httpx.get(server.url + "/health").json())["active"] and time.time() < deadline:
            time.sleep(0.05)
        assert (health["active"], health["waiting"]) == (0, 0)
    except BaseException:
        server.kill()
        raise
    took, err = server.stop(signal.SIGTERM)
    assert took < SHUTDOWN_S, err[-3000:]
    assert "forcefully exiting" not in err  # torchrun did not have to SIGKILL a rank
    assert f"(kimi_linear, float32, cpu, 2 ranks: --tp 2 --ep 2) at http://127.0.0.1:{server.port}/v1" in err


@pytest.mark.slow  # ~40 s: two more launches
def test_split_serve_rank0_sigterm_ends_the_job_cleanly_and_a_dead_rank_ends_it_with_one_line(chat_model):
    path, model, tok = chat_model
    server = SplitServer(path, "--ep", "2")  # experts split, attention replicated
    try:
        r = server.post("/v1/completions", {"prompt": "hello", "max_tokens": 8}).json()
        assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == greedy(model, tok, tok.encode("hello"), 8)
    except BaseException:
        server.kill()
        raise
    took, err = server.stop(signal.SIGTERM, server.ranks[0])  # rank 0 alone: it tells the other rank
    assert took < SHUTDOWN_S and server.proc.returncode == 0, err[-3000:]  # every rank ended 0

    server = SplitServer(path, "--tp", "2")
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": "hello", "max_tokens": 2000, "stream": True}) as r:
            lines = r.iter_lines()
            head = [next(lines) for _ in range(4)]
            os.kill(server.ranks[1], signal.SIGKILL)
            rest = "\n".join(lines)  # the stream in flight ends with an error event, not a hang
        assert '"text"' in head[0] and '"code": "server_shutting_down"' in rest and "[DONE]" not in rest
        server.proc.wait(timeout=SHUTDOWN_S)
    finally:
        server.kill()
    err = server.proc.stderr.read()
    assert server.proc.returncode != 0 and not any(alive(r) for r in server.ranks)
    assert err.count("kimi-lm serve: the split run stopped on rank 0:") == 1, err[-3000:]


class ThreadDist:
    """``get_rank`` / ``broadcast`` between engines of this process: rank r is the engine whose scheduler thread
    is registered as r (the engine made on a thread registered as r)."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=60)
        self.ranks: dict[int, int] = {}
        self.slot = None

    def rank(self) -> int:
        while threading.get_ident() not in self.ranks:  # a scheduler thread starts before it is registered
            time.sleep(0.001)
        return self.ranks[threading.get_ident()]

    get_rank = rank

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        if self.rank() == src:
            self.slot = t.clone()
        self.barrier.wait()
        if self.rank() != src:
            assert t.shape == self.slot.shape, (t.shape, self.slot.shape)
            t.copy_(self.slot)
        self.barrier.wait()


def lockstep_pair(monkeypatch, model, tok, follower_step: int = 16, follower_pool: int = 1 << 26):
    """(rank 0's engine, the follower's engine, the follower's sequences as they arrive, with their events)."""
    fake = ThreadDist(2)
    monkeypatch.setattr(lockstep, "dist", fake)
    received = []

    def recording(spec, device):
        seq = lockstep._sequence.__wrapped__(spec, device)
        seq.events = []
        seq.emit = seq.events.append
        received.append(seq)
        return seq

    recording.__wrapped__ = lockstep._sequence
    monkeypatch.setattr(lockstep, "_sequence", recording)
    engines = []
    for rank, step, pool in ((0, 16, 1 << 26), (1, follower_step, follower_pool)):
        fake.ranks[threading.get_ident()] = rank
        engine = lockstep.LockstepEngine(model, tok, 4, None, pool, step, on_fatal=fake.barrier.abort)
        fake.ranks[engine._thread.ident] = rank
        engines.append(engine)
    return engines[0], engines[1], received


def submit(engine, ids, max_tokens, on_event=None, **params) -> tuple[Sequence, list, threading.Event]:
    events, done = [], threading.Event()

    def emit(ev):
        events.append(ev)
        if on_event:
            on_event(seq, ev)
        if ev.finish_reason:
            done.set()

    seq = Sequence(ids, Sampler(SamplingParams(**params)), max_tokens, emit)
    engine.submit(seq)
    return seq, events, done


def test_follower_takes_rank0s_tokens_cancellations_and_cache_hits(monkeypatch, chat_model):
    _, model, tok = chat_model
    main, follower, received = lockstep_pair(monkeypatch, model, tok)
    try:
        prompt = tok.encode("The quick brown fox jumps over the lazy dog. Hello world!")  # > 16: chunked prefill
        runs = [submit(main, prompt, 10),
                submit(main, tok.encode("hello again"), 12, temperature=1.0, seed=7),  # sampled: rank 0 decides
                submit(main, tok.encode("12345 123"), 50, on_event=lambda s, ev: ev.completion_tokens == 3 and
                       s.cancel()),  # its client goes away after 3 tokens
                submit(main, tok.encode("the then"), 9, temperature=0.8, top_k=5)]
        for _, _, done in runs[:2] + runs[3:]:
            assert done.wait(60)
        deadline = time.time() + 30
        while main.num_active and time.time() < deadline:  # the cancelled one is dropped at the next iteration
            time.sleep(0.01)
        again = submit(main, prompt, 10)  # the first prompt again: restored from the pool on both ranks
        assert again[2].wait(60)
        assert again[1][-1].cached_tokens == len(prompt)
        assert [e.token for e in again[1]] == [e.token for e in runs[0][1]]
    finally:
        main.close()
        follower._thread.join(10)
    assert follower.shut_down and follower.error is None and main.error is None
    assert len(main.pool.entries) == 4  # (both loops have ended: their pools are final)
    assert [pc.tokens for pc in main.pool.entries] == [pc.tokens for pc in follower.pool.entries]
    mine = [events for _, events, _ in runs] + [again[1]]
    assert [seq.ids for seq in received] == [seq.ids for seq, _, _ in runs] + [again[0].ids]
    assert len(mine[2]) == 3  # the cancelled request: dropped at the next iteration on every rank
    for seq, events in zip(received, mine):
        assert [(e.token, e.text, e.finish_reason) for e in seq.events] == [
            (e.token, e.text, e.finish_reason) for e in events]


@pytest.mark.parametrize("follower, finish, message", [
    (dict(follower_step=64), "error",  # fewer prefill chunks: it samples while rank 0 starts the next iteration
     "rank 1 is out of step with rank 0: it expected the sampled tokens, rank 0 sent an iteration's inputs"),
    (dict(follower_pool=0), "length",  # keeps no finished cache: the next iteration's digest differs
     "rank 1's scheduler state [0, 0, 0, 0] differs from rank 0's [0, 0, 0, 1] (queued, prefilling, decoding, "
     "pooled caches)")])
def test_a_follower_out_of_step_stops_the_run_with_a_message(monkeypatch, chat_model, capfd, follower, finish,
                                                             message):
    _, model, tok = chat_model
    main, follower, _ = lockstep_pair(monkeypatch, model, tok, **follower)
    seq, events, done = submit(main, tok.encode("The quick brown fox jumps over the lazy dog. Hello world!"), 6)
    assert done.wait(60)
    assert events[-1].finish_reason == finish and (finish != "error" or events[-1].status == 503)
    follower._thread.join(30)
    main.close()
    assert isinstance(follower.error, lockstep.SplitRunError) and str(follower.error) == message
    assert main.error is not None  # its next collective failed (here: the broken barrier)
    assert f"kimi-lm serve: the split run stopped on rank 1: SplitRunError: {message}" in capfd.readouterr().err
