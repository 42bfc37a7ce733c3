"""What every benchmark shares: the machine's matmul peak, alternating timed rounds, JSON + markdown out.

Absolute numbers are noisy on shared machines, so each script measures its contenders in the same run,
round-robin (A B C A B C ...), and reports medians and ratios.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from storygpt.errors import StoryGPTError
from storygpt.model.device import machine_description

RESULTS = Path(__file__).parent / "results"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large square torch.mm in `dtype` on this machine (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


def reset_peak_rss() -> None:
    """Set this process's peak resident size (VmHWM) back to its current size (Linux): a forked child
    otherwise starts with its parent's peak."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_bytes() -> int:
    """This process's peak resident size since it started or since `reset_peak_rss` (Linux)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def alternate(runs: dict[str, Callable[[], float | None]], rounds: int) -> dict[str, list[float]]:
    """Call each contender once per round, in turn, each round starting one contender later (so no
    contender always runs first, or always after the same one); a call returns its own measurement,
    or None to be timed here (seconds). Returns every round's measurement per contender."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = runs[name]
            t = time.perf_counter()
            value = run()
            out[name].append(time.perf_counter() - t if value is None else value)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def header(benchmark: str, **fields) -> dict:
    return {"benchmark": benchmark, "date": str(date.today()), "machine": machine_description(), **fields}


def save(result: dict, name: str, smoke: bool) -> None:
    """benchmarks/results/NAME.json (smoke runs write nothing: they only check that the script works)."""
    if smoke:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def table(rows: list[dict], columns: dict[str, Callable[[dict], str]]) -> str:
    """A markdown table: one column per (title, how to format a row)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r) for fmt in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def stop_server(server: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a server process the benchmark started: SIGTERM (it drains and exits), SIGKILL after `timeout` s."""
    server.terminate()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's main(): bad input (a StoryGPTError: a missing model, a bad value) ends as one line
    on stderr and exit code 2, as in the storygpt CLI, not as a traceback."""
    try:
        main()
    except StoryGPTError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
