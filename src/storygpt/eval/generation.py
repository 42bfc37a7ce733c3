"""The suite's generation measures: N completions of each story beginning, graded without a model.

Completions are sampled as the paper did (temperature 1.0, top-p 1.0 by default), one batch of N per
prompt, prompt i with seed `seed + i`: the same settings give the same completions. Per completion
(averaged over all of them unless said otherwise):

- ended: share that end with the end-of-story token before `max_new_tokens`;
- repetition: share of a completion's word 4-grams that repeat an earlier one of it;
- loops: share of completions that say a whole sentence (4+ words) twice;
- distinct_2: distinct word bigrams / bigrams over the N completions of a prompt, mean over prompts;
- self_bleu: BLEU (sacrebleu) of each completion against the other N-1 of its prompt, mean;
- spelling: share of words that are not English words (pyspellchecker's dictionary), over all words;
- names: share of completions that bring in no new name for the prompt's characters (measures.keeps_names);
- names_reused: of the completions of prompts that name a character, the share that name one of them again
  (measures.reuses_names: a story can keep its names by not using them);
- novelty (with training stories): mean highest Rouge-2 precision against any training story, the
  share of completions above 0.5, and the share of word 4-grams found in the training text;
- speed: generated tokens per second over the whole sampling.
"""

from __future__ import annotations

import time

from storygpt.generate.story_model import StoryModel
from storygpt.progress import tqdm_bar
from storygpt.text import measures


def sample(model: StoryModel, prompts: list[str], cfg, progress: bool = True) -> tuple[list[list[str]], list[list[bool]], dict]:
    """Completions (without the prompt) per prompt, whether each ended, and speed figures."""
    completions, ended, tokens = [], [], 0
    t0 = time.perf_counter()
    for i, prompt in enumerate(tqdm_bar(prompts, desc="sampling", enabled=progress, leave=False)):
        texts = model.generate(prompt, num_samples=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                               top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + i)
        stats = model.last_stats
        completions.append([t[len(prompt):] for t in texts])
        ended.append([r == "stop" for r in stats["finish_reasons"]])
        tokens += stats["new_tokens"]
    seconds = time.perf_counter() - t0
    return completions, ended, {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def generation_measures(model: StoryModel, prompts: list[str], cfg, index=None, progress: bool = True) -> dict:
    completions, ended, speed = sample(model, prompts, cfg, progress)
    flat = [c for group in completions for c in group]
    wrong, total = map(sum, zip(*(measures.misspelled(c) for c in flat)))
    out = {
        "ended": mean(e for group in ended for e in group),
        "repetition": mean(measures.repetition(c) for c in flat),
        "loops": mean(measures.loops(c) for c in flat),
        "distinct_2": mean(measures.distinct(group) for group in completions),
        "self_bleu": mean(measures.self_bleu(group) for group in completions),
        "spelling": wrong / total if total else None,
        "names": mean(measures.keeps_names(p, c) for p, group in zip(prompts, completions) for c in group),
        "names_reused": mean(measures.reuses_names(p, c) for p, group in zip(prompts, completions) for c in group),
        "speed": speed,
    }
    if index is not None:
        rouge = [index.max_rouge2(c)[0] for c in tqdm_bar(flat, desc="novelty", enabled=progress, leave=False)]
        hits, grams = map(sum, zip(*(index.shared_4grams(c) for c in flat)))
        out["novelty"] = {"max_rouge2": mean(rouge), "share_above_0.5": mean(r > 0.5 for r in rouge),
                          "shared_4grams": hits / grams if grams else None}
    out["samples"] = [{"prompt": p, "completion": group[0]} for p, group in zip(prompts, completions)]
    return out
