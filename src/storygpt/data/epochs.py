"""Epochs of whole stories: each epoch a fresh permutation of the training stories, packed end to end into
windows of seq_len + 1 tokens from a random offset, so that every story is seen once per epoch and each one
falls at a different place of a window each time.

`StoryEpochs.batch(index)` is a pure function of (seed, index, rank), like `TokenData.batch`: a resumed run
reads exactly the windows it would have read. Under several ranks, ranks that share shards read their slices
of one global batch (as `TokenData` does), and ranks with shards of their own run epochs of their own stories.
"""

from __future__ import annotations

import numpy as np
import torch

from storygpt.errors import StoryGPTError

from .shards import TokenData, _pairs


class StoryEpochs:
    """The training split of a prepared data directory, read in epochs of whole stories."""

    def __init__(self, data: TokenData, seq_len: int, seed: int):
        if data.masks:
            raise StoryGPTError("train.sampling=epochs is for story data; instruction data (masked) needs "
                                "sampling=random, whose windows start at a record")
        eos = data.meta["eos_id"]
        shard_of, starts, lengths = [], [], []
        for k, shard in enumerate(data.shards):
            ends = np.flatnonzero(np.asarray(shard) == eos)  # each story ends with its EOS
            first = np.concatenate([[0], ends[:-1] + 1])
            shard_of.append(np.full(len(ends), k, dtype=np.int32))
            starts.append(first.astype(np.int64))
            lengths.append((ends + 1 - first).astype(np.int64))
        self.shards = data.shards
        self.shard_of, self.starts, self.lengths = (np.concatenate(a) for a in (shard_of, starts, lengths))
        self.seq_len, self.seed = seq_len, seed
        self.stream, self.sharing, self.rank = data.stream, data.sharing, data.rank
        total = int(self.lengths.sum())
        self.windows = (total - seq_len) // seq_len  # per epoch, whatever the epoch's random offset
        if self.windows < 1:
            raise StoryGPTError(f"seq_len {seq_len} is longer than the data ({total} tokens in whole stories)")
        self._orders: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}

    @property
    def stories(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(the epoch's permutation of the stories, where each ends in the epoch's stream, its offset)."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch, self.stream, 0xE9])
            perm = rng.permutation(len(self.lengths))
            offset = int(rng.integers(0, self.seq_len))
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = (perm, np.cumsum(self.lengths[perm]), offset)
        return self._orders[epoch]

    def window(self, i: int) -> np.ndarray:
        """Window i of the run (all epochs counted): seq_len + 1 tokens of its epoch's stream."""
        epoch, k = divmod(i, self.windows)
        perm, ends, offset = self.order(epoch)
        a = offset + k * self.seq_len
        b = a + self.seq_len + 1
        pieces = []
        j = int(np.searchsorted(ends, a, side="right"))
        while a < b:
            s = perm[j]
            story_start = int(ends[j] - self.lengths[s])
            lo, hi = a - story_start, min(b, int(ends[j])) - story_start
            start = int(self.starts[s])
            pieces.append(self.shards[self.shard_of[s]][start + lo:start + hi])
            a, j = story_start + hi, j + 1
        return np.concatenate(pieces)

    def first_window(self, index: int, batch_size: int) -> int:
        """The run's window index of this rank's first row of micro-batch `index`."""
        first = index * batch_size * self.sharing
        return first + (self.rank * batch_size if self.sharing > 1 else 0)

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of micro-batch `index` (optimizer step x grad_accum_steps + micro-step)."""
        first = self.first_window(index, batch_size)
        rows = np.stack([self.window(first + r) for r in range(batch_size)]).astype(np.int64)
        return _pairs(rows)

    def epoch(self, index: int, batch_size: int) -> float:
        """Epochs done before micro-batch `index`: windows read over windows per epoch."""
        return index * batch_size * self.sharing / self.windows
