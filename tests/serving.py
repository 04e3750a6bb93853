"""uvicorn on 127.0.0.1 and a free port in a thread, for the server tests."""

from __future__ import annotations

import socket
import threading
import time

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
