"""Running `storygpt serve`: load the models, bind the port, then serve the app with uvicorn until SIGTERM or
Ctrl-C, which drain it (drain.py)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Sequence

from storygpt.errors import StoryGPTError
from storygpt.model.device import release_cpu_threads

from .drain import DrainingServer
from .models import load_models
from .routes import create_app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts: a port in use is one clear error, and port 0 gets a
    free port whose number can be printed."""
    if not 0 <= port <= 65535:
        raise StoryGPTError(f"--port must be in [0, 65535], got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        raise StoryGPTError(f"cannot listen on {host}:{port}: {exc}") from None
    return sock


def serve(models: Sequence[str | os.PathLike | None] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_concurrency: int | None = None, max_queue: int = 64, device: str = "auto",
          dtype: str = "auto", log_level: str = "info", compile: bool = False, drain_timeout: float = 30) -> None:
    """Load the models, then serve them until SIGTERM or Ctrl-C. Bad models or a busy port fail before anything
    starts. At the signal the server drains: no new requests (503), the running ones get up to `drain_timeout`
    seconds to finish, the rest end with finish_reason "length"; then it returns.

    max_concurrency: stories each model decodes at once (its engine's slots; default 64, fewer for models
    whose KV cache would pass 1 GiB). compile=True decodes with torch.compile'd steps: each model compiles its
    step for every batch size it can take (1, 2, 4, ... up to max_concurrency) before the server listens."""
    import torch
    import uvicorn

    if not 0 <= drain_timeout <= 86400:
        raise StoryGPTError(f"--drain-timeout must be in [0, 86400] seconds, got {drain_timeout:g}")
    loaded = load_models(models, device=device, dtype=dtype, compile=compile)
    app = create_app(loaded, api_key=api_key, max_concurrency=max_concurrency, max_queue=max_queue)
    sock = listen(host, port)
    if next(iter(loaded.values())).device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(loaded)))  # one decoding thread per model
    if compile:  # after the thread count: compiled CPU kernels keep the one they were compiled with
        for name, engine in app.state.engines.items():
            print(f"storygpt serve: compiling {name} ...", file=sys.stderr, flush=True)
            engine.warm_up()
    release_cpu_threads()  # the main thread loaded (and compiled): its idle OpenMP team would slow the decoding
    if not is_loopback(host) and not api_key:
        print(f"storygpt serve: warning: listening on {host} without --api-key: anyone who can reach this port "
              f"can use the models", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    slots = ", ".join(str(engine.slots) for engine in app.state.engines.values())
    print(f"storygpt serve: http://{shown}:{sock.getsockname()[1]}/v1 (models: {', '.join(loaded)}; "
          f"{slots} stories at once, queue {max_queue}{'; API key required' if api_key else ''})", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.engines.values(), drain_timeout).run(sockets=[sock])
