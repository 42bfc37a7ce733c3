"""The TinyStories paper's claims, tested at laptop scale: a grid of models trained under one budget each,
graded with the story-quality suite; writes docs/claims.md, its plots and the JSON of every number.

    python benchmarks/claims.py [--budget-minutes 8] [--out docs] [--work runs/claims] [--samples 4] [--smoke]

The grid (same data, same recipe, same seed; only the factor studied changes):
- width: dim 64, 128, 256, 512 at 4 layers (heads of 64 dimensions; one head at dim 64);
- depth: 1, 2, 4, 8 layers at dim 256 (the 4-layer model is shared with the width series);
- the 256 x 4 model is also graded at 10 points along its run (grammar before consistency?).
Every run is trained on ../shared/data/tinystories/train.txt + train_extra.txt and graded on heldout.txt.

One budget = the same minutes of training on this machine, turned into a step count per model by a short
speed probe (its compiled step time, measured once and kept in WORK/probes.json): each run is then a
step-based recipe, so it is reproducible and can be stopped and resumed exactly. The study runs in
sittings: finished runs, probes and grades are kept in WORK and skipped; a stopped run resumes.

Beyond the suite, the paper's memorisation test: training stories and held-out stories cut at 40% of their
words, the model's greedy ending compared with the true one by Rouge-2 (precision of the model's bigrams,
and F1); a model that copies its training stories scores much higher on them than on held-out ones.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

from claims_report import write_claims
from common import header, run_main

from storygpt.data import prepare, read_meta
from storygpt.eval.suite import SuiteConfig, run_suite, split_story
from storygpt.generate import load
from storygpt.model import ModelConfig, save_model_dir
from storygpt.model.checkpoint import LATEST, checkpoint_weights, load_checkpoint
from storygpt.text import Tokenizer, expand_inputs, iter_stories, train_tokenizer
from storygpt.train import read_log, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
WIDTHS = {f"w{d}": (d, 4) for d in (64, 128, 256, 512)}
DEPTHS = {f"d{n}": (256, n) for n in (1, 2, 8)}
GRID = WIDTHS | DEPTHS  # w256 is the 4-layer point of the depth series too
TRACKED, STAGES = "w256", 10
RECIPE = {"train.batch_size": 16, "train.seq_len": 256, "train.lr": 2e-3, "train.min_lr": 2e-4,
          "train.warmup_steps": 50, "train.weight_decay": 0.1, "model.dropout": 0.0, "model.max_seq_len": 256,
          "train.compile": True, "train.seed": 1337}
TOKENS_PER_STEP = RECIPE["train.batch_size"] * RECIPE["train.seq_len"]


def overrides(dim: int, layers: int, extra: dict | None = None) -> list[str]:
    values = RECIPE | {"model.dim": dim, "model.n_layers": layers, "model.n_heads": max(1, dim // 64)} | (extra or {})
    return [f"{k}={v}" for k, v in values.items()]


# --------------------------------------------------------------------------------------------
# Data, probes, runs
# --------------------------------------------------------------------------------------------
def prepare_data(work: Path, files: list[Path], vocab: int) -> Path:
    data = work / "data"
    if (data / "meta.json").is_file() and read_meta(data)["inputs"] == [str(f) for f in files]:
        return data
    shutil.rmtree(data, ignore_errors=True)
    tok = train_tokenizer(iter_stories(files), vocab_size=vocab)
    tok.save(work / "tokenizer")
    prepare(files, work / "tokenizer", data, progress=False)
    return data


def probe(work: Path, data: Path, name: str, steps: int = 40) -> float:
    """Seconds per training step of this grid point, compiled, after warm-up (kept in WORK/probes.json)."""
    path = work / "probes.json"
    probes = json.loads(path.read_text()) if path.exists() else {}
    if name not in probes:
        run = work / "probe_run"
        shutil.rmtree(run, ignore_errors=True)
        dim, layers = GRID[name]
        every = max(1, steps // 4)
        train(data, run, preset="small", overrides=overrides(dim, layers, {"train.log_interval": every,
                                                                           "train.eval_interval": 10_000}),
              max_steps=steps, progress=False)
        windows = [r["tok_per_s"] for r in read_log(run) if "tok_per_s" in r and r["step"] > every]  # after compiling
        probes[name] = TOKENS_PER_STEP / (sorted(windows)[len(windows) // 2])
        path.write_text(json.dumps(probes, indent=2) + "\n")
        shutil.rmtree(run)
    return probes[name]


def stage_model(run: Path, out: Path) -> Path:
    """The run's latest checkpoint as a model directory (a snapshot along the run)."""
    ckpt = load_checkpoint(run / LATEST)
    cfg = ModelConfig.from_dict(ckpt["config"]["model"])
    info = {"step": ckpt["step"], "tokens": ckpt["tokens"], "train": ckpt["config"]["train"]}
    save_model_dir(out, cfg, checkpoint_weights(run / LATEST, ckpt, cfg), Tokenizer.load(run / "tokenizer"), info)
    return out


