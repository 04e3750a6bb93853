"""The scheduler under long prompts (issue 19, item 1), on the bundled 8M model: prefill runs in chunks interleaved
with other requests' decode steps, is visible in /health, stops when its client disconnects, is refused above
--max-prompt-tokens, and shutdown ends in-flight work at once.

The long prompt is a few thousand tokens prefilled 128 at a time (~30 chunks): long enough that a short request
finishing while it is still prefilling proves the interleaving, short enough for a few seconds a test."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import kimi_lm
from kimi_lm.server import ServerConfig, create_app, exposure_warning
from kimi_lm.server.engine import MAX_POOL_BYTES, Engine, pool_bytes_for
from serving import Server, wait_until

NAME = "default"
STEP = 128


@pytest.fixture(scope="module")
def bundled():
    return kimi_lm.load(kimi_lm.DEFAULT_MODEL), kimi_lm.load_tokenizer(kimi_lm.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def long_ids(bundled):
    _, tok = bundled
    text = (kimi_lm.DEFAULT_MODEL / "config.json").read_text() * 40
    ids = tok.encode(text)[:4096]
    assert len(ids) == 4096
    return ids


@pytest.fixture(scope="module")
def served(bundled):
    model, tok = bundled
    engine = Engine(model, tok, max_batch_size=8, prefill_step_size=STEP)
    server = Server(create_app(engine, ServerConfig(NAME, 1 << 20, default_temperature=0.0, max_prompt_tokens=8192)))
    yield engine, server
    server.close()
    engine.close()
    engine.pool.entries.clear()  # other modules count live caches


def slow_down_prefill(engine, monkeypatch) -> None:
    """Each prefill chunk takes at least 50 ms, so the 32-chunk long prompt lasts > 1.6 s on any machine: the
    tests below need it still prefilling when a short request finishes, a 1 s client timeout fires or the engine
    stops."""
    chunk = engine._prefill_chunk

    def slow_chunk():
        time.sleep(0.05)
        chunk()

    monkeypatch.setattr(engine, "_prefill_chunk", slow_chunk)


@pytest.fixture
def slow_prefill(served, monkeypatch):
    slow_down_prefill(served[0], monkeypatch)


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def test_short_request_is_served_while_a_long_prompt_prefills_and_a_disconnect_stops_the_prefill(served, long_ids,
                                                                                                  slow_prefill):
    engine, server = served
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": long_ids, "max_tokens": 1, "stream": True}):
        wait_until(lambda: health(server)["prefilling"], 10, "the long prompt to start prefilling")
        t0 = time.perf_counter()
        short = server.client().completions.create(model=NAME, prompt="The for statement", max_tokens=4)
        short_s = time.perf_counter() - t0
        [progress] = health(server)["prefilling"]  # the short request did not wait for the long prefill
        assert short.usage.completion_tokens >= 1 and progress["prompt_tokens"] == len(long_ids)
        assert 0 < progress["prefilled"] < len(long_ids), progress
    # the client has gone: the prefill stops at the next chunk boundary instead of running to the end
    wait_until(lambda: not health(server)["prefilling"], 3, "the abandoned prefill to stop")
    left = [pc for pc in engine.pool.entries if pc.tokens and pc.tokens == long_ids[: len(pc.tokens)]]
    assert left and max(len(pc.tokens) for pc in left) < len(long_ids)
    print(f"short request while a {len(long_ids)}-token prompt prefilled: {short_s:.2f} s")


def test_non_streaming_client_that_times_out_cancels_its_prefill(served, long_ids, slow_prefill):
    engine, server = served
    prompt = long_ids[::-1]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=1.0)
    wait_until(lambda: not health(server)["prefilling"], 3, "the abandoned prefill to stop")
    left = [pc for pc in engine.pool.entries if pc.tokens and pc.tokens == prompt[: len(pc.tokens)]]
    assert left and max(len(pc.tokens) for pc in left) < len(prompt)  # stopped part-way, not run to the end


def test_prompt_above_max_prompt_tokens_is_a_400_before_any_work(served, bundled):
    engine, server = served
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [5] * 8193, "max_tokens": 1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "prompt_too_long" and err["param"] == "prompt"
    assert "8193" in err["message"] and "--max-prompt-tokens" in err["message"]
    assert health(server)["prefilling"] == []


def test_engine_stop_mid_prefill_answers_503_and_returns_at_once(bundled, long_ids, monkeypatch):
    model, tok = bundled
    engine = Engine(model, tok, prefill_step_size=STEP)
    slow_down_prefill(engine, monkeypatch)
    server = Server(create_app(engine, ServerConfig(NAME, 1 << 20)))
    answer = {}
    request = threading.Thread(target=lambda: answer.update(r=httpx.post(
        server.url + "/v1/completions", json={"prompt": long_ids, "max_tokens": 4}, timeout=30)))
    request.start()
    try:
        wait_until(lambda: engine.stats()["prefilling"], 10, "the prefill to start")
        t0 = time.perf_counter()
        engine.close()
        assert time.perf_counter() - t0 < 2
        request.join(timeout=5)
        r = answer["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert not engine._thread.is_alive()
    finally:
        server.close()
        engine.pool.entries.clear()


def test_a_burst_of_short_prompts_is_prefilled_in_one_forward_and_decodes_as_alone(bundled, monkeypatch):
    """Requests waiting together share one prefill chunk (batching.prefill_packed: the first request's tokens, then
    the next ones' while the chunk's budget lasts), start decoding together, and each generates what it generates
    alone; a prompt longer than what is left of the budget is cut there and finishes in a later chunk."""
    from kimi_lm.batching import prefill_packed
    from kimi_lm.generate import stream_generate
    from kimi_lm.sample import Sampler, SamplingParams
    from kimi_lm.server import engine as engine_module
    from kimi_lm.server.engine import Sequence

    model, tok = bundled
    prompts = [tok.encode(f"burst {i}: " + "word " * (3 + 5 * i)) for i in range(5)]
    budget = sum(len(p) for p in prompts[:4]) + 2  # the fifth prompt is cut after 2 tokens
    packed = []
    monkeypatch.setattr(engine_module, "prefill_packed",
                        lambda m, caches, chunks: packed.append([len(c) for c in chunks]) or prefill_packed(m, caches,
                                                                                                            chunks))
    engine = Engine(model, tok, max_batch_size=8, prefill_step_size=budget, prompt_cache_bytes=0)
    engine.close()  # no scheduler thread: the test runs its iterations itself
    outputs = {i: [] for i in range(len(prompts))}
    seqs = [Sequence(p, Sampler(SamplingParams(temperature=0)), 6,
                     lambda ev, i=i: ev.token >= 0 and outputs[i].append(ev.token)) for i, p in enumerate(prompts)]
    for seq in seqs:
        engine._start(seq)
    engine._prefill_chunk()
    assert packed == [[len(p) for p in prompts[:4]] + [2]]
    assert [s.prefilled for s in seqs] == [len(p) for p in prompts[:4]] + [2]
    assert engine.prefilling == [seqs[4]] and len(engine.active) == 4
    while engine.prefilling or engine.active:
        if engine.prefilling:
            engine._prefill_chunk()
        if engine.active:
            engine._step()
    for i, p in enumerate(prompts):
        alone = [r.token for r in stream_generate(model, tok, p, max_tokens=6, temperature=0)]
        assert outputs[i] == alone, i


def test_pool_is_sized_from_the_model(bundled):
    model, tok = bundled
    size = pool_bytes_for(model, 32)
    assert 0 < size < 256 << 20 < MAX_POOL_BYTES  # the 16 MB model gets MBs of prefix cache, not 2 GiB
    engine = Engine(model, tok, max_batch_size=32)
    try:
        assert engine.pool.max_bytes == size
    finally:
        engine.close()


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "--api-key" in exposure_warning("0.0.0.0", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_prints_what_it_serves_and_sigterm_mid_prefill_exits_in_seconds(long_ids):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kimi_lm", "serve", "--port", str(port), "--prefill-step-size",
                             str(STEP // 2), "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stderr.readline()
        assert line.startswith("kimi-lm serve: ") and "'default_model'" in line, line
        assert "kimi_linear" in line and "bfloat16" in line and f"http://127.0.0.1:{port}/v1" in line
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _up(url), 30, "the server to answer")
        answer = {}
        threading.Thread(target=lambda: answer.update(r=httpx.post(
            url + "/v1/completions", json={"prompt": long_ids, "max_tokens": 4}, timeout=30)), daemon=True).start()
        wait_until(lambda: httpx.get(url + "/health").json()["prefilling"], 10, "the prefill to start")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.perf_counter() - t0 < 5
        wait_until(lambda: "r" in answer, 5, "the in-flight request's answer")
        assert answer["r"].status_code == 503
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _up(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_a_scheduler_iterations_events_reach_the_loop_at_its_end():
    """Inside engine.deliver_at_end (the scheduler wraps each iteration in it) a Mailbox queues events and wakes the
    event loop once, when the block ends, not at the first event (which would set the loop's thread contending with
    the rest of the step's sampling); outside it, at once."""
    import asyncio

    from kimi_lm.server.engine import deliver_at_end
    from kimi_lm.server.responses import Mailbox

    async def run():
        loop = asyncio.get_running_loop()
        box, q = Mailbox(loop), asyncio.Queue()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakeups.append(q.qsize()) or real(*a)
        seen = []

        def iteration():
            with deliver_at_end():
                for n in range(5):
                    box.put(q, n)
                    with deliver_at_end():  # nested: still delivered at the outer block's end
                        box.put(q, 10 + n)
                seen.append(len(wakeups))
            seen.append(len(wakeups))
            box.put(q, 99)  # no block open: woken at once (if no wake-up is pending)

        worker = threading.Thread(target=iteration)
        worker.start()
        worker.join()
        got = []
        while len(got) < 11:
            got.append(await asyncio.wait_for(q.get(), 5))
        return seen, got, len(wakeups)

    seen, got, wakeups = asyncio.run(run())
    assert seen == [0, 1]
    assert got == [0, 10, 1, 11, 2, 12, 3, 13, 4, 14, 99]
    assert wakeups <= 2


def test_mailbox_delivers_a_threads_events_in_order_with_few_wakeups():
    """Events put from another thread (the scheduler's) reach their queues in order; the loop is woken once per
    burst rather than once per event."""
    import asyncio

    from kimi_lm.server.responses import Mailbox

    async def run():
        loop = asyncio.get_running_loop()
        box, queues = Mailbox(loop), [asyncio.Queue(), asyncio.Queue()]
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakeups.append(1) or real(*a)

        def burst():
            for n in range(100):
                box.put(queues[n % 2], n)

        worker = threading.Thread(target=burst)
        worker.start()
        got = [[], []]
        while len(got[0]) + len(got[1]) < 100:
            for k, q in enumerate(queues):
                while not q.empty():
                    got[k].append(q.get_nowait())
            await asyncio.sleep(0.001)
        worker.join()
        return got, len(wakeups)

    (evens, odds), wakeups = asyncio.run(run())
    assert evens == list(range(0, 100, 2)) and odds == list(range(1, 100, 2))
    assert 1 <= wakeups < 100
