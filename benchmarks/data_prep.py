"""Data preparation throughput: `storygpt data prepare` with all cores vs one thread, and its memory.

Builds a ~100 MB TinyStories-format file (real stories from --source, reshuffled copies; a tiny
built-in generator when the source is missing), then times `prepare` with 1 worker thread and with
one per core (alternating, --rounds times), recording each run's peak resident memory. That input and
a quarter-size one are also prepared in 8 MB buckets, to show that peak memory follows the bucket
size, not the input size. Tokenizer: the shipped default model's.

    python benchmarks/data_prep.py [--mb 100] [--source ../shared/data/tinystories/train.txt] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header, median, run_main, save, table

from storygpt.model import default_model_path
from storygpt.text import EOS_TEXT, iter_stories

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinystories" / "train.txt"


def make_input(path: Path, megabytes: float, source: Path | None) -> int:
    """Write about `megabytes` MB of stories to `path`; returns its size in bytes."""
    if source is not None and source.is_file():
        stories = list(iter_stories([source]))
    else:
        rng = random.Random(0)
        names, things = ["Lily", "Tom", "Mia", "Ben", "Sue"], ["ball", "cat", "kite", "cake", "tree"]
        stories = [f"Once upon a time, {rng.choice(names)} had a {rng.choice(things)}. It was fun. The end."
                   for _ in range(2000)]
    rng, target, size = random.Random(0), int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as fh:
        while size < target:
            rng.shuffle(stories)
            for s in stories:
                record = f"{s}\n{EOS_TEXT}\n"
                fh.write(record)
                size += len(record.encode("utf-8"))
                if size >= target:
                    break
    return path.stat().st_size


def run_one(text: Path, out: Path, workers: int, bucket_mb: int = 128) -> dict:
    """`prepare` in a fresh process: seconds and its peak resident memory (the kernel's mark is reset
    after the imports, since a forked child starts with its parent's peak)."""
    code = ("import json, sys, time\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from common import peak_rss_bytes, reset_peak_rss\n"
            "from storygpt.data import prepare\n"
            "reset_peak_rss()\n"
            "t = time.perf_counter()\n"
            f"prepare([{str(text)!r}], {str(default_model_path())!r}, {str(out)!r}, workers={workers}, "
            f"bucket_bytes={bucket_mb << 20}, progress=False)\n"
            "seconds = time.perf_counter() - t\n"
            "print(json.dumps({'seconds': seconds, 'peak_kb': peak_rss_bytes() // 1024}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:  # generated stories only: the smoke test must not read ../shared
        args.mb, args.rounds, args.source = 0.5, 1, None
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="storygpt-prep-bench-") as tmp:
        tmp = Path(tmp)
        full, quarter = tmp / "stories.txt", tmp / "quarter.txt"
        size = make_input(full, args.mb, args.source)
        qsize = make_input(quarter, args.mb / 4, args.source)
        runs: dict[int, list[dict]] = {1: [], cores: []}
        for r in range(args.rounds):
            for workers in runs:
                runs[workers].append(run_one(full, tmp / f"out-{workers}-{r}", workers))
        # memory vs input size: both inputs in 8 MB buckets (the default 128 MB holds all of either)
        bucketed = [(nbytes / 1e6, run_one(path, tmp / f"out-{path.stem}-8", cores, bucket_mb=8))
                    for path, nbytes in ((full, size), (quarter, qsize))]

    rows = []
    for workers, rs in runs.items():
        seconds = median([r["seconds"] for r in rs])
        rows.append({"workers": workers, "input_mb": round(size / 1e6, 1), "seconds": round(seconds, 2),
                     "mb_per_s": round(size / 1e6 / seconds, 2), "peak_memory_mb": round(max(r["peak_kb"] for r in rs) / 1024, 1)})
    rows[-1]["speedup_vs_one_process"] = round(rows[0]["seconds"] / rows[-1]["seconds"], 2)
    for mb, r in bucketed:
        rows.append({"workers": cores, "input_mb": round(mb, 1), "bucket_mb": 8, "seconds": round(r["seconds"], 2),
                     "mb_per_s": round(mb / r["seconds"], 2), "peak_memory_mb": round(r["peak_kb"] / 1024, 1)})
    result = header("data_prep", cores=cores, tokenizer="default model (4K unigram)", rows=rows)
    save(result, "data_prep", args.smoke)
    print(f"storygpt data prepare, {result['machine']}")
    print(table(rows, {
        "input": lambda r: f"{r['input_mb']:,.1f} MB", "threads": lambda r: str(r["workers"]),
        "buckets": lambda r: f"{r.get('bucket_mb', 128)} MB",
        "time": lambda r: f"{r['seconds']:.1f} s", "MB/s": lambda r: f"{r['mb_per_s']:.2f}",
        "peak memory": lambda r: f"{r['peak_memory_mb']:,.0f} MB",
        "vs one thread": lambda r: f"{r['speedup_vs_one_process']:.2f}x" if "speedup_vs_one_process" in r else "",
    }))


if __name__ == "__main__":
    t0 = time.perf_counter()
    run_main(main)
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
