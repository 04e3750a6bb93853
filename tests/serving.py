"""uvicorn on 127.0.0.1 and a free port in a thread, and a model that replies with a script, for the server and
CLI tests."""

from __future__ import annotations

import socket
import threading
import time

import torch
import uvicorn
from openai import OpenAI


class Server:
    """uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, api_key="unused") -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until(condition, timeout: float, what: str) -> float:
    """Poll ``condition()`` every 10 ms; returns the seconds it took, fails the test after ``timeout``."""
    t0 = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)
    return time.perf_counter() - t0


class ScriptedModel(torch.nn.Module):
    """Wraps the tiny model (its caches advance as usual) but forces reply token k to be ``script[k]``; k is read
    from each sequence's own MLA cache length, so it works in batched steps too (the batched cache has ``rows``)."""

    def __init__(self, inner, script):
        super().__init__()
        self.inner, self.script, self.config, self.lm_head = inner, script, inner.config, inner.lm_head
        self.mla = next(i for i, layer in enumerate(inner.model.layers) if not layer.is_kda)
        self.start = {}
        self.prompts = []  # the ids of each prefill call, in order (what the server fed the model)

    @property
    def device(self):
        return self.inner.device

    def make_cache(self, batch_size=1):
        return self.inner.make_cache(batch_size)

    def forward(self, ids, cache, logits_to_keep=None):
        logits = self.inner(ids, cache=cache, logits_to_keep=logits_to_keep)
        rows = getattr(cache, "rows", [cache])
        forced = torch.full_like(logits[:, -1], -1e4)
        for b, row in enumerate(rows):
            length = row.layers[self.mla].length
            if ids.shape[1] > 1:  # prefill: the reply starts after this prompt
                self.start[id(row)] = length
                self.prompts.append(ids[b].tolist())
            k = length - self.start.get(id(row), length)
            forced[b, self.script[min(k, len(self.script) - 1)]] = 1e4
        logits[:, -1] = forced
        return logits
