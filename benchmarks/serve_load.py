"""Load on `storygpt serve`: N concurrent streaming completions through the `openai` client, on loopback.

    python benchmarks/serve_load.py [--model DIR] [--requests 64] [--max-tokens 128] [--max-concurrency N] [--compile] [--smoke]

Starts `storygpt serve` (default: the shipped model) on a free 127.0.0.1 port, sends one warm-up request, then
all --requests streaming completions at once (seeds 0..N-1, sampled, so stories may end before --max-tokens).
Reports latency (request sent to `[DONE]`), time to first token, total new tokens per second of wall time and
failures, as a markdown table and as JSON in benchmarks/results/serve_load.json. The server is stopped at the
end, whatever happens; every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from storygpt.device import machine_description

RESULTS = Path(__file__).parent / "results"
PROMPT = "Once upon a time"


def start_server(args) -> tuple[subprocess.Popen, str]:
    """`storygpt serve --port 0`, and the URL it prints once it listens."""
    cmd = [sys.executable, "-m", "storygpt", "serve", "--port", "0", "--log-level", "warning",
           "--max-queue", str(args.requests)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--max-concurrency", str(args.max_concurrency)] if args.max_concurrency else []
    cmd += ["--compile"] if args.compile else []
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()  # "storygpt serve: http://127.0.0.1:PORT/v1 (...)" or EOF on failure
    if not line.startswith("storygpt serve: http"):
        server.kill()
        sys.exit(f"storygpt serve did not start: {line.strip()!r}")
    threading.Thread(target=server.stdout.read, daemon=True).start()  # a full pipe would block the server
    return server, line.split()[2]


async def one(client: AsyncOpenAI, model: str, seed: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens, done = None, None, False
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, seed=seed,
                                             stream=True, stream_options={"include_usage": True})
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


async def load(url: str, model: str, n: int, max_tokens: int, timeout: float) -> tuple[list, float]:
    async with AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout) as client:
        await one(client, model, seed=-1, max_tokens=8)  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(one(client, model, i, max_tokens) for i in range(n)), return_exceptions=True),
            timeout=timeout)
        return results, time.perf_counter() - t0


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--requests", type=int, default=64, help="sent at once")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-concurrency", type=int, default=None, help="server workers (default: the server's)")
    ap.add_argument("--compile", action="store_true", help="start the server with --compile")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the whole load")
    ap.add_argument("--smoke", action="store_true", help="8 requests of 8 tokens, nothing written")
    ap.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.max_tokens = 8, 8
    server, url = start_server(args)
    try:
        health = httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json()
        model = health["models"][0]
        results, wall = asyncio.run(load(url, model, args.requests, args.max_tokens, args.timeout))
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    ok = [r for r in results if isinstance(r, dict)]
    failures = [repr(r) for r in results if not isinstance(r, dict)]
    latencies, ttfts = [r["latency_s"] for r in ok], [r["ttft_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    row = {"requests": args.requests, "concurrency": args.requests, "server_workers": health["max_concurrency"],
           "compiled": args.compile, "max_tokens": args.max_tokens, "completed": len(ok), "failures": len(failures),
           "p50_latency_s": round(statistics.median(latencies), 2) if ok else None,
           "p99_latency_s": round(percentile(latencies, 99), 2) if ok else None,
           "p50_ttft_s": round(statistics.median(ttfts), 2) if ok else None,
           "p99_ttft_s": round(percentile(ttfts, 99), 2) if ok else None,
           "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}
    result = {"benchmark": "serve_load", "model": model, "date": str(date.today()),
              "machine": f"{machine_description()}, {os.cpu_count()} cores", "prompt": PROMPT, "rows": [row],
              "errors": failures[:5]}
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"storygpt serve{' --compile' if args.compile else ''}, model {model}, {row['server_workers']} workers; "
          f"{result['machine']}")
    print("| requests | concurrency | max_tokens | p50 latency | p99 latency | p50 first token | tokens | tokens/s "
          "| failures |\n|---|---|---|---|---|---|---|---|---|")
    if ok:
        print(f"| {row['requests']} | {row['concurrency']} | {row['max_tokens']} | {row['p50_latency_s']:.2f} s "
              f"| {row['p99_latency_s']:.2f} s | {row['p50_ttft_s']:.2f} s | {tokens:,} | {row['tokens_per_s']:,.0f} "
              f"| {len(failures)} |")
    for failure in failures[:5]:
        print(f"failed: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
