"""Load on `storygpt serve`: N concurrent streaming completions, on loopback.

    python benchmarks/serve_load.py [--model DIR] [--concurrency 1 8 64 256] [--max-tokens 128] [--dtype fp32]
                                    [--max-concurrency N] [--baseline [REF]] [--threads N] [--compile] [--smoke]
                                    [--client plain|openai] [--no-llama-cpp] [--llama-cpp-sdist PATH]

The client runs on the same cores as the server, so its CPU per streamed token is taken from the server's (each
row reports it): `--client plain` (default) reads the Server-Sent Events with aiohttp and `json.loads`, 0.03 ms of
CPU per token against 0.19 ms for `--client openai` (the openai package: httpx, its SSE decoder and a pydantic
object per chunk; 2-core EPYC, 64 streams), which measures what a Python application built on that package sees
beside the server. Every server is measured through the same client.

Starts `storygpt serve` on one model (default: the shipped model; a server of two models would give each half
the cores) on a free 127.0.0.1 port with a queue as long as the largest load, sends one warm-up request, then
for each --concurrency level N sends N streaming completions at once (prompt "Once upon a time", seeds
0..N-1, sampled, so stories may end before --max-tokens) and waits for all of them. Reports per level:
latency (request sent to `[DONE]`) p50/p99, time to first token, total new tokens per second of wall time,
503 answers (queue full) and other failures, as a markdown table and as JSON
in benchmarks/results/serve_load.json.

--baseline also measures the server as it was before continuous batching (one worker thread per request,
`--max-concurrency` workers): the source tree of git revision REF (default: the last one before
src/storygpt/batching.py) is unpacked into a temporary folder and run with this Python, one server after the
other on the same machine. --threads N runs the servers with OMP_NUM_THREADS=N (torch threads). Servers are
stopped at the end, whatever happens; every request has a timeout.

Then llama.cpp's `llama-server` runs the same load through the same client code: the model exported with
`storygpt export --format gguf` (f32 for --dtype fp32, else f16), `-np` storygpt's slots, continuous batching,
a context of slots x the model's context (each slot the model's), `-t`/`-tb` the threads storygpt's server
used (--threads, else torch's default), llama.cpp built from the source the llama-cpp-python sdist vendors
(benchmarks/llamacpp.py: built once into a cache; skipped with one line where there is no compiler, with
--no-llama-cpp, and in --smoke runs unless already built). Both servers get the same request: temperature 0.8,
top-p 0.95, no top-k; llama-server also min-p 0 (its default chain has top-k 40 and min-p 0.05 on top).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import date
from io import BytesIO
from pathlib import Path

import aiohttp
import httpx
from common import run_main, stop_server
from llamacpp import LlamaCpp, add_arguments, from_args
from openai import APIStatusError, AsyncOpenAI

from storygpt.model.device import machine_description

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
PROMPT = "Once upon a time"
SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # storygpt's defaults, sent to both servers
LLAMA_SAMPLING = {"top_k": 0, "min_p": 0.0}  # llama-server's other defaults, off as storygpt has them


def baseline_tree(ref: str | None, folder: Path) -> tuple[str, Path]:
    """`src/` of git revision `ref` (default: the last one before continuous batching, i.e. the parent of the
    commit that added src/storygpt/batching.py), in `folder`."""
    git = ["git", "-C", str(ROOT)]
    if ref is None:
        added = subprocess.run(git + ["log", "--diff-filter=A", "--format=%H", "--", "src/storygpt/batching.py"],
                               capture_output=True, text=True, check=True).stdout.split()[-1]
        ref = f"{added}^"
    commit = subprocess.run(git + ["rev-parse", "--short", ref], capture_output=True, text=True, check=True)
    archive = subprocess.run(git + ["archive", "--format=tar", ref, "src"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return commit.stdout.strip(), folder / "src"


def start_server(args, max_queue: int, source: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`storygpt serve --port 0` (from `source` when given), and the URL it prints once it listens."""
    cmd = [sys.executable, "-m", "storygpt", "serve", "--port", "0", "--log-level", "warning",
           "--max-queue", str(max_queue), "--dtype", args.dtype]
    if args.model or source is None:  # one model, as llama-server serves: all the cores are its (older trees: theirs)
        cmd += ["--model", args.model or "default"]
    cmd += ["--max-concurrency", str(args.max_concurrency)] if args.max_concurrency else []
    cmd += ["--compile"] if args.compile else []
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=source or None)
    line = server.stdout.readline()  # "storygpt serve: http://127.0.0.1:PORT/v1 (...)" or EOF on failure
    if not line.startswith("storygpt serve: http"):
        server.kill()
        sys.exit(f"storygpt serve did not start: {line.strip()!r}")
    threading.Thread(target=server.stdout.read, daemon=True).start()  # a full pipe would block the server
    return server, line.split()[2]


class Refused(Exception):
    """An answer other than 200 to a streamed request, from the plain client (the openai one raises its own)."""

    def __init__(self, status_code: int, body: str):
        super().__init__(f"HTTP {status_code}: {body}")
        self.status_code = status_code


