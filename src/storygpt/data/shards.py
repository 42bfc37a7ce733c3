"""Prepared data: reading the token shards back and sampling training batches from them.

Data directory layout (what `storygpt data prepare` writes, prepare.py):

    DIR/meta.json            tokenizer checksum, vocab size, dtype, per-split token/story/byte counts
    DIR/tokenizer/           a copy of the tokenizer the shards were made with
    DIR/train_00000.bin ...  flat token streams (uint16 or uint32), each story followed by EOS
    DIR/val_00000.bin ...
    DIR/train_00000.mask ... only for instruction data (meta.json "mask": true): one uint8 per token, 1 where
                             predicting that token counts in the loss (the story and its EOS), 0 for the
                             instruction before `Story:`. Training windows on such data
                             start at a record's start token, so no story in them lacks its instruction
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from storygpt.errors import StoryGPTError

META_FILE = "meta.json"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def read_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise StoryGPTError(f"{data_dir}: not a prepared data directory (no {META_FILE}); run `storygpt data prepare`")
    try:
        meta = json.loads(path.read_text())
        meta["splits"]["train"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise StoryGPTError(f"{path}: corrupt data metadata") from None
    return meta


class TokenData:
    """One split of a prepared data directory, memory-mapped.

    `batch(step)` samples random windows; it is a pure function of (seed, step, rank), which is what
    makes resumed training see exactly the batches it would have seen. With several ranks each rank
    samples from its own subset of the shards. When there are fewer shards than ranks, all ranks share
    all shards: then they draw one global batch of batch_size x world_size windows from one stream and
    each rank reads its own slice of it, so N ranks train on exactly the windows that one process
    with an N times larger batch would (the distributed tests compare loss curves this way).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", rank: int = 0, world_size: int = 1):
        self.meta = read_meta(data_dir)
        info = self.meta["splits"].get(split)
        if not info or not info["shards"]:
            raise StoryGPTError(f"{data_dir}: the {split} split is empty (prepare with a larger --val-fraction?)")
        shards = info["shards"]
        own_shards = len(shards) >= world_size > 1
        if own_shards:
            shards = shards[rank::world_size]
        dtype = np.dtype(self.meta["dtype"])
        self.shards, self.masks = [], []
        for s in shards:
            path = Path(data_dir) / s["file"]
            if not path.is_file() or path.stat().st_size != s["tokens"] * dtype.itemsize:
                raise StoryGPTError(f"{path}: shard missing or truncated")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
            if self.meta.get("mask"):
                mask = path.with_suffix(".mask")
                if not mask.is_file() or mask.stat().st_size != s["tokens"]:
                    raise StoryGPTError(f"{mask}: loss mask missing or truncated")
                self.masks.append(np.memmap(mask, dtype=np.uint8, mode="r"))
        # instruction data: windows start at a record's start token (the EOS before it), so that every story
        # in a window comes with its instruction; plain data: windows start anywhere
        self.starts = [_record_starts(s, self.meta["eos_id"]) for s in self.shards] if self.masks else None
        self.rank = rank
        # (random stream, ranks drawing from it): a rank's own stream, or one stream shared by all ranks
        self.stream, self.sharing = (rank, 1) if own_shards else (0, world_size)
        self.tokens = sum(len(s) for s in self.shards)
        self.bytes = info["bytes"]

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (batch_size, seq_len); y is x shifted by one token, -1 where the
        target is an instruction token (masked data: no loss there)."""
        sizes = np.array([len(s) - seq_len - 1 for s in self.shards])
        if sizes.max() < 0:
            raise StoryGPTError(f"seq_len {seq_len} is longer than the data ({self.tokens} tokens)")
        rng = np.random.default_rng([seed, step, self.stream])
        weights = np.clip(sizes, 0, None) + 1e-9
        which = rng.choice(len(self.shards), size=batch_size * self.sharing, p=weights / weights.sum())
        if self.starts is None:
            offsets = rng.integers(0, np.clip(sizes[which], 0, None) + 1)
        else:  # the n-th record start that leaves room for a whole window
            fits = np.array([np.searchsorted(s, n, side="right") for s, n in zip(self.starts, sizes)])
            picks = rng.integers(0, np.maximum(fits[which], 1))
            offsets = np.array([self.starts[w][k] if fits[w] else 0 for w, k in zip(which, picks)], dtype=np.int64)
        if self.sharing > 1:  # this rank's slice of the global batch
            mine = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
            which, offsets = which[mine], offsets[mine]
        rows = np.stack([self.shards[w][o:o + seq_len + 1] for w, o in zip(which, offsets)]).astype(np.int64)
        if self.masks:
            masks = np.stack([self.masks[w][o:o + seq_len + 1] for w, o in zip(which, offsets)])
            return _pairs(rows, masks)
        return _pairs(rows)

    def _window_starts(self, shard: int, seq_len: int) -> Iterator[int]:
        last = len(self.shards[shard]) - seq_len - 1
        if self.starts is None:
            return iter(range(0, last + 1, seq_len))
        return _next_starts(self.starts[shard], last, seq_len)

    def sequential_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping windows from the start of the split: the same every time it is called.
        On instruction data each window starts at a record's start token, the first one after the window
        before it ends."""
        rows, masks = [], []
        for k, shard in enumerate(self.shards):
            for o in self._window_starts(k, seq_len):
                rows.append(np.asarray(shard[o:o + seq_len + 1], dtype=np.int64))
                if self.masks:
                    masks.append(np.asarray(self.masks[k][o:o + seq_len + 1]))
                if len(rows) == batch_size * max_batches:
                    break
            if len(rows) == batch_size * max_batches:
                break
        if not rows:
            raise StoryGPTError(f"seq_len {seq_len} is longer than the {self.tokens}-token split")
        return [_pairs(np.stack(rows[i:i + batch_size]), np.stack(masks[i:i + batch_size]) if masks else None)
                for i in range(0, len(rows), batch_size)]


