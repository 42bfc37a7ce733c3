"""Instruction following: do the stories contain what was asked for?

For each held-out story (never trained on), the instruction asks for what that story has (instruct_data's
`requirements`, seeded per story): three of its words, one of its sentences, and dialogue when it has
quoted speech, and its main character ("a cat named Pip") when the story introduces one so. Every model
writes one story per instruction, at temperature --temperature, in two prompt formats: `fields` (Words: /
Random sentence: / Features: lines, then Story:) and `request` (the same requirements as one plain-language
request). A model that is not instruction-tuned (the base
model) gets the same text as a plain prompt, which it continues: the baseline. Measured per model and
format: the share of stories with all three words (any inflection: jump/jumped), each word, the
sentence (case, punctuation and spacing ignored), dialogue when asked (and when not), the requested
character as the story's main character (its name the most used, its kind in the story), the share that
ended, their length, their fluency (nats per token of the stories alone under `--fluency-model`, the
shipped default model: lower is more ordinary text), and the instruction gain (the stories'
log-likelihood per token after their own instruction minus after another story's: how much a model
reads its instructions, without sampling noise). An instruct model writes each story twice: alone
(`guide=False`) and with guided decoding (guide.py; format names `fields+guide`, `request+guide`). Per
model: the held-out bits per byte of plain stories (forgetting); with `--runs`, the fine-tuning runs'
trainable parameters, time and peak memory.

    python benchmarks/instruct.py --model base=default --model lora=RUN/adapter --model full=RUN2/model \
        [--runs lora=RUN full=RUN2] [--heldout ../shared/data/tinystories/heldout.txt] [--n 200] [--smoke]

Stories are decoded together by a `storygpt.serve.Engine` (continuous batching), each with its own seed.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

from common import header, run_main, save

import storygpt
from storygpt.data.instruct import request_text, requirements
from storygpt.eval import evaluate
from storygpt.eval.scoring import score_tokens
from storygpt.generate.batching import Done, Finish, Piece
from storygpt.generate.engine import END, Engine
from storygpt.text import (
    contains_sentence,
    contains_word,
    expand_inputs,
    has_dialogue,
    header_prompt,
    is_main_character,
    iter_stories,
    request_prompt,
)

HELDOUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "heldout.txt"


def tasks(stories: list[str], seed: int) -> list[dict]:
    """One instruction per story: its requirements, and their two prompts."""
    out = []
    for i, story in enumerate(stories):
        rng = random.Random(f"instruct-bench:{seed}:{i}")
        req = requirements(story, rng)
        if "words" not in req or "sentence" not in req:
            continue
        out.append({"req": req, "story": story, "fields": header_prompt(words=req["words"], sentence=req["sentence"],
                                                        features=req.get("features"), character=req.get("character")),
                    "request": request_prompt(request_text(req, rng))})
    return out


def write_all(model, prompts: list[str], max_new_tokens: int, temperature: float, seed: int,
              slots: int, guide: bool = False) -> tuple[list[str], list[str], float]:
    """Each prompt's story (one sample, seed + its index), decoded in one engine; the finish reasons and tokens/s."""
    engine = Engine(model, slots=slots, max_queue=len(prompts), name="bench")
    texts, reasons = [""] * len(prompts), [""] * len(prompts)
    left, tokens, done, lock = [len(prompts)], [0], threading.Event(), threading.Lock()

    def deliver_to(i):
        def deliver(items):
            with lock:
                for item in items:
                    if isinstance(item, Piece):
                        texts[i] += item.text
                    elif isinstance(item, Finish):
                        reasons[i] = item.reason
                    elif isinstance(item, Done):
                        tokens[0] += item.stats["new_tokens"]
                    elif item is END:
                        left[0] -= 1
                        if left[0] == 0:
                            done.set()
                    elif isinstance(item, BaseException):
                        raise item
        return deliver

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.submit([prompt], 1, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
                                        seed=seed + i, guide=guide), deliver_to(i))
    done.wait()
    seconds = time.perf_counter() - start
    engine.close()
    return [t.strip() for t in texts], reasons, tokens[0] / seconds


def instruction_gain(model, items: list[dict], fmt: str) -> float:
    """How much a model reads its instructions: the mean log-likelihood per token of each held-out story
    after its own instruction, minus after the next story's instruction (nats/token; 0 for a model that
    ignores them). Deterministic, and far less noisy than grading samples."""
    tok = model.tokenizer

    def pairs(shift: int) -> list[tuple[list[int], list[int]]]:
        return [([tok.bos_id] + tok.encode(items[(i + shift) % len(items)][fmt]), tok.encode(it["story"]))
                for i, it in enumerate(items)]
    own, other = score_tokens(model, pairs(0)), score_tokens(model, pairs(1))
    return (sum(s.logprob for s in own) - sum(s.logprob for s in other)) / sum(s.tokens for s in own)


