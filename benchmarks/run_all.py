"""Every speed benchmark in one command: four tables and a chart.

    python benchmarks/run_all.py --nanogpt ../peers/nanoGPT --llama2c ../peers/llama2.c [--smoke]

Runs, one after the other: the training step (vs transformers and nanoGPT), decoding (vs
transformers and llama2.c's run.c), attention (SDPA vs naive) and data preparation (all cores vs
one). Each script writes its JSON to benchmarks/results/; this one collects their markdown tables in
benchmarks/results/summary.md and draws benchmarks/results/benchmarks.png. The peer checkouts are
used by the run only (the scripts build or import them from where they are); without them, those
columns are left out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import run_main

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def run(script: str, extra: list[str]) -> str:
    cmd = [sys.executable, str(HERE / script), *extra]
    print(f"$ {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{script} failed:\n{out.stderr[-3000:]}")
    print(out.stdout, f"({time.perf_counter() - t:.0f} s)\n", sep="", flush=True)
    return out.stdout


def chart(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=110)
    train = json.loads((RESULTS / "train_throughput.json").read_text())
    ax = axes[0][0]
    modes = sorted({(r["dtype"], r["compiled"]) for r in train["rows"]}, key=lambda m: (m[1], m[0]))
    contenders = list(dict.fromkeys(r["contender"] for r in train["rows"]))
    width = 0.8 / len(contenders)
    for i, name in enumerate(contenders):
        vals = [next((r["tokens_per_s"] for r in train["rows"] if r["contender"] == name
                      and (r["dtype"], r["compiled"]) == m), 0) for m in modes]
        ax.bar([j + i * width for j in range(len(modes))], vals, width, label=name)
    ax.set_xticks([j + width * (len(contenders) - 1) / 2 for j in range(len(modes))],
                  [f"{d}{' compiled' if c else ''}" for d, c in modes])
    ax.set_title(f"training step, tokens/s (T={train['seq_len']}, higher is better)")
    ax.legend()

    decode = json.loads((RESULTS / "decode.json").read_text())
    ax = axes[0][1]
    batches = sorted({r["batch"] for r in decode["rows"]})
    names = list(dict.fromkeys(r["contender"] for r in decode["rows"]))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [next((r["tokens_per_s"] for r in decode["rows"] if r["contender"] == name and r["batch"] == b), 0)
                for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], vals, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_title("decoding, tokens/s (greedy, 256 new tokens)")
    ax.legend(fontsize=7)

    attn = json.loads((RESULTS / "attention.json").read_text())
    ax = axes[1][0]
    cases = list(dict.fromkeys((r["dtype"], r["seq_len"]) for r in attn["rows"]))
    kinds = list(dict.fromkeys(r["kind"] for r in attn["rows"]))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        picked = [next(r for r in attn["rows"] if (r["dtype"], r["seq_len"]) == c and r["kind"] == kind) for c in cases]
        bars = ax.bar([j + i * width for j in range(len(cases))], [r["fwd_bwd_ms"] for r in picked], width, label=kind)
        for bar, r in zip(bars, picked):
            ax.annotate(f"{r['peak_memory_mb']:,.0f} MB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(cases))], [f"{d} T={T}" for d, T in cases])
    ax.set_yscale("log")
    ax.set_title("attention forward+backward, ms, log scale (labels: peak memory)")
    ax.legend()

    prep = json.loads((RESULTS / "data_prep.json").read_text())
    ax = axes[1][1]
    rows = prep["rows"]
    ax.bar(range(len(rows)), [r["mb_per_s"] for r in rows], color="tab:purple")
    ax.set_xticks(range(len(rows)), [f"{r['input_mb']:.0f} MB input\n{r.get('bucket_mb', 128)} MB buckets\n"
                                     f"{r['workers']} thread(s)\n{r['peak_memory_mb']:.0f} MB peak"
                                     for r in rows], fontsize=7)
    ax.set_title("data prepare, MB/s")
    fig.suptitle(f"storygpt benchmarks, {train['date']}, {train['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", help="a nanoGPT checkout")
    ap.add_argument("--llama2c", help="a llama2.c checkout")
    ap.add_argument("--smoke", action="store_true", help="seconds-long versions (writes no results)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    smoke = ["--smoke"] if args.smoke else []
    tables = {
        "Training step": run("train_throughput.py", smoke + (["--nanogpt", args.nanogpt] if args.nanogpt else [])),
        "Decoding": run("decode.py", smoke + (["--llama2c", args.llama2c] if args.llama2c else [])),
        "Attention": run("attention.py", smoke),
        "Data preparation": run("data_prep.py", smoke),
    }
    if args.smoke:
        print(f"smoke run done in {time.perf_counter() - t0:.0f} s")
        return
    summary = "\n".join(f"### {title}\n\n{text.strip()}\n" for title, text in tables.items())
    (RESULTS / "summary.md").write_text(summary)
    chart(RESULTS / "benchmarks.png")
    print(f"-> {RESULTS / 'summary.md'}, {RESULTS / 'benchmarks.png'} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    run_main(main)