async def one_plain(client: aiohttp.ClientSession, url: str, model: str, seed: int, max_tokens: int,
                    extra: dict) -> dict:
    """One streamed completion read as Server-Sent Events: each `data:` line parsed by json, nothing more."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}, **SAMPLING, **extra}
    t0 = time.perf_counter()
    first, tokens, done = None, None, False
    async with client.post(url + "/completions", json=body) as response:
        if response.status != 200:
            raise Refused(response.status, (await response.text(errors="replace"))[:300])
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            for c in chunk.get("choices") or []:
                if c.get("text") and first is None:
                    first = time.perf_counter() - t0
                done = done or bool(c.get("finish_reason"))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not done or tokens is None:
        raise RuntimeError("stream ended without a finish reason or usage")
    return {"latency_s": time.perf_counter() - t0, "ttft_s": first or 0.0, "tokens": tokens}


async def one_openai(client: AsyncOpenAI, url: str, model: str, seed: int, max_tokens: int, extra: dict) -> dict:
    """One streamed completion through the `openai` package (its SSE decoder and a pydantic object per chunk; the
    client has the URL)."""
    t0 = time.perf_counter()
    first, tokens, done = None, None, False
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, seed=seed,
                                             stream=True, stream_options={"include_usage": True}, **SAMPLING,
                                             extra_body=extra or None)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].finish_reason:
            done = True
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    if not done or tokens is None:
        raise RuntimeError("stream ended without a finish reason or usage")
    return {"latency_s": time.perf_counter() - t0, "ttft_s": first or 0.0, "tokens": tokens}


def client_for(kind: str, url: str, timeout: float):
    """(client, its one-request function) for `--client plain` or `--client openai`."""
    if kind == "openai":
        return AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout), one_openai
    # no cap on connections (every stream at once), and a connection per request: llama-server may close a kept-alive
    # connection after a streamed answer, and a request sent on it then fails with "Server disconnected"
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)), one_plain


async def load(url: str, model: str, levels: list[int], max_tokens: int, timeout: float, kind: str = "plain",
               extra: dict | None = None) -> list[tuple[list, float, float]]:
    """For each level, the results of that many requests sent at once (dicts or exceptions), the wall time and the
    client's CPU seconds (this process's)."""
    out = []
    client, one = client_for(kind, url, timeout)
    async with client:
        await one(client, url, model, -1, 8, extra or {})  # warm-up
        for n in levels:
            t0, cpu = time.perf_counter(), time.process_time()
            results = await asyncio.wait_for(
                asyncio.gather(*(one(client, url, model, i, max_tokens, extra or {}) for i in range(n)),
                               return_exceptions=True),
                timeout=timeout)
            out.append((results, time.perf_counter() - t0, time.process_time() - cpu))
    return out


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def row(server: str, workers: int, n: int, results: list, wall: float, cpu: float, args) -> dict:
    ok = [r for r in results if isinstance(r, dict)]
    busy = [r for r in results if isinstance(r, (APIStatusError, Refused)) and r.status_code == 503]
    failures = [repr(r) for r in results if not isinstance(r, dict) and not any(r is b for b in busy)]
    latencies, ttfts = [r["latency_s"] for r in ok], [r["ttft_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {"server": server, "requests": n, "concurrency": n, "server_slots_or_workers": workers,
            "compiled": args.compile, "max_tokens": args.max_tokens, "completed": len(ok), "busy_503": len(busy),
            "failures": len(failures), "errors": failures[:3],
            "p50_latency_s": round(statistics.median(latencies), 2) if ok else None,
            "p99_latency_s": round(percentile(latencies, 99), 2) if ok else None,
            "p50_ttft_s": round(statistics.median(ttfts), 2) if ok else None,
            "p99_ttft_s": round(percentile(ttfts, 99), 2) if ok else None,
            "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "client_cpu_ms_per_token": round(1000 * cpu / tokens, 3) if tokens else None}


def measure(args, name: str, source: Path | None = None) -> tuple[str, list[dict]]:
    server, url = start_server(args, max(args.concurrency), source)
    try:
        health = httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json()
        model = health["models"][0]
        runs = asyncio.run(load(url, model, args.concurrency, args.max_tokens, args.timeout, args.client))
    finally:
        stop_server(server)
    return model, [row(name, health["max_concurrency"], n, results, wall, cpu, args)
                   for n, (results, wall, cpu) in zip(args.concurrency, runs)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_llama_server(args, llama: LlamaCpp, slots: int, folder: Path) -> tuple[dict, list[dict]]:
    """llama-server on the model's gguf export, `slots` slots, through the same client as storygpt serve."""
    import torch

    from storygpt.convert.gguf import GGUF_FILE, export_gguf
    from storygpt.model import load_model, shipped_or

    net, tokenizer, _ = load_model(shipped_or(args.model or "default"))
    fmt = "f32" if args.dtype == "fp32" else "f16"
    gguf = export_gguf(net, tokenizer, folder / "gguf", fmt) / GGUF_FILE
    ctx, threads, port = net.cfg.max_seq_len, args.threads or torch.get_num_threads(), free_port()
    cmd = [str(llama.server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-a", "storygpt-gguf",
           "-np", str(slots), "-c", str(slots * ctx), "-cb", "-t", str(threads), "-tb", str(threads), "--no-webui"]
    log = folder / "llama-server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # 503 while the model loads, 200 once it serves
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"llama-server did not start: {log.read_text()[-1500:]}")
            time.sleep(0.2)
        runs = asyncio.run(load(url + "/v1", "storygpt-gguf", args.concurrency, args.max_tokens, args.timeout,
                                args.client, LLAMA_SAMPLING))
    finally:
        stop_server(server)
    setup = {"version": llama.version, "gguf": fmt, "slots": slots, "context": slots * ctx, "threads": threads,
             "command": " ".join(["llama-server", *cmd[1:2], "model.gguf", *cmd[3:]])}
    rows = [row("llama-server", slots, n, results, wall, cpu, args) | {"compiled": None}
            for n, (results, wall, cpu) in zip(args.concurrency, runs)]
    return setup, rows