def fluency(model, stories: list[str]) -> float:
    """Mean negative log-likelihood per token (nats) of the stories alone, under `model`."""
    tok = model.tokenizer
    scores = score_tokens(model, [([tok.bos_id], tok.encode(s)) for s in stories if s.strip()])
    return -sum(s.logprob for s in scores) / max(1, sum(s.tokens for s in scores))


def grade(items: list[dict], stories: list[str], reasons: list[str]) -> dict:
    words_all, words_each, sentence, asked, unasked, character = [], [], [], [], [], []
    for item, story in zip(items, stories):
        req = item["req"]
        hits = [contains_word(story, w) for w in req["words"]]
        words_all.append(all(hits))
        words_each.extend(hits)
        sentence.append(contains_sentence(story, req["sentence"]))
        (asked if "features" in req else unasked).append(has_dialogue(story))
        if "character" in req:
            character.append(is_main_character(story, req["character"]))

    def share(xs):
        return round(sum(xs) / len(xs), 3) if xs else None
    return {"all_words": share(words_all), "each_word": share(words_each), "sentence": share(sentence),
            "dialogue_when_asked": share(asked), "dialogue_unasked": share(unasked),
            "character": share(character), "n_character": len(character),
            "ended": share([r == "stop" for r in reasons]), "n": len(items), "n_dialogue": len(asked),
            "words_per_story": round(sum(len(s.split()) for s in stories) / max(1, len(stories)), 1)}


def run_facts(run: Path) -> dict:
    """Trainable parameters, time and peak memory of a fine-tuning run (its summary.json)."""
    summary = json.loads((run / "summary.json").read_text())
    keys = ("params", "trainable_params", "step", "tokens", "train_time_s", "tok_per_s", "max_rss_mb", "lora")
    return {k: summary[k] for k in keys if k in summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH (repeatable); PATH may be "
                    "default, instruct, a model dir, a run dir or an adapter folder")
    ap.add_argument("--runs", nargs="*", default=[], help="NAME=RUN: fine-tuning runs to report")
    ap.add_argument("--heldout", default=str(HELDOUT))
    ap.add_argument("--n", type=int, default=200, help="held-out stories to build instructions from")
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--formats", nargs="+", default=["fields", "request"], choices=["fields", "request"])
    ap.add_argument("--no-bpb", action="store_true", help="skip the held-out bits per byte")
    ap.add_argument("--no-guide", action="store_true", help="instruct models write alone only")
    ap.add_argument("--fluency-model", default="default", help="the model that scores the stories' fluency")
    ap.add_argument("--smoke", action="store_true", help="5 stories, 40 tokens; writes nothing")
    ap.add_argument("--out", default="instruct")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.max_new_tokens = 5, 40

    stories = list(iter_stories(expand_inputs([args.heldout])))[:args.n]
    items = tasks(stories, args.seed)
    result = header("instruct", heldout=args.heldout, instructions=len(items), temperature=args.temperature,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, fluency_model=args.fluency_model,
                    fluency_of_heldout=None, models={}, runs={})
    judge = storygpt.load(args.fluency_model, dtype="fp32")
    result["fluency_of_heldout"] = round(fluency(judge, [it["story"] for it in items]), 4)
    for spec in args.model:
        name, _, path = spec.rpartition("=")
        name = name or path
        model = storygpt.load(path, dtype="fp32")
        row = {"path": path, "instruct": model.is_instruct}
        for fmt in args.formats:
            gain = round(instruction_gain(model, items, fmt), 4)
            for guide in [False] + ([True] if model.is_instruct and not args.no_guide else []):
                texts, reasons, tps = write_all(model, [it[fmt] for it in items], args.max_new_tokens,
                                                args.temperature, args.seed, args.slots, guide=guide)
                key = fmt + ("+guide" if guide else "")
                row[key] = grade(items, texts, reasons) | {
                    "fluency": round(fluency(judge, texts), 4), "instruction_gain": gain,
                    "tokens_per_s": round(tps, 1), "example": texts[0][:600]}
                print(f"{name} {key}: {row[key]}", flush=True)
        if not args.no_bpb:
            row["heldout_bpb"] = evaluate(path, text=[args.heldout])["bits_per_byte"]
            print(f"{name}: held-out bits/byte {row['heldout_bpb']:.4f}", flush=True)
        result["models"][name] = row
    for spec in args.runs:
        name, _, run = spec.rpartition("=")
        result["runs"][name or run] = run_facts(Path(run))
    print(json.dumps({k: v for k, v in result.items() if k != "models"}, indent=2))
    save(result, args.out, args.smoke)


if __name__ == "__main__":
    run_main(main)
