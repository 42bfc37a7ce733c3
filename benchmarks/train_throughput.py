"""Training-step throughput of a preset: tokens/s for eager/compiled x fp32/bf16, plus MFU.

Each mode runs the real step of `storygpt train` (autocast forward, backward, grad clipping, fused
AdamW) on random tokens, after warm-up steps (which absorb torch.compile's compile time). Modes are
measured in alternating rounds so that machine noise hits them alike; the median round counts.
MFU = model FLOPs per token x tokens/s / the matmul peak measured here (a large torch.mm) in the same dtype.

    python benchmarks/train_throughput.py [--preset small] [--steps 6] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from storygpt.config import preset as get_preset
from storygpt.device import DTYPES, autocast, cpu_has_native_bf16, machine_description
from storygpt.model import Transformer
from storygpt.train import make_optimizer

RESULTS = Path(__file__).parent / "results"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large square matmul in `dtype` on this CPU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def make_step(preset: str, amp: str, compiled: bool, batch_size: int, seq_len: int):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    fwd = torch.compile(model) if compiled else model
    x = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len))
    y = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len))
    dev = torch.device("cpu")

    def step():
        with autocast(dev, amp):
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny preset, 1 step, eager only: checks the script runs")
    ap.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.steps, args.rounds = "tiny", 1, 1
    tc = get_preset(args.preset).train
    B, T = args.batch_size or tc.batch_size, args.seq_len or tc.seq_len

    dtypes = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    modes = [(amp, c) for c in ([False] if args.smoke else [False, True]) for amp in dtypes]
    peaks = {amp: matmul_peak(DTYPES[amp], n=256 if args.smoke else 2048) for amp in dtypes}
    steps, model = {}, None
    for amp, compiled in modes:  # build + warm up (compiles) every mode first
        model, step = make_step(args.preset, amp, compiled, B, T)
        for _ in range(1 if args.smoke else 3):
            step()
        steps[(amp, compiled)] = step
    flops_per_token = model.flops_per_token(T)
    times = {m: [] for m in modes}
    for _ in range(args.rounds):  # alternate modes within each round
        for m in modes:
            t = time.perf_counter()
            for _ in range(args.steps):
                steps[m]()
            times[m].append((time.perf_counter() - t) / args.steps)

    rows = []
    for (amp, compiled), ts in times.items():
        tps = B * T / statistics.median(ts)
        rows.append({"dtype": amp, "compiled": compiled, "tokens_per_s": round(tps, 1),
                     "mfu": round(tps * flops_per_token / peaks[amp], 4),
                     "matmul_peak_gflops": round(peaks[amp] / 1e9, 1)})
    result = {"benchmark": "train_throughput", "preset": args.preset, "batch_size": B, "seq_len": T,
              "params": model.num_params(), "flops_per_token": flops_per_token, "date": str(date.today()),
              "machine": machine_description(), "rows": rows}
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"preset {args.preset}: {model.num_params() / 1e6:.2f}M params, batch {B} x {T} tokens")
    print("| dtype | compiled | tokens/s | MFU | matmul peak (GFLOP/s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {'yes' if r['compiled'] else 'no'} | {r['tokens_per_s']:,.0f} | "
              f"{100 * r['mfu']:.0f}% | {r['matmul_peak_gflops']:,.0f} |")


if __name__ == "__main__":
    main()
