"""Where a decoded token's time goes, at batch 1: the model's step alone against the whole decoding loop.

    python benchmarks/decode_profile.py [--model DIR] [--tokens 256] [--rounds 3] [--paths ...] [--smoke]

For each path (`eager-fp32`, `eager-bf16`, `compiled-fp32`, `compiled-bf16`, `eager-int8`, `compiled-int8`; bf16
only where the CPU computes it natively):

- full loop: `storygpt.load(dtype=..., compile=...)` then `model.generate("", temperature=0, ignore_eos=True,
  max_new_tokens=N)`, as `storygpt generate` and the server run it (a `Batcher`: the step, sampling, the text);
- step alone: the same N forward passes through `Batcher.forward` (the same cache, positions and compiled
  graphs) in a tight loop, without sampling or text;
- the loop's own time per token is the difference;
- matmuls alone: the step's matrix products (every Linear on one row of activations), run as the step runs
  them (eagerly, or compiled alone with the batch-1 step's freezing, C++ wrapper and autotuned GEMM options); the
  rest of the step (attention over the cache, norms, RoPE, the compiled call itself) is the difference;
- eager paths: a torch.profiler trace of one full loop, its self CPU time split into matmuls (linear/mm/bmm/
  oneDNN/int8 kernels), other aten ops, and the rest (Python, not seen by the profiler), per token (the
  profiler inflates them). In a compiled path with the C++ wrapper the profiler sees none of the kernels.

The three timings alternate round by round (benchmarks/common.py `alternate`); medians are printed, per token in
microseconds and as tokens/s. --smoke: 16 tokens, one round, eager fp32 and compiled fp32 only, no profile.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import alternate, header, median, run_main, save, table
from torch.profiler import ProfilerActivity, profile

import storygpt
from storygpt.generate.batching import Batcher
from storygpt.generate.story_model import CPU_AUTOTUNE
from storygpt.model.device import cpu_has_native_bf16

MATMUL = ("linear", "mm", "addmm", "bmm", "matmul", "mkldnn", "onednn", "_weight_int8pack_mm", "baddbmm")


def step_alone(model, tokens: int):
    """Seconds for `tokens` forward passes at positions 1..tokens of one story in a Batcher's cache."""
    batcher = Batcher(model, slots=1)
    batcher.warm_up()

    @torch.inference_mode()
    def run() -> float:
        t = time.perf_counter()
        token = model.tokenizer.bos_id
        for p in range(tokens):
            batcher.forward([0], [token], [p])
        return time.perf_counter() - t
    return run


def matmuls_alone(model, tokens: int):
    """Seconds for `tokens` rounds of the step's matrix products alone (every Linear of the model, and Int8Linear,
    on one row of activations), run as the step runs them: eagerly, or compiled with the step's options."""
    net = model.model
    linears = [m for m in net.modules() if hasattr(m, "in_features") and m is not net.output]
    linears.append(net.output)
    xs = [torch.randn(1, 1, m.in_features, dtype=model.dtype) for m in linears]

    def products(*xs):
        return [m(x) for m, x in zip(linears, xs)]
    if model.decode_step is not None:
        frozen = model.weights != "int8"
        options = {"freezing": frozen, "cpp_wrapper": True, **CPU_AUTOTUNE}  # the batch-1 step's (story_model.py)
        with torch._inductor.config.patch(options), torch.inference_mode():
            products = torch.compile(products, dynamic=False)
            products(*xs)

    @torch.inference_mode()
    def run() -> float:
        t = time.perf_counter()
        for _ in range(tokens):
            products(*xs)
        return time.perf_counter() - t
    return run


def full_loop(model, tokens: int):
    def run() -> float:
        model.generate("", temperature=0, max_new_tokens=tokens, ignore_eos=True)
        return model.last_stats["seconds"]
    return run


def breakdown(model, tokens: int) -> dict[str, float]:
    """Microseconds per token of one traced full loop, by kind of work."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        model.generate("", temperature=0, max_new_tokens=tokens, ignore_eos=True)
        wall = time.perf_counter() - t
    kinds = {"matmul": 0.0, "other aten ops": 0.0}
    for e in prof.key_averages():
        name = e.key.lower()
        if any(m in name.removeprefix("aten::").split("::")[-1] for m in MATMUL):
            kinds["matmul"] += e.self_cpu_time_total
        elif "::" in name:
            kinds["other aten ops"] += e.self_cpu_time_total
    out = {k: v / tokens for k, v in kinds.items()}
    out["python / rest"] = wall * 1e6 / tokens - sum(out.values())
    out["traced wall"] = wall * 1e6 / tokens
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model or run directory (default: the shipped model)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", nargs="*", default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    paths = ["eager-fp32", "compiled-fp32", "eager-int8", "compiled-int8"]
    if cpu_has_native_bf16():
        paths[2:2] = ["eager-bf16", "compiled-bf16"]
    if args.smoke:
        args.tokens, args.rounds, args.no_profile, paths = 16, 1, True, ["eager-fp32", "compiled-fp32"]
    paths = args.paths or paths
    rows, result = [], header("decode_profile", tokens=args.tokens, rounds=args.rounds, paths={})
    for name in paths:
        kind, dtype = name.split("-")
        model = storygpt.load(args.model, dtype=dtype, compile=kind == "compiled")
        model.generate("", temperature=0, max_new_tokens=args.tokens, ignore_eos=True)  # compile, warm caches
        times = alternate({"matmuls": matmuls_alone(model, args.tokens), "step": step_alone(model, args.tokens),
                           "loop": full_loop(model, args.tokens)}, args.rounds)
        mm_us, step_us, loop_us = (median(times[k]) * 1e6 / args.tokens for k in ("matmuls", "step", "loop"))
        row = {"path": name, "matmul_us": mm_us, "step_us": step_us, "loop_us": loop_us,
               "overhead_us": loop_us - step_us, "tokens_per_s": 1e6 / loop_us, "step_tokens_per_s": 1e6 / step_us}
        if not args.no_profile and kind == "eager":
            row["profile_us"] = breakdown(model, args.tokens)
        rows.append(row)
        result["paths"][name] = row
        print(f"{name}: step {step_us:.0f} us, loop {loop_us:.0f} us per token ({1e6 / loop_us:.0f} tokens/s)",
              flush=True)
    print()
    print(table(rows, {"path": lambda r: r["path"], "matmuls alone (us/token)": lambda r: f"{r['matmul_us']:.0f}",
                       "rest of the step (us)": lambda r: f"{r['step_us'] - r['matmul_us']:.0f}",
                       "step alone (us/token)": lambda r: f"{r['step_us']:.0f}",
                       "full loop (us/token)": lambda r: f"{r['loop_us']:.0f}",
                       "loop around the step (us)": lambda r: f"{r['overhead_us']:.0f}",
                       "tokens/s (step alone)": lambda r: f"{r['step_tokens_per_s']:.0f}",
                       "tokens/s (full loop)": lambda r: f"{r['tokens_per_s']:.0f}"}))
    profiled = [r for r in rows if "profile_us" in r]
    if profiled:
        kinds = list(profiled[0]["profile_us"])
        print("\nprofiled full loop (eager paths), microseconds per token (torch.profiler self CPU time):\n")
        print(table(profiled, {"path": lambda r: r["path"],
                               **{k: (lambda r, k=k: f"{r['profile_us'][k]:.0f}") for k in kinds}}))
    save(result, "decode_profile", args.smoke)


if __name__ == "__main__":
    run_main(main)
