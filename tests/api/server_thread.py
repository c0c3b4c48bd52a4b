"""Runs a KestrelServer on 127.0.0.1 (free ports) in a background thread with its own event loop,
so tests can talk to it over real sockets with blocking clients."""

from __future__ import annotations

import asyncio
import threading

from serve.api.server import KestrelServer


class ServerThread:
    def __init__(self, server: KestrelServer):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self.call(self.server.start(host="127.0.0.1", port=0, http_port=0))
        return self

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __exit__(self, *exc) -> None:
        self.stop()
