"""Graceful shutdown: the engine's drain() and end_all(), and `storygpt serve` draining on SIGTERM and SIGINT in a
real process (stories made long with the `ignore_eos` extension, so that they are still running at the deadline)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import wait_until

import storygpt
from storygpt.generate.batching import Done, Finish, Piece
from storygpt.serve import Engine, ShuttingDown

LONG = {"max_tokens": 4096, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return storygpt.load(tiny_run)


def test_engine_drain_then_end_all(tiny):
    """drain(): no new requests, the others go on; end_all(): each story ends at its next token with "length",
    the running one with its text so far, the waiting one with one token."""
    engine = Engine(tiny, slots=2, max_queue=4)
    got: dict[str, list] = {"a": [], "b": []}
    try:
        options = {"max_new_tokens": 4096, "ignore_eos": True}
        engine.submit(["Tom"], 1, options, got["a"].extend)
        engine.submit(["Lily"], 2, options, got["b"].extend)  # needs both slots: waits
        wait_until(lambda: engine.steps >= 5)
        engine.drain()
        with pytest.raises(ShuttingDown):
            engine.submit(["Ben"], 1, options, lambda items: None)
        steps = engine.steps
        wait_until(lambda: engine.steps >= steps + 3)  # the running story goes on
        assert (engine.running, engine.waiting, engine.idle) == (1, 1, False)
        engine.end_all()
        wait_until(lambda: engine.idle)
    finally:
        engine.close()
    (a_done,) = [e.stats for e in got["a"] if isinstance(e, Done)]
    (b_done,) = [e.stats for e in got["b"] if isinstance(e, Done)]
    assert [e for e in got["a"] if isinstance(e, Finish)] == [Finish(0, "length")]
    assert sorted(e for e in got["b"] if isinstance(e, Finish)) == [Finish(0, "length"), Finish(1, "length")]
    assert a_done["tokens_per_sample"][0] >= 8 and b_done["tokens_per_sample"] == [1, 1]
    assert "".join(e.text for e in got["a"] if isinstance(e, Piece))


def start_server(tiny_run, tmp_path, *args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "storygpt", "serve", "--model", f"tiny={tiny_run}", "--port", "0",
           "--log-level", "warning", *args]
    with open(tmp_path / "stderr.txt", "w") as err:
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    line = server.stdout.readline()
    assert line.startswith("storygpt serve: http"), (tmp_path / "stderr.txt").read_text()
    return server, line.split()[2].removesuffix("/v1")


class Stream(threading.Thread):
    """A streamed completion read to its end on a thread: its finish reasons, whether [DONE] came, and when."""

    def __init__(self, url: str, seed: int):
        super().__init__(daemon=True)
        self.url, self.seed = url, seed
        self.chunks, self.reasons, self.done, self.ended = 0, [], False, None
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"prompt": "Tom", "seed": self.seed, "stream": True, **LONG}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        choices = json.loads(line[len("data: "):])["choices"]
                        self.chunks += 1
                        self.reasons += [c["finish_reason"] for c in choices if c["finish_reason"]]
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        self.ended = time.monotonic()


def test_sigterm_drains_streams_then_exits_0(tiny_run, tmp_path):
    server, url = start_server(tiny_run, tmp_path, "--drain-timeout", "2", "--max-concurrency", "16")
    try:
        streams = [Stream(url, seed) for seed in range(8)]
        for s in streams:
            s.start()
        whole: dict = {}
        plain = threading.Thread(target=lambda: whole.update(r=httpx.post(
            f"{url}/v1/completions", json={"prompt": "Lily", **LONG}, timeout=60)), daemon=True)
        plain.start()
        wait_until(lambda: all(s.chunks >= 3 for s in streams) and httpx.get(f"{url}/health").json()["running"] == 9,
                   timeout=60)
        assert not any(s.ended for s in streams)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/health").json()["status"] == "draining")
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Tom", "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert not any(s.ended for s in streams)  # still streaming while draining
        for s in streams + [plain]:
            s.join(timeout=30)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    for s in streams:
        assert s.error is None and s.reasons == ["length"] and s.done, (s.error, s.reasons, s.done)
        assert 1.5 < s.ended - signalled < 15  # ran on until the deadline, 2 s after the signal
    reply = whole["r"].json()
    assert whole["r"].status_code == 200 and reply["choices"][0]["finish_reason"] == "length"
    assert 0 < reply["usage"]["completion_tokens"] < 4096
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    log = (tmp_path / "stderr.txt").read_text()
    assert "draining: 9 requests" in log and "Traceback" not in log


def test_sigint_on_an_idle_server_exits_0_at_once(tiny_run, tmp_path):
    server, url = start_server(tiny_run, tmp_path)
    try:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=20) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()


def test_a_bad_drain_timeout_is_one_line(tiny_run, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["serve", "--model", tiny_run, "--port", 0, "--drain-timeout", -1], capsys)
    assert code == 2 and "--drain-timeout" in err and len(err.strip().splitlines()) == 1
