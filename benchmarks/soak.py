"""Soak test of `storygpt serve`: minutes of mixed traffic from a rising and falling number of clients, while the
server's memory, file descriptors, threads and queue are sampled. It fails when a request is lost or answered with a
server error, when a malformed body is not refused properly, or when the server's memory grows.

    python benchmarks/soak.py [--model default] [--duration 600] [--max-clients 24] [--max-tokens 128]
                              [--max-concurrency 16] [--max-queue 8] [--warmup S] [--seed 0] [--out DIR]

The ten-minute run (writes benchmarks/results/soak.json and benchmarks/results/soak.png):

    python benchmarks/soak.py --model default --duration 600 --out benchmarks/results

Starts `storygpt serve --model MODEL --max-concurrency 16 --max-queue 8` on a free 127.0.0.1 port: fewer slots than
the clients at their top, and a short queue, so that requests wait and some are refused with 503 (the server's
default, 64 slots, would never fill). The number of clients follows a cosine wave between 1 and --max-clients, one
cycle a minute (at least two cycles). Each client sends one request after another over HTTP (httpx), of a random
kind:

- completion, chat: a plain /v1/completions or /v1/chat/completions request;
- completion_stream, chat_stream: the same, streamed (half of them with `stream_options.include_usage`);
- n: 2 to 4 stories in one request (plain or streamed, completion or chat);
- stop: with one to three stop strings (the text must not contain them);
- disconnect: hangs up after a few chunks of a stream, or gives up on a plain request before it ends;
- malformed: one of MALFORMED (invalid JSON, wrong types, values out of range, no user message, an unknown model,
  a prompt longer than the context, a body over 1 MB).

Prompts, seeds and `max_tokens` (1 to --max-tokens) are random, from --seed. Every second it samples the server
process's resident memory (RSS), open file descriptors and threads (/proc/PID), and the engine's running and
waiting requests (GET /health, timed). After --duration no new request starts; the script waits for the last ones,
for the engine to be idle, and samples three seconds more. It reads GET /metrics once at the end when the server
has it. Checks, one line each on stderr and exit code 1 when any fails:

- every valid request completed (every choice has a finish reason; a stream ends with `[DONE]`, without an error
  event) or was refused with 503 (queue full), or hung up by the client on purpose;
- no answer is a 5xx other than 503 (a /health included);
- every malformed body got a 4xx with OpenAI's error body;
- the engine is idle (nothing running or waiting) once the clients are gone;
- RSS at the end is within 10% of RSS after the warm-up (--warmup; default the longer of 10% of the run and 45 s,
  at most three quarters of it: 60 s of a ten-minute run, 45 s of a one-minute one). The server's RSS climbs for
  its first minute or two under this traffic and then levels off, so a shorter warm-up measures that climb;
- the server logged no traceback.

Writes DIR/soak.json (settings, counts by kind and outcome, latencies, the time series, the RSS check, the machine,
date and command) and DIR/soak.png (RSS; fds and threads; running and waiting; clients and requests/s over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from common import header, run_main, stop_server
from matplotlib.figure import Figure

from storygpt.errors import StoryGPTError

RESULTS = Path(__file__).parent / "results"
KINDS = {"completion": 3, "chat": 2, "completion_stream": 3, "chat_stream": 2, "n": 1, "stop": 1, "disconnect": 1,
         "malformed": 1}  # relative frequency
OK_OUTCOMES = {"ok", "busy_503", "hung_up", "rejected_4xx"}  # anything else is a failure
PROMPTS = ["Once upon a time", "Tom had a red ball.", "Lily went to the park with her mom.", "",
           "One day, a little dog named Max", "The sun was hot and the bird was thirsty.", "Sue and Ben found a box"]
STOPS = [".", "!", "\n", " and", "Lily", "the"]
MALFORMED: list[tuple[str, str, object]] = [  # (what, path, JSON body or raw bytes)
    ("not JSON", "/v1/completions", b'{"prompt": "Once upon'),
    ("empty body", "/v1/chat/completions", b""),
    ("a list, not an object", "/v1/completions", [1, 2, 3]),
    ("max_tokens a string", "/v1/completions", {"prompt": "Hi", "max_tokens": "ten"}),
    ("max_tokens 0", "/v1/completions", {"prompt": "Hi", "max_tokens": 0}),
    ("n over 16", "/v1/completions", {"prompt": "Hi", "n": 17}),
    ("temperature below 0", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": -1}),
    ("stream not a bool", "/v1/completions", {"prompt": "Hi", "stream": "yes"}),
    ("five stop strings", "/v1/completions", {"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}),
    ("no messages", "/v1/chat/completions", {"max_tokens": 5}),
    ("no user message", "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be kind."}]}),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}),
    ("unknown model", "/v1/completions", {"prompt": "Hi", "model": "../../etc/passwd"}),
    ("prompt past the context", "/v1/completions", {"prompt": "Once upon a time " * 1500}),
    ("body over 1 MB", "/v1/completions", {"prompt": "x" * 1_100_000}),
]
REQUEST_TIMEOUT_S = 300
HEALTH_TIMEOUT_S = 10
RSS_TOLERANCE = 0.10


# --------------------------------------------------------------------------------------------
# The server and its process
# --------------------------------------------------------------------------------------------
def start_server(args, log_file) -> tuple[subprocess.Popen, str]:
    """`storygpt serve --port 0`, its stderr to `log_file`; and its base URL (without /v1) once it listens."""
    cmd = [sys.executable, "-m", "storygpt", "serve", "--port", "0", "--log-level", "warning", "--model", args.model]
    cmd += ["--max-concurrency", str(args.max_concurrency)] if args.max_concurrency else []
    cmd += ["--max-queue", str(args.max_queue)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    line = server.stdout.readline()  # "storygpt serve: http://127.0.0.1:PORT/v1 (...)" or EOF on failure
    if not line.startswith("storygpt serve: http"):
        server.kill()
        server.wait()
        log_file.seek(0)
        said = [text for text in log_file.read().splitlines() if text.strip()]
        raise StoryGPTError(f"storygpt serve did not start: {said[-1] if said else line.strip()!r}")
    threading.Thread(target=server.stdout.read, daemon=True).start()  # a full pipe would block the server
    return server, line.split()[2].removesuffix("/v1")


def process_sample(pid: int) -> dict:
    """Resident memory (MB), threads and open file descriptors of process `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        status = dict(line.split(":", 1) for line in fh if ":" in line)
    return {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1), "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def prometheus_values(text: str) -> dict[str, float]:
    """`name{labels} value` lines of a Prometheus text page (GET /metrics), as {name{labels}: value}."""
    values = {}
    for line in text.splitlines():
        name, _, number = line.strip().rpartition(" ")
        if name and not line.startswith("#"):
            try:
                values[name] = float(number)
            except ValueError:
                pass
    return values


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------
def warmup_seconds(duration: float) -> float:
    """The longer of 10% of the run and 45 s, but at most three quarters of it."""
    return min(max(0.1 * duration, 45.0), 0.75 * duration)


def wave_cycles(duration: float) -> int:
    """Cycles of the clients' wave: one a minute, at least two."""
    return max(2, round(duration / 60))


def target_clients(t: float, period: float, max_clients: int) -> int:
    """Clients wanted at `t` seconds: 1 at the start of each cycle, `max_clients` halfway through."""
    return 1 + round((max_clients - 1) * (1 - math.cos(2 * math.pi * t / period)) / 2)


def valid_request(kind: str, rng: random.Random, max_tokens: int) -> dict:
    """A request of `kind` (not malformed): path, body, and what to expect of the answer."""
    chat = kind.startswith("chat") or (kind in ("n", "stop", "disconnect") and rng.random() < 0.5)
    if kind in ("n", "stop", "disconnect"):
        stream = rng.random() < (0.7 if kind == "disconnect" else 0.5)
    else:
        stream = kind.endswith("_stream")
    prompt = rng.choice(PROMPTS)
    body: dict = {"max_tokens": rng.randint(1, max_tokens), "seed": rng.randrange(2**31), "stream": stream}
    if chat:
        body["messages"] = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": prompt or "Hi"}]
    else:
        body["prompt"] = prompt
    if kind == "n":
        body["n"] = rng.randint(2, 4)
    if kind == "stop":
        body["stop"] = rng.sample(STOPS, rng.randint(1, 3))
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    request = {"kind": kind, "path": "/v1/chat/completions" if chat else "/v1/completions", "body": body}
    if kind == "disconnect":
        request["hang_up"] = rng.randint(1, 6) if stream else rng.uniform(0.1, 2.0)  # chunks, or seconds
    return request


def check_answer(request: dict, choices: dict[int, str], reasons: dict[int, str], usage: dict | None) -> str | None:
    """What is wrong with a complete answer (None: nothing): one finish reason per story, no stop string."""
    body = request["body"]
    n = body.get("n", 1)
    if sorted(reasons) != list(range(n)) or not set(reasons.values()) <= {"stop", "length"}:
        return f"finish reasons {reasons} for n={n}"
    for i, text in choices.items():
        hit = next((s for s in body.get("stop", []) if s in text), None)
        if hit is not None:
            return f"story {i} contains its stop string {hit!r}: {text[-80:]!r}"
    if usage is not None and usage["completion_tokens"] > n * body["max_tokens"]:
        return f"usage {usage} over n x max_tokens = {n} x {body['max_tokens']}"
    if body.get("stream_options") and usage is None:
        return "no usage chunk although stream_options.include_usage"
    return None


def error_body_problem(response: httpx.Response) -> str | None:
    """What is wrong with an error answer's body (None: OpenAI's {"error": {message, type, param, code}})."""
    try:
        error = response.json()["error"]
        if isinstance(error["message"], str) and isinstance(error["type"], str) and {"param", "code"} <= set(error):
            return None
    except (ValueError, KeyError, TypeError):
        pass
    return f"not OpenAI's error body: {response.text[:200]!r}"


def refusal(response: httpx.Response) -> tuple[str, str | None]:
    """Outcome of a valid request answered with something else than 200."""
    if response.status_code == 503:
        problem = error_body_problem(response)
        return ("busy_503", None) if problem is None else ("bad_error_body", problem)
    return f"http_{response.status_code}", response.text[:200]


def read_story_parts(payload: dict, chat: bool, choices: dict, reasons: dict) -> None:
    for c in payload.get("choices", []):
        text = (c.get("delta") or {}).get("content") if chat else c.get("text")
        choices[c["index"]] = choices.get(c["index"], "") + (text or "")
        if c.get("finish_reason"):
            reasons[c["index"]] = c["finish_reason"]


async def send_streamed(client: httpx.AsyncClient, request: dict) -> tuple[str, str | None]:
    chat = "messages" in request["body"]
    choices: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage, done, chunks = None, False, 0
    async with client.stream("POST", request["path"], json=request["body"]) as response:
        if response.status_code != 200:
            await response.aread()
            return refusal(response)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            payload = json.loads(data)
            if "error" in payload:
                return "stream_error", json.dumps(payload["error"])[:200]
            usage = payload.get("usage") or usage
            read_story_parts(payload, chat, choices, reasons)
            chunks += 1
            if chunks == request.get("hang_up"):
                return "hung_up", None  # leaving the `async with` closes the connection mid-stream
    if not done:
        return "incomplete_stream", f"ended without [DONE] after {chunks} chunks"
    problem = check_answer(request, choices, reasons, usage)
    return ("bad_answer", problem) if problem else ("ok", None)


async def send_plain(client: httpx.AsyncClient, request: dict) -> tuple[str, str | None]:
    post = client.post(request["path"], json=request["body"])
    if request["kind"] == "disconnect":
        try:
            response = await asyncio.wait_for(post, timeout=request["hang_up"])
        except TimeoutError:
            return "hung_up", None  # the cancelled request closes its connection
    else:
        response = await post
    if response.status_code != 200:
        return refusal(response)
    payload = response.json()
    chat = "messages" in request["body"]
    choices = {c["index"]: c["message"]["content"] if chat else c["text"] for c in payload["choices"]}
    reasons = {c["index"]: c["finish_reason"] for c in payload["choices"]}
    problem = check_answer(request, choices, reasons, payload["usage"])
    return ("bad_answer", problem) if problem else ("ok", None)


async def send_malformed(client: httpx.AsyncClient, rng: random.Random) -> tuple[str, str | None]:
    what, path, body = rng.choice(MALFORMED)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(path, content=content, headers={"Content-Type": "application/json"})
    if not 400 <= response.status_code < 500:
        return ("server_error" if response.status_code >= 500 else "accepted"), f"{what}: {response.status_code}"
    problem = error_body_problem(response)
    return ("rejected_4xx", None) if problem is None else ("bad_error_body", f"{what}: {problem}")


async def send(client: httpx.AsyncClient, kind: str, rng: random.Random, max_tokens: int) -> tuple[str, str | None]:
    """One request of `kind`: its outcome (one of OK_OUTCOMES, or a failure) and what went wrong."""
    try:
        if kind == "malformed":
            return await send_malformed(client, rng)
        request = valid_request(kind, rng, max_tokens)
        if request["body"]["stream"]:
            return await send_streamed(client, request)
        return await send_plain(client, request)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # transport errors, timeouts, broken JSON
        return "error", f"{type(exc).__name__}: {exc}"[:200]


class Traffic:
    """The clients' state: how many are wanted, how many requests are in flight, and every request's outcome."""

    def __init__(self, args, period: float):
        self.args, self.period = args, period
        self.start = time.monotonic()
        self.in_flight = 0
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.finished: list[float] = []  # when each request ended, seconds since start
        self.failures: list[str] = []

    def now(self) -> float:
        return time.monotonic() - self.start

    def wanted(self) -> int:
        return target_clients(self.now(), self.period, self.args.max_clients) if self.now() < self.args.duration else 0

    async def client(self, index: int, http: httpx.AsyncClient) -> None:
        """Client `index` sends one request after another while it is among the clients wanted, until the end."""
        rng = random.Random(self.args.seed * 1000 + index)
        kinds, weights = list(KINDS), list(KINDS.values())
        while self.now() < self.args.duration:
            if index >= self.wanted():
                await asyncio.sleep(0.1)
                continue
            kind = rng.choices(kinds, weights)[0]
            t0 = self.now()
            self.in_flight += 1
            outcome, detail = await send(http, kind, rng, self.args.max_tokens)
            self.in_flight -= 1
            self.counts[kind][outcome] += 1
            self.finished.append(self.now())
            if outcome == "ok":
                self.latencies[kind].append(self.now() - t0)
            if outcome not in OK_OUTCOMES:
                self.failures.append(f"{kind} at {t0:.1f} s: {outcome}: {detail}")
            if outcome == "busy_503":
                await asyncio.sleep(rng.uniform(0.2, 1.0))  # the server says Retry-After: 1


async def sample(traffic: Traffic, http: httpx.AsyncClient, server: subprocess.Popen) -> dict:
    """One row of the time series: the server process, GET /health and its latency, the clients."""
    try:
        row = {"t": round(traffic.now(), 2), **process_sample(server.pid)}
    except (FileNotFoundError, ProcessLookupError):
        server.wait()
        raise StoryGPTError(f"storygpt serve exited during the soak (exit code {server.returncode})") from None
    t0 = time.perf_counter()
    try:
        response = await http.get("/health", timeout=HEALTH_TIMEOUT_S)
        health = response.json() if response.status_code == 200 else {}
        if response.status_code != 200:
            traffic.failures.append(f"GET /health at {row['t']:.1f} s: {response.status_code}")
    except httpx.HTTPError as exc:
        health = {}
        traffic.failures.append(f"GET /health at {row['t']:.1f} s: {type(exc).__name__}: {exc}")
    row.update(health_ms=round(1000 * (time.perf_counter() - t0), 1), running=health.get("running"),
               waiting=health.get("waiting"), clients_wanted=traffic.wanted(), in_flight=traffic.in_flight,
               finished=len(traffic.finished))
    return row


async def soak(args, url: str, server: subprocess.Popen, period: float) -> tuple[Traffic, list[dict], dict]:
    """Run the clients for --duration while sampling every second; then wait for the last requests and the engine
    to be idle, and sample a few seconds more. Returns the traffic, the samples and what /metrics said."""
    limits = httpx.Limits(max_connections=args.max_clients + 2, max_keepalive_connections=args.max_clients)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http, \
            httpx.AsyncClient(base_url=url, timeout=HEALTH_TIMEOUT_S) as monitor:
        traffic = Traffic(args, period)
        clients = asyncio.gather(*(traffic.client(i, http) for i in range(args.max_clients)))
        samples = []
        while not clients.done():
            samples.append(await sample(traffic, monitor, server))
            await asyncio.wait([clients], timeout=max(0.0, 1.0 - (traffic.now() - samples[-1]["t"])))
        await clients
        drained = traffic.now()
        while samples[-1]["running"] or samples[-1]["waiting"]:
            if traffic.now() - drained > 15:
                traffic.failures.append(f"the engine is not idle 15 s after the last request: {samples[-1]}")
                break
            await asyncio.sleep(1.0)
            samples.append(await sample(traffic, monitor, server))
        for _ in range(3):  # the resting server, for the RSS at the end
            await asyncio.sleep(1.0)
            samples.append(await sample(traffic, monitor, server))
        try:
            metrics = await monitor.get("/metrics")  # only if the server has it
            metrics = prometheus_values(metrics.text) if metrics.status_code == 200 else {}
            metrics = {name: value for name, value in metrics.items() if "_created" not in name}
        except httpx.HTTPError:
            metrics = {}
    return traffic, samples, metrics


# --------------------------------------------------------------------------------------------
# Checks and report
# --------------------------------------------------------------------------------------------
def rss_check(samples: list[dict], warmup: float, tolerance: float = RSS_TOLERANCE) -> dict:
    """RSS after the warm-up (median of the samples within 2 s of its end) against RSS at the end (median of the
    last three samples, after the traffic)."""
    around = [s["rss_mb"] for s in samples if abs(s["t"] - warmup) <= 2] or [samples[0]["rss_mb"]]
    after_warmup = round(statistics.median(around), 1)
    end = round(statistics.median(s["rss_mb"] for s in samples[-3:]), 1)
    change = (end - after_warmup) / after_warmup
    return {"warmup_s": round(warmup, 1), "rss_after_warmup_mb": after_warmup, "rss_end_mb": end,
            "rss_start_mb": samples[0]["rss_mb"], "rss_peak_mb": max(s["rss_mb"] for s in samples),
            "change": round(change, 4), "tolerance": tolerance, "passed": abs(change) <= tolerance}


def resources(samples: list[dict], warmup: float) -> dict:
    at_warmup = min(samples, key=lambda s: abs(s["t"] - warmup))
    return {name: {"start": samples[0][name], "after_warmup": at_warmup[name], "end": samples[-1][name],
                   "max": max(s[name] for s in samples)} for name in ("fds", "threads")}


def latency_summary(latencies: dict[str, list[float]]) -> dict:
    return {kind: {"p50_s": round(statistics.median(xs), 2), "max_s": round(max(xs), 2), "requests": len(xs)}
            for kind, xs in sorted(latencies.items())}


def requests_per_second(samples: list[dict]) -> list[float]:
    rates = [0.0]
    for a, b in zip(samples, samples[1:]):
        rates.append(round((b["finished"] - a["finished"]) / max(b["t"] - a["t"], 1e-3), 2))
    return rates


def failed_checks(traffic: Traffic, rss: dict, server_log: str) -> list[str]:
    """One line per failed check."""
    lines = traffic.failures[:20]
    if len(traffic.failures) > 20:
        lines.append(f"... and {len(traffic.failures) - 20} more failed requests")
    if not rss["passed"]:
        lines.append(f"RSS went from {rss['rss_after_warmup_mb']} MB after the warm-up ({rss['warmup_s']} s) to "
                     f"{rss['rss_end_mb']} MB at the end: {rss['change']:+.1%}, more than {rss['tolerance']:.0%}")
    if "Traceback" in server_log:
        lines.append(f"the server logged a traceback: {server_log[server_log.index('Traceback'):][:300]!r}")
    return lines


def plot(samples: list[dict], rss: dict, title: str, out: Path) -> None:
    t = [s["t"] for s in samples]
    fig = Figure(figsize=(10, 10))
    ax_rss, ax_res, ax_queue, ax_load = fig.subplots(4, 1, sharex=True)
    ax_rss.plot(t, [s["rss_mb"] for s in samples], color="C0")
    ax_rss.axvline(rss["warmup_s"], color="grey", ls=":", label="end of warm-up")
    ax_rss.axhspan(rss["rss_after_warmup_mb"] * (1 - rss["tolerance"]), rss["rss_after_warmup_mb"] * (1 + rss["tolerance"]),
                   color="C2", alpha=0.15, label=f"after warm-up ±{rss['tolerance']:.0%}")
    ax_rss.set(ylabel="RSS (MB)", title=title)
    ax_rss.legend(fontsize=8)
    ax_res.plot(t, [s["fds"] for s in samples], label="open file descriptors")
    ax_res.plot(t, [s["threads"] for s in samples], label="threads")
    ax_res.set(ylabel="count")
    ax_res.legend(fontsize=8)
    ax_queue.plot(t, [s["running"] for s in samples], label="running (GET /health)")
    ax_queue.plot(t, [s["waiting"] for s in samples], label="waiting")
    ax_queue.set(ylabel="requests")
    ax_queue.legend(fontsize=8)
    ax_load.plot(t, [s["clients_wanted"] for s in samples], label="clients wanted", color="C0")
    ax_load.plot(t, [s["in_flight"] for s in samples], label="requests in flight", color="C1")
    ax_load.set(xlabel="seconds", ylabel="clients")
    rate = ax_load.twinx()
    rate.plot(t, requests_per_second(samples), label="requests/s", color="C3", alpha=0.6)
    rate.set(ylabel="requests/s")
    lines = ax_load.get_legend_handles_labels()
    more = rate.get_legend_handles_labels()
    ax_load.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    for ax in (ax_rss, ax_res, ax_queue, ax_load):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="storygpt serve --model (default: the shipped model)")
    ap.add_argument("--duration", type=float, default=600, help="seconds of traffic")
    ap.add_argument("--max-clients", type=int, default=24, help="clients at the top of the wave")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of a request: 1 to this, at random")
    ap.add_argument("--max-concurrency", type=int, default=16,
                    help="storygpt serve --max-concurrency: stories decoded at once (fewer than the clients' top, "
                         "so that requests wait; 0: the server's default, 64)")
    ap.add_argument("--max-queue", type=int, default=8,
                    help="storygpt serve --max-queue (small, so that some requests are refused with 503)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before the reference RSS (default: the longer of 10%% of the run and 45 s, at most "
                         "three quarters of it)")
    ap.add_argument("--rss-tolerance", type=float, default=RSS_TOLERANCE,
                    help="RSS at the end may differ from RSS after the warm-up by this share (default 0.10; a short "
                         "smoke run, which ends inside the server's first-minute climb on a slow CPU, takes more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS), help="folder for soak.json and soak.png")
    args = ap.parse_args()
    if args.duration < 10 or args.max_clients < 1 or args.max_tokens < 1:
        raise StoryGPTError("--duration must be at least 10 s, --max-clients and --max-tokens at least 1")
    warmup = warmup_seconds(args.duration) if args.warmup is None else args.warmup
    if not 0 < warmup < args.duration:
        raise StoryGPTError(f"--warmup must be between 0 and --duration, got {warmup}")
    cycles = wave_cycles(args.duration)
    period = args.duration / cycles
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as log_file:
        server, url = start_server(args, log_file)
        try:
            health = httpx.get(url + "/health", timeout=30).json()
            traffic, samples, metrics = asyncio.run(soak(args, url, server, period))
        finally:
            stop_server(server)
        log_file.seek(0)
        server_log = log_file.read()
    rss = rss_check(samples, warmup, args.rss_tolerance)
    failures = failed_checks(traffic, rss, server_log)
    counts = {kind: dict(traffic.counts[kind]) for kind in KINDS}
    totals = Counter()
    for by_outcome in counts.values():
        totals.update(by_outcome)
    result = header("soak", cores=os.cpu_count(),
                    command=" ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
                    settings={"model": args.model, "served_as": health["models"][0], "duration_s": args.duration,
                              "max_clients": args.max_clients, "max_tokens": args.max_tokens,
                              "max_concurrency": health["max_concurrency"], "max_queue": health["max_queue"],
                              "seed": args.seed, "warmup_s": round(warmup, 1), "cycles": cycles,
                              "cycle_s": round(period, 1),
                              "mix": KINDS, "malformed": [what for what, _, _ in MALFORMED]},
                    load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                    passed=not failures, failed_checks=failures,
                    totals={"requests": sum(totals.values()), **dict(totals)}, counts=counts,
                    latency_s=latency_summary(traffic.latencies), rss_check=rss,
                    resources=resources(samples, warmup), metrics_at_end=metrics,
                    server_log_tail=server_log[-2000:],
                    series={key: [s[key] for s in samples] for key in samples[0]} | {
                        "requests_per_s": requests_per_second(samples)})
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    settings = result["settings"]
    plot(samples, rss, f"storygpt serve {settings['served_as']}: {settings['max_concurrency']} slots, queue "
         f"{settings['max_queue']}, 1 to {args.max_clients} clients, {result['date']}", out / "soak.png")
    print(f"storygpt serve --model {args.model}: {args.duration:.0f} s, 1 to {args.max_clients} clients "
          f"({cycles} cycles of {period:.0f} s); {result['machine']}; load average {result['load_average']}")
    print(f"requests: {result['totals']}")
    for kind, by_outcome in counts.items():
        print(f"  {kind}: {by_outcome}")
    print(f"RSS: {rss['rss_start_mb']} MB at start, {rss['rss_after_warmup_mb']} MB after the warm-up "
          f"({rss['warmup_s']} s), {rss['rss_end_mb']} MB at the end ({rss['change']:+.1%}), peak {rss['rss_peak_mb']} MB")
    print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
    for line in failures:
        print(f"soak: FAILED: {line}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    run_main(main)
