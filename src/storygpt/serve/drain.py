"""Graceful shutdown of `storygpt serve`: on SIGTERM or SIGINT (Ctrl-C) the server drains, then exits 0.

uvicorn's own handling stops at once: it closes the port and gives open responses `timeout_graceful_shutdown`
seconds before it cuts them, mid-stream. `DrainingServer` replaces it:

1. At the signal every engine stops taking requests: new ones get 503 with `Retry-After` and OpenAI's error
   body (code "server_shutting_down"), and `/health` says "draining". The port stays open for that.
2. The running and waiting requests go on, for up to `timeout` seconds.
3. Then every story still going ends at its next token with finish_reason "length": a stream gets its last
   chunk with that reason and `data: [DONE]`, a non-streamed request its normal response.
4. When no request is left, uvicorn shuts down as usual (the last chunks are sent first) and the process
   exits 0.

A second signal skips the rest of the wait: the stories end at once (step 3).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType

import uvicorn

from storygpt.generate.engine import Engine

POLL_S = 0.05
END_WAIT_S = 30  # after end_all(): a few steps, unless a step hangs; then uvicorn's own shutdown cuts the rest


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains its engines on SIGTERM/SIGINT before it stops (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, engines: Iterable[Engine], timeout: float):
        super().__init__(config)
        self.engines, self.timeout = list(engines), timeout
        self.hurry = threading.Event()
        self.drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's signal handler (on the main thread): start draining; a second signal hurries it. Unlike
        uvicorn's, it does not raise the signal again after the shutdown, so the exit code is 0."""
        if self.drainer is not None:
            self.hurry.set()
            return
        for engine in self.engines:
            engine.drain()
        self.drainer = threading.Thread(target=self.drain, name="storygpt-drain", daemon=True)
        self.drainer.start()

    def drain(self) -> None:
        """Wait for the requests to end, up to the timeout; end the rest; then let uvicorn stop."""
        running = sum(engine.running + engine.waiting for engine in self.engines)
        print(f"storygpt serve: draining: {running} requests, up to {self.timeout:g} s; no new ones",
              file=sys.stderr, flush=True)
        self.wait(self.timeout, self.hurry)
        if not self.idle():
            print("storygpt serve: ending the stories still running (finish_reason 'length')", file=sys.stderr,
                  flush=True)
            for engine in self.engines:
                engine.end_all()
            self.wait(END_WAIT_S, threading.Event())
        self.should_exit = True

    def idle(self) -> bool:
        return all(engine.idle for engine in self.engines)

    def wait(self, seconds: float, interrupt: threading.Event) -> None:
        """Until every engine is idle, `seconds` pass, or `interrupt` is set."""
        deadline = time.monotonic() + seconds
        while not self.idle() and time.monotonic() < deadline and not interrupt.wait(POLL_S):
            pass
