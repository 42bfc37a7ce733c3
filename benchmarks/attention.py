"""Attention: PyTorch SDPA (FlashAttention-style kernel) vs naive attention, forward + backward.

The naive path materialises the T x T score matrix (softmax(QK^T/sqrt(d) + mask) V, as storygpt's
`naive_attention`); SDPA never does; "blocked" is storygpt's `blocked_attention`, the naive path
run one block of 128 queries at a time against only the keys each block can see. For each dtype (fp32, and bf16 where the CPU computes it
natively) and sequence length: the median time of forward+backward (contenders alternating) and the
peak memory each needs beyond its inputs, measured in a fresh process per case (peak RSS minus RSS
once the inputs exist), causal, batch 4 x 4 heads x 64. The bf16 rows are why storygpt's
`attention="auto"` uses the blocked matmul path on CPUs in bf16 up to 1024 keys, and SDPA elsewhere.

    python benchmarks/attention.py [--lengths 512,2048] [--rounds 5] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from common import alternate, header, median, peak_rss_bytes, reset_peak_rss, run_main, save, table

from storygpt.model.attention import blocked_attention, naive_attention
from storygpt.model.device import DTYPES, cpu_has_native_bf16

B, H, D = 4, 4, 64
KINDS = ("sdpa", "blocked", "naive")


def attend(kind: str, q, k, v):
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kind == "blocked":
        return blocked_attention(q, k, v)
    return naive_attention(q, k, v)


def inputs(T: int, dtype: str = "fp32"):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=gen).to(DTYPES[dtype]).requires_grad_() for _ in range(3)]


def fwd_bwd(kind: str, q, k, v, grad) -> None:
    attend(kind, q, k, v).backward(grad)
    for t in (q, k, v):
        t.grad = None


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_memory(kind: str, T: int, dtype: str) -> int:
    """Bytes one forward+backward needs beyond its inputs: run once in a fresh process (a second run
    in the same process would reuse the first one's freed memory and hide the peak). The kernel's
    peak-RSS mark is reset once the inputs exist (a forked child starts with its parent's peak)."""
    q, k, v = inputs(T, dtype)
    grad = torch.randn(B, H, T, D).to(DTYPES[dtype])
    torch.empty(1).sum()  # start the thread pool before the baseline
    base = rss_bytes()
    reset_peak_rss()
    fwd_bwd(kind, q, k, v, grad)
    return max(peak_rss_bytes() - base, 0)


def measured_in_fresh_process(kind: str, T: int, dtype: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-of", kind, str(T), dtype], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--memory-of", nargs=3, metavar=("KIND", "T", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        print(peak_memory(args.memory_of[0], int(args.memory_of[1]), args.memory_of[2]))
        return
    if args.smoke:
        args.lengths, args.rounds = "64", 1

    dtypes = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    rows = []
    for dtype in dtypes:
        for T in map(int, args.lengths.split(",")):
            q, k, v = inputs(T, dtype)
            grad = torch.randn(B, H, T, D).to(DTYPES[dtype])
            tol = 1e-4 if dtype == "fp32" else 3e-2
            for kind in ("sdpa", "blocked"):
                torch.testing.assert_close(attend(kind, q, k, v), attend("naive", q, k, v), atol=tol, rtol=tol)
            for kind in KINDS:
                fwd_bwd(kind, q, k, v, grad)
            times = alternate({kind: functools.partial(fwd_bwd, kind, q, k, v, grad) for kind in KINDS}, args.rounds)
            memory = {kind: measured_in_fresh_process(kind, T, dtype) for kind in KINDS}
            for kind in KINDS:
                rows.append({"seq_len": T, "dtype": dtype, "kind": kind, "fwd_bwd_ms": round(1000 * median(times[kind]), 2),
                             "peak_memory_mb": round(memory[kind] / 2**20, 1)})
            naive = rows[-1]
            for r in rows[-3:-1]:
                r["speedup_vs_naive"] = round(naive["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2)
                r["memory_vs_naive"] = round(r["peak_memory_mb"] / max(naive["peak_memory_mb"], 1e-9), 3)
    result = header("attention", batch=B, heads=H, head_dim=D, causal=True, rows=rows)
    save(result, "attention", args.smoke)
    print(f"causal attention, forward + backward, batch {B} x {H} heads x {D}, {result['machine']}")
    print(table(rows, {
        "T": lambda r: str(r["seq_len"]), "dtype": lambda r: r["dtype"], "attention": lambda r: r["kind"],
        "fwd+bwd": lambda r: f"{r['fwd_bwd_ms']:,.1f} ms", "peak memory": lambda r: f"{r['peak_memory_mb']:,.0f} MB",
        "vs naive": lambda r: (f"{r['speedup_vs_naive']:.2f}x faster, {100 * r['memory_vs_naive']:.0f}% memory"
                               if "speedup_vs_naive" in r else ""),
    }))
    if not args.smoke:
        print(json.dumps({"note": "peak memory = peak RSS - RSS with inputs allocated, fresh process per case"}))


if __name__ == "__main__":
    run_main(main)
