"""Rejection sampling: the model's own stories, kept only when they pass the suite's checks, to fine-tune on.

A small model sampled at temperature 1.0 (the paper's and the suite's setting) sometimes leaves the track
its story was on: a character gets another name, a word is misspelled, a sentence comes round again. Those
completions come from the fat tail of its next-token distribution. Training it further on its own
completions that stay on track (the prompt's characters keep their names, every word is an English word,
the story ends, no sentence repeats) moves probability from that tail to the completions it already writes
well: one round of rejection-sampling fine-tuning (a REINFORCE step with a 0/1 reward, as in RAFT or
ReST), with the suite's own measures as the reward.

`storygpt data sample` takes story beginnings from prepared data (a split's stories, cut at a share of
their words), samples N completions of each with continuous batching (`batching.Batcher`: many stories
in one KV cache), and writes the first K that pass (beginning + completion) in TinyStories .txt format,
for `storygpt data prepare`. Story i is sampled with seed `seed + i`, as `StoryModel.generate` would.
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from storygpt.errors import StoryGPTError
from storygpt.generate.batching import Batcher, Done, Finish, Piece, Story
from storygpt.generate.sampling import SamplingOptions
from storygpt.generate.story_model import StoryModel
from storygpt.progress import tqdm_bar
from storygpt.text import measures
from storygpt.text.stories import write_stories

from .suite import split_story

CHECKS = ("ended", "names", "spelling", "loops")  # in the order they are tried; the first failed one is counted


def beginnings(data_dir: str | Path, split: str, n: int, cut: float, min_words: int = 60) -> list[str]:
    """The first `n` stories of at least `min_words` words in a split of prepared data, cut at `cut` of their
    words."""
    from storygpt.data.shards import TokenData
    from storygpt.text.tokenizer import Tokenizer

    if not 0 < cut < 1 or n < 1:
        raise StoryGPTError(f"the cut must be in (0, 1) and the number of beginnings >= 1, got {cut} and {n}")
    data = TokenData(str(data_dir), split)  # checks the shards (an empty split or a short file is one line)
    tok = Tokenizer.load(Path(data_dir) / "tokenizer")
    found: list[str] = []
    for ids in data.shards:
        ends = np.flatnonzero(ids == data.meta["eos_id"])
        for start, end in zip(np.concatenate([[-1], ends[:-1]]) + 1, ends):
            story = tok.decode(ids[start:end].tolist()).strip()
            if len(story.split()) >= min_words:
                found.append(split_story(story, cut)[0])
                if len(found) == n:
                    return found
    if not found:
        raise StoryGPTError(f"{data_dir}: no {split} story of {min_words} words or more")
    return found


def failed_check(prompt: str, completion: str, ended: bool) -> str | None:
    """The first of CHECKS the completion fails, or None: it ended with the end-of-story token, brings in
    no name the prompt's characters do not have (measures.new_names), has no word that is neither English
    nor in the prompt, and says no sentence twice."""
    if not ended:
        return "ended"
    if measures.new_names(prompt, completion):
        return "names"
    prompt_words = {w.removesuffix("'s") for w in measures.words(prompt)}
    fresh = [w for w in measures.words(completion) if w.removesuffix("'s") not in prompt_words]  # the prompt's may be names
    if measures.misspelled(" ".join(fresh))[0]:
        return "spelling"
    if measures.loops(completion):
        return "loops"
    return None


def sample_all(model: StoryModel, prompts: list[str], samples: int, opts: SamplingOptions, seed: int,
               slots: int = 64, progress: bool = True) -> Iterator[tuple[int, list[str], list[bool]]]:
    """(prompt index, its `samples` completions, whether each ended) for every prompt, as each finishes: the
    prompts share one Batcher of `slots` rows, a prompt joining when `samples` rows are free."""
    if samples > slots:
        raise StoryGPTError(f"--samples ({samples}) must be at most --slots ({slots})")
    batcher = Batcher(model, slots)
    queue, finished = deque(enumerate(prompts)), deque()

    def story(i: int, prompt: str) -> Story:
        texts, ended = [""] * samples, [False] * samples

        def emit(event) -> None:
            if isinstance(event, Piece):
                texts[event.index] += event.text
            elif isinstance(event, Finish):
                ended[event.index] = event.reason == "stop"
            elif isinstance(event, Done):
                finished.append((i, texts, ended))
        return Story(model, prompt, samples, replace(opts, seed=seed + i), emit)

    with tqdm_bar(total=len(prompts), desc="sampling", enabled=progress) as bar:
        while queue or batcher.stories:
            while queue and batcher.free_slots >= samples:
                batcher.add(story(*queue.popleft()))
            batcher.step()
            while finished:
                bar.update()
                yield finished.popleft()


def build(model: StoryModel, data_dir: str, out: str, prompts: int = 2000, samples: int = 8, keep: int = 1,
          cut: float = 0.2, split: str = "train", seed: int = 0, slots: int = 64, progress: bool = True,
          **options) -> dict:
    """Write OUT: for each of `prompts` beginnings of `split`, the first `keep` of its `samples` completions
    that pass every check (beginning + completion). `options` are SamplingOptions (temperature=1.0 and
    top_p=1.0 unless given: the suite's sampling). Returns counts: prompts, completions, kept, and per check
    the completions that failed it first."""
    if not 1 <= keep <= samples:
        raise StoryGPTError(f"--keep must be in [1, --samples], got {keep} with --samples {samples}")
    opts = SamplingOptions(**{"temperature": 1.0, "top_p": 1.0, **options})
    opts.validate()
    starts = beginnings(data_dir, split, prompts, cut)
    kept: dict[int, list[str]] = {}
    failed: Counter = Counter()
    for i, completions, ended in sample_all(model, starts, samples, opts, seed, slots, progress):
        good = []
        for text, end in zip(completions, ended):
            check = failed_check(starts[i], text, end)
            failed[check or "passed"] += 1
            if check is None and len(good) < keep:
                good.append(starts[i] + text)
        kept[i] = good
    write_stories(out, (s for i in sorted(kept) for s in kept[i]))
    return {"prompts": len(starts), "completions": len(starts) * samples,
            "kept": sum(map(len, kept.values())), "passed": failed.pop("passed", 0),
            "failed": {c: failed[c] for c in CHECKS}}
