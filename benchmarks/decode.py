"""Decoding speed of a model: tokens/s at batch 1 and 8 (greedy, no early stop), time to first token.

    python benchmarks/decode.py [--model DIR] [--new-tokens 256] [--rounds 3] [--smoke]

Without --model it measures the shipped default model. The end-of-story token is masked out so
every run decodes exactly --new-tokens tokens (the same work each round).
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

import torch

import storygpt
from storygpt.device import machine_description
from storygpt.generate import StoryModel

RESULTS = Path(__file__).parent / "results"


class NoEos(torch.nn.Module):
    """Forbids the end-of-story token so each run decodes the full length."""

    def __init__(self, model, eos_id):
        super().__init__()
        self.inner, self.cfg, self.eos_id = model, model.cfg, eos_id

    def forward(self, idx, targets=None, cache=None):
        logits, loss = self.inner(idx, targets, cache)
        logits[..., self.eos_id] = float("-inf")
        return logits, loss

    def num_params(self):
        return self.inner.num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "decode.json"))
    args = ap.parse_args()
    if args.smoke:
        args.new_tokens, args.rounds = 8, 1
    base = storygpt.load(args.model)
    model = StoryModel(NoEos(base.model, base.tokenizer.eos_id), base.tokenizer, base.info, base.path)
    rows = []
    for batch in map(int, args.batches.split(",")):
        model.generate("Once upon a time", temperature=0, max_new_tokens=4, num_samples=batch)  # warm-up
        runs = []
        for _ in range(args.rounds):
            model.generate("Once upon a time", temperature=0, max_new_tokens=args.new_tokens, num_samples=batch)
            runs.append(dict(model.last_stats))
        med = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
        rows.append({"batch": batch, "new_tokens": args.new_tokens, "tokens_per_s": round(med["tokens_per_s"], 1),
                     "time_to_first_token_ms": round(1000 * statistics.median(r["time_to_first_token_s"] for r in runs), 1)})
    result = {"benchmark": "decode", "model": base.path, "params": base.model.num_params(), "date": str(date.today()),
              "machine": machine_description(), "rows": rows}
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {base.path}: {base.model.num_params() / 1e6:.2f}M params, greedy, {args.new_tokens} new tokens")
    print("| batch | tokens/s (all rows) | time to first token |\n|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['tokens_per_s']:,.0f} | {r['time_to_first_token_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
