"""Where a model loses its characters' names: the suite's names-kept measure on its 44 story beginnings, split
by whether the completion has a misspelled word (a derailed story), for several models in one run; with the
suite's names-used-again and ended measures of the same completions (e.g. at a second seed).

    python benchmarks/names_probe.py --model v2=src/storygpt/default_model v1=OLD [--samples 10] [--seed 1000]
                                     [--top-p 1.0] [--max-new-tokens 256] [--out names.json]
                                     [--stories DATA_DIR [--beginnings 150] [--cut 0.2]]

Sampling is the suite's (storygpt.generation.sample with a SuiteConfig: temperature 1.0, 256 new tokens);
--top-p below 1 cuts the tail, as a diagnostic (the suite's setting is 1.0). --stories takes the beginnings
from the val split of prepared data instead (its first N stories of at least 60 words, cut at --cut of their
words): a dev set to choose a recipe on, so that the suite's prompts only report.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from common import run_main

from storygpt import load
from storygpt.eval import SuiteConfig, load_prompts
from storygpt.eval.generation import sample
from storygpt.eval.selfsample import beginnings
from storygpt.text import measures


def probe(path: str, prompts: list[str], cfg: SuiteConfig) -> dict:
    completions, ended, speed = sample(load(path, dtype="fp32"), prompts, cfg, progress=False)
    kept = {"clean": [], "misspelled": []}
    bad_words = total_words = 0
    new_names: Counter = Counter()
    for prompt, group in zip(prompts, completions):
        for text in group:
            bad, total = measures.misspelled(text)
            bad_words, total_words = bad_words + bad, total_words + total
            brought_in = measures.new_names(prompt, text)
            kept["misspelled" if bad else "clean"].append(not brought_in)
            new_names.update(brought_in)
    every = kept["clean"] + kept["misspelled"]
    reused = [r for p, group in zip(prompts, completions) for c in group if (r := measures.reuses_names(p, c)) is not None]
    finished = [e for group in ended for e in group]
    return {"names": sum(every) / len(every), "completions": len(every),
            "names_reused": sum(reused) / len(reused) if reused else None, "ended": sum(finished) / len(finished),
            "misspelled_words": bad_words / max(1, total_words),
            **{f"names_{k}": (sum(v) / len(v) if v else None) for k, v in kept.items()},
            **{f"completions_{k}": len(v) for k, v in kept.items()},
            "new_names": new_names.most_common(10), "seconds": round(speed["seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", required=True, metavar="NAME=PATH")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--stories", metavar="DATA_DIR", help="beginnings from this prepared data's val split")
    ap.add_argument("--beginnings", type=int, default=150, help="with --stories: how many")
    ap.add_argument("--cut", type=float, default=0.2, help="with --stories: share of each story's words kept")
    args = ap.parse_args()
    prompts = beginnings(args.stories, "val", args.beginnings, args.cut) if args.stories else load_prompts(None)
    cfg = SuiteConfig(samples=args.samples, seed=args.seed, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    results = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        results[name] = probe(path or name, prompts, cfg)
        r = results[name]
        share = {k: "-" if r[f"names_{k}"] is None else f"{r[f'names_{k}']:.3f}" for k in ("clean", "misspelled")}
        print(f"{name}: names kept {r['names']:.3f} of {r['completions']} | without a misspelled word "
              f"{share['clean']} ({r['completions_clean']}) | with one {share['misspelled']} "
              f"({r['completions_misspelled']}) | misspelled words {r['misspelled_words']:.4f} | names used again "
              f"{'-' if r['names_reused'] is None else format(r['names_reused'], '.3f')} | ended {r['ended']:.3f}",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"samples": args.samples, "seed": args.seed, "top_p": args.top_p, "stories": args.stories,
                       "beginnings": len(prompts), "models": results}, f, indent=2)


if __name__ == "__main__":
    run_main(main)
