"""Helpers for the HTTP caching tests: a real uvicorn server on a free loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(app: Any) -> tuple[Any, threading.Thread, int] | None:
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive():
            return None  # e.g. another process took the port between free_port() and bind
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 15 s")
        time.sleep(0.01)
    return server, thread, port


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn (its own event loop, in a thread) and yield its base URL."""
    for _ in range(3):
        started = _start(app)
        if started is not None:
            break
    else:
        raise RuntimeError("uvicorn did not start (3 ports tried)")
    server, thread, port = started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"