def instruction_pairs(data: TokenData, seq_len: int, n: int = 64, batch_size: int = 16) -> tuple[list, list]:
    """Batches (x, y) of the first `n` records of an instruction split that fit in seq_len + 1 tokens: each
    story after its own instruction, and the same story after the next record's instruction; targets are
    the story's tokens and its EOS, -1 elsewhere. Their losses differ by how much a model reads its
    instructions (`validation.instruction_gain`)."""
    stream, mask = np.asarray(data.shards[0]), np.asarray(data.masks[0])
    ends = np.flatnonzero(stream == data.meta["eos_id"])
    records = []  # (instruction: EOS + its tokens, story: its tokens + EOS)
    for a, b in zip(ends[:-1], ends[1:]):
        body = np.flatnonzero(mask[a + 1:b + 1]) + a + 1
        if len(body) and body[0] > a + 1:
            records.append((stream[a:body[0]], stream[body[0]:b + 1]))
    own, other = [], []
    for (head, story), (next_head, _) in zip(records, records[1:]):
        if max(len(head), len(next_head)) + len(story) <= seq_len + 1:
            own.append((head, story))
            other.append((next_head, story))
        if len(own) == n:
            break
    return _padded(own, batch_size, data.meta["eos_id"]), _padded(other, batch_size, data.meta["eos_id"])


def _padded(pairs: list, batch_size: int, pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(0, len(pairs), batch_size):
        group = pairs[i:i + batch_size]
        width = max(len(h) + len(s) for h, s in group) - 1
        x = torch.full((len(group), width), pad, dtype=torch.long)
        y = torch.full((len(group), width), -1, dtype=torch.long)
        for row, (head, story) in enumerate(group):
            seq = torch.from_numpy(np.concatenate([head, story]).astype(np.int64))
            x[row, :len(seq) - 1] = seq[:-1]
            y[row, len(head) - 1:len(seq) - 1] = seq[len(head):]
        out.append((x, y))
    return out


def _next_starts(starts: np.ndarray, last: int, seq_len: int) -> Iterator[int]:
    """The record starts at most `last`, each the first one at or after the end of the window before it."""
    k = 0
    while k < len(starts) and starts[k] <= last:
        yield int(starts[k])
        k = int(np.searchsorted(starts, starts[k] + seq_len))


def _record_starts(shard: np.ndarray, eos_id: int) -> np.ndarray:
    """Where windows may start in an instruction shard: at every EOS but a final one (an EOS ends one
    record and is the start token of the next), ascending."""
    ends = np.flatnonzero(np.asarray(shard) == eos_id)
    return ends[ends < len(shard) - 1].astype(np.int64)


def _pairs(rows: np.ndarray, masks: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of token windows one longer than seq_len; targets whose mask is 0 become -1
    (the model's ignore_index)."""
    t = torch.from_numpy(rows.astype(np.int64))
    x, y = t[:, :-1], t[:, 1:]
    if masks is not None:
        y = y.masked_fill(torch.from_numpy(masks[:, 1:] == 0), -1)
    return x, y