def train_point(work: Path, data: Path, name: str, steps: int) -> dict:
    """Train one grid point for `steps` (resuming if it was stopped); the tracked one in STAGES stages, with
    a model directory of each stage. Returns {"model": dir, "stages": [(fraction, dir)]}."""
    run = work / "runs" / name
    dim, layers = GRID[name]
    stages = [round(steps * k / STAGES) for k in range(1, STAGES + 1)] if name == TRACKED else [steps]
    extra = {"train.eval_interval": max(1, steps // STAGES), "train.checkpoint_interval": max(1, steps // 20)}
    done = []
    for k, stop in enumerate(stages, 1):
        stage_dir = run / f"stage_{k:02d}"
        if not stage_dir.exists():
            summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
            if summary.get("step", 0) < stop:
                resume = (run / LATEST).exists()
                summary = train(data, run, preset="small", overrides=overrides(dim, layers, extra), resume=resume,
                                max_steps=steps, until_step=stop if stop < steps else None, progress=False)
                if summary["stop_reason"] == "interrupted":  # Ctrl-C: the study stops here, to resume later
                    raise SystemExit(f"{name}: interrupted at step {summary['step']}; run again to resume")
            if name == TRACKED:
                stage_model(run, stage_dir)
        done.append((stop / steps, stage_dir if name == TRACKED else run / "model"))
    return {"model": run / "model", "stages": done if name == TRACKED else [], "steps": steps}


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------
def grade(work: Path, models: dict[str, Path], cfg: SuiteConfig, key: str) -> dict:
    """The suite's results per model (kept in WORK/grades_KEY.json as each model is graded; only new models
    are graded)."""
    path = work / f"grades_{key}.json"
    grades = json.loads(path.read_text()) if path.exists() else {}

    def keep(name: str, result: dict) -> None:
        grades[name] = result
        path.write_text(json.dumps(grades, indent=2) + "\n")
        print(f"graded {name}", flush=True)

    todo = [f"{name}={model}" for name, model in models.items() if name not in grades]
    if todo:  # one suite run: the training files are indexed once for all models
        run_suite(todo, cfg, progress=False, on_graded=keep)
    return {n: grades[n] for n in models}


def memorisation(model_dir: Path, train_stories: list[str], heldout: list[str], n: int, seed: int = 0) -> dict:
    """The paper's test: stories cut at 40% of their words, the model's greedy ending against the true rest
    by Rouge-2 (precision: share of the ending's bigrams in the true rest; F1), training vs held-out."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"])
    model = load(model_dir, dtype="fp32")
    out = {}
    for label, stories in (("train", random.Random(seed).sample(train_stories, n)), ("heldout", heldout[:n])):
        scores = []
        for story in stories:
            head, rest = split_story(story, 0.4)
            ending = model.generate(head, temperature=0, max_new_tokens=256)[len(head):]
            s = scorer.score(rest, ending)["rouge2"]
            scores.append((s.precision, s.fmeasure))
        out[label] = {"precision": [p for p, _ in scores], "f1": [f for _, f in scores],
                      "mean_precision": sum(p for p, _ in scores) / n, "mean_f1": sum(f for _, f in scores) / n,
                      "share_precision_above_0.5": sum(p > 0.5 for p, _ in scores) / n}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-minutes", type=float, default=8.0, help="training minutes per grid point")
    ap.add_argument("--work", default="runs/claims", help="runs, probes and grades (kept between sittings)")
    ap.add_argument("--out", default="docs", help="writes OUT/claims.md and OUT/claims/ (plots, results.json)")
    ap.add_argument("--data", default=str(SHARED), help="folder with train.txt, train_extra.txt, heldout.txt")
    ap.add_argument("--samples", type=int, default=4, help="completions per story beginning in the suite")
    ap.add_argument("--memorisation-stories", type=int, default=100)
    ap.add_argument("--only", nargs="*", help="grid points to run now (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny budget and grades, to check the script")
    args = ap.parse_args()
    work, src = Path(args.work), Path(args.data)
    work.mkdir(parents=True, exist_ok=True)
    files = [src / "train.txt", src / "train_extra.txt"]
    heldout_file = src / "heldout.txt"
    out = Path(args.out)
    if args.smoke:  # a few hundred stories, tiny runs, uncompiled; the report goes to WORK/smoke_docs
        args.samples, args.memorisation_stories, args.budget_minutes = 1, 5, 0.05
        RECIPE["train.compile"] = False
        small = work / "smoke.txt"
        small.write_text("".join(f"{s}\n<|endoftext|>\n" for s, _ in zip(iter_stories([files[0]]), range(600))))
        files, out = [small], work / "smoke_docs"
    t0 = time.time()
    data = prepare_data(work, files, 512 if args.smoke else 4096)

    points = {}
    for name in args.only or GRID:
        seconds = probe(work, data, name, steps=12 if args.smoke else 40)
        steps = max(STAGES, math.floor(args.budget_minutes * 60 / seconds))
        print(f"{name}: {seconds:.2f} s/step -> {steps} steps", flush=True)
        points[name] = train_point(work, data, name, steps)
    if args.only:
        return

    suite = SuiteConfig(text=[str(heldout_file)], samples=args.samples, grammar_per_phenomenon=100)
    if args.smoke:
        (work / "smoke_prompts.yaml").write_text("- Once upon a time, there was a dog.\n- Lily had a red ball.\n")
        suite = SuiteConfig(text=[str(heldout_file)], samples=1, grammar_per_phenomenon=5, max_new_tokens=24,
                            prompts=str(work / "smoke_prompts.yaml"))
    finals = grade(work, {n: p["model"] for n, p in points.items()},
                   SuiteConfig(**{**suite.__dict__, "train": [str(f) for f in files]}), "grid")
    stages = grade(work, {f"{TRACKED}@{frac:.1f}": d for frac, d in points[TRACKED]["stages"]}, suite, "stages")
    memo_path = work / "memorisation.json"
    if not memo_path.exists():
        train_stories = list(iter_stories(expand_inputs(files)))
        held = list(iter_stories(expand_inputs([heldout_file])))
        memo_path.write_text(json.dumps({n: memorisation(points[n]["model"], train_stories, held,
                                                         args.memorisation_stories) for n in ("w512", TRACKED)}) + "\n")
    result = header("claims", budget_minutes=args.budget_minutes, samples=args.samples,
                    probes=json.loads((work / "probes.json").read_text()),
                    steps={n: p["steps"] for n, p in points.items()}, grid={n: list(GRID[n]) for n in GRID},
                    tokens_per_step=TOKENS_PER_STEP,
                    grades=finals, stages=stages, memorisation=json.loads(memo_path.read_text()),
                    wall_minutes_this_sitting=round((time.time() - t0) / 60, 1))
    print("->", write_claims(result, out, smoke=args.smoke))


if __name__ == "__main__":
    run_main(main)
