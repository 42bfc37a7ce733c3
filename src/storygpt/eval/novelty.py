"""The TinyStories paper's memorisation check: is a generated story new, or a training story copied?

For a completion, `TrainingIndex.max_rouge2` is its highest Rouge-2 precision (the share of its word
bigrams found in a training story, clipped by count: rouge-score's definition, computed by the
rouge-score package) against every training story, and `shared_4grams` the share of its word 4-grams
found anywhere in the training text. Words are rouge-score's: lowercased runs of letters and digits.

Scoring 48,000 stories per completion one by one would take minutes per completion, so the index keeps,
for every distinct bigram, the stories that contain it (sorted arrays, searched with numpy): summing,
per story, the completion's counts of the bigrams it contains bounds that story's clipped overlap from
above; stories are then scored exactly in decreasing order of the bound until the bound cannot beat the
best exact score. The result is the exact maximum.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
from rouge_score import rouge_scorer, tokenize

from storygpt.errors import StoryGPTError
from storygpt.text.stories import expand_inputs, iter_stories

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _hash_rows(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row of word ids (n-grams): collisions are ~1e-10 likely at these sizes."""
    h = np.zeros(len(ids), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in ids.T:
            h = (h ^ col.astype(np.uint64)) * _MIX
            h ^= h >> np.uint64(29)
    return h


class TrainingIndex:
    """Training stories, indexed for `max_rouge2` and `shared_4grams`."""

    def __init__(self, stories: list[str]):
        if not stories:
            raise StoryGPTError("no training stories to compare with (--train)")
        self.stories = stories
        self.vocab: dict[str, int] = {}
        self._scorer = rouge_scorer.RougeScorer(["rouge2"])
        bigram_keys, bigram_story, fourgrams = [], [], []
        for i, story in enumerate(stories):
            ids = self._ids(tokenize.tokenize(story, None), grow=True)
            if len(ids) >= 2:
                keys = np.unique(self._pack(ngrams_array(ids, 2)))
                bigram_keys.append(keys)
                bigram_story.append(np.full(len(keys), i, dtype=np.int32))
            if len(ids) >= 4:
                fourgrams.append(_hash_rows(ngrams_array(ids, 4)))
        keys = np.concatenate(bigram_keys) if bigram_keys else np.zeros(0, np.uint64)
        order = np.argsort(keys, kind="stable")
        self.bigram_keys = keys[order]
        self.bigram_story = (np.concatenate(bigram_story) if bigram_story else np.zeros(0, np.int32))[order]
        self.fourgrams = np.unique(np.concatenate(fourgrams)) if fourgrams else np.zeros(0, np.uint64)

    @classmethod
    def from_files(cls, files: list[str | os.PathLike]) -> TrainingIndex:
        return cls(list(iter_stories(expand_inputs(files))))

    def _ids(self, tokens: list[str], grow: bool = False) -> np.ndarray:
        if grow:
            return np.fromiter((self.vocab.setdefault(t, len(self.vocab)) for t in tokens), np.int64, len(tokens))
        return np.fromiter((self.vocab.get(t, -1) for t in tokens), np.int64, len(tokens))

    @staticmethod
    def _pack(pairs: np.ndarray) -> np.ndarray:
        return (pairs[:, 0].astype(np.uint64) << np.uint64(32)) | pairs[:, 1].astype(np.uint64)

    def max_rouge2(self, completion: str) -> tuple[float, int]:
        """(highest Rouge-2 precision of `completion` against any training story, that story's index);
        (0.0, -1) when the completion has no bigram."""
        ids = self._ids(tokenize.tokenize(completion, None))
        if len(ids) < 2:
            return 0.0, -1
        pairs = ngrams_array(ids, 2)
        pairs = pairs[(pairs >= 0).all(axis=1)]  # a bigram with an unseen word is in no story
        counts = Counter(self._pack(pairs).tolist())
        total = len(ids) - 1
        keys = np.fromiter(counts, np.uint64, len(counts))
        weights = np.fromiter(counts.values(), np.float64, len(counts))
        lo = np.searchsorted(self.bigram_keys, keys, "left")
        hi = np.searchsorted(self.bigram_keys, keys, "right")
        lengths = hi - lo
        if not lengths.sum():
            return 0.0, -1
        postings = np.concatenate([self.bigram_story[a:b] for a, b in zip(lo, hi)])
        bound = np.bincount(postings, weights=np.repeat(weights, lengths), minlength=len(self.stories)) / total
        best, best_story = 0.0, -1
        for story in np.argsort(-bound, kind="stable"):
            if bound[story] <= best:
                break
            score = self._scorer.score(self.stories[story], completion)["rouge2"].precision
            if score > best:
                best, best_story = score, int(story)
        return best, best_story

    def shared_4grams(self, completion: str) -> tuple[int, int]:
        """(word 4-grams of the completion found anywhere in the training text, its word 4-grams)."""
        ids = self._ids(tokenize.tokenize(completion, None))
        if len(ids) < 4:
            return 0, 0
        grams = ngrams_array(ids, 4)
        known = (grams >= 0).all(axis=1)
        hashes = _hash_rows(grams[known])
        at = np.minimum(np.searchsorted(self.fourgrams, hashes), max(len(self.fourgrams) - 1, 0))
        hits = (self.fourgrams[at] == hashes).sum() if len(self.fourgrams) else 0
        return int(hits), len(grams)


def ngrams_array(ids: np.ndarray, n: int) -> np.ndarray:
    """(len - n + 1, n) array of the n-grams of `ids`."""
    return np.lib.stride_tricks.sliding_window_view(ids, n)