def side_by_side(rows: list[dict]) -> str:
    """storygpt's engine next to llama-server, one line per stream count."""
    ours = {r["concurrency"]: r for r in rows if r["server"] == "engine" and r["completed"]}
    theirs = {r["concurrency"]: r for r in rows if r["server"] == "llama-server" and r["completed"]}
    lines = ["| streams | tokens/s storygpt / llama-server | × | p50 latency | p99 latency | p50 first token |",
             "|---|---|---|---|---|---|"]
    for n in sorted(set(ours) & set(theirs)):
        a, b = ours[n], theirs[n]
        lines.append(f"| {n} | {a['tokens_per_s']:,.0f} / {b['tokens_per_s']:,.0f} | "
                     f"{a['tokens_per_s'] / b['tokens_per_s']:.2f} | {a['p50_latency_s']:.2f} / {b['p50_latency_s']:.2f} s "
                     f"| {a['p99_latency_s']:.2f} / {b['p99_latency_s']:.2f} s | {a['p50_ttft_s']:.2f} / {b['p50_ttft_s']:.2f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256], help="requests sent at once")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--max-concurrency", type=int, default=None, help="server slots / workers (default: the server's)")
    ap.add_argument("--baseline", nargs="?", const="", default=None, metavar="REF",
                    help="also run the per-request server of git revision REF (default: the last one before the "
                         "engine)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the servers")
    ap.add_argument("--compile", action="store_true", help="start the servers with --compile")
    ap.add_argument("--client", choices=["plain", "openai"], default="plain",
                    help="plain: aiohttp reading the events with json (default); openai: the openai package")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for each level")
    ap.add_argument("--smoke", action="store_true", help="8 requests of 8 tokens, nothing written")
    ap.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    add_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        args.concurrency, args.max_tokens = [8], 8
    load_before = os.getloadavg()[0]
    model, rows = measure(args, "engine")
    baseline = None
    if args.baseline is not None:
        with tempfile.TemporaryDirectory() as folder:
            commit, source = baseline_tree(args.baseline or None, Path(folder))
            baseline = f"per-request server of {commit}"
            rows += measure(args, f"per-request ({commit})", source)[1]
    llama, llama_server = from_args(args, build=not args.smoke), None  # smoke: only a build already cached
    if llama is not None:
        with tempfile.TemporaryDirectory() as folder:
            llama_server, more = measure_llama_server(args, llama, rows[0]["server_slots_or_workers"], Path(folder))
        rows += more
    result = {"benchmark": "serve_load", "model": model, "date": str(date.today()), "dtype": args.dtype,
              "machine": f"{machine_description()}, {os.cpu_count()} cores", "prompt": PROMPT,
              "threads": args.threads or "default", "client": args.client, "baseline": baseline, "llama_server": llama_server,
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "command": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]), "rows": rows}
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"storygpt serve{' --compile' if args.compile else ''} --dtype {args.dtype}, model {model}; "
          f"{result['machine']}; load average {result['load_average']}; {args.client} client")
    if llama_server is not None:
        print(f"llama-server: {llama_server['version']}; {llama_server['command']}")
        print(side_by_side(rows))
    print("| server | slots / workers | requests | concurrency | max_tokens | p50 latency | p99 latency "
          "| p50 first token | tokens | tokens/s | client CPU per token | 503s | failures |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["completed"]:
            print(f"| {r['server']} | {r['server_slots_or_workers']} | {r['requests']} | {r['concurrency']} "
                  f"| {r['max_tokens']} | {r['p50_latency_s']:.2f} s | {r['p99_latency_s']:.2f} s "
                  f"| {r['p50_ttft_s']:.2f} s | {r['tokens']:,} | {r['tokens_per_s']:,.0f} "
                  f"| {r['client_cpu_ms_per_token']:.3f} ms | {r['busy_503']} "
                  f"| {r['failures']} |")
        for failure in r["errors"]:
            print(f"failed: {failure}", file=sys.stderr)
    sys.exit(1 if any(r["failures"] for r in rows) else 0)


if __name__ == "__main__":
    run_main(main)
