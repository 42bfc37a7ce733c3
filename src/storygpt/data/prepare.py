"""`prepare`: stories -> shuffled train/val token shards (the layout is in shards.py).

Preparation streams: stories are read lazily, encoded by a pool of threads (SentencePiece releases
the GIL, so they use every core without processes to start or results to pickle) with a bounded
number of chunks in flight, and scattered into on-disk buckets; each bucket is then shuffled in
memory on its own and becomes one shard. Peak memory is set by the bucket size, not the input size.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_dir
from storygpt.progress import tqdm_bar
from storygpt.text.instruct import INSTRUCT_INFO, split_record
from storygpt.text.stories import check_inputs, expand_inputs, iter_stories
from storygpt.text.tokenizer import EOS_TEXT, Tokenizer

from .shards import META_FILE


# --------------------------------------------------------------------------------------------
# Preparing shards
# --------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    if dtype == "auto":
        dtype = "uint16" if vocab_size < 1 << 16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise StoryGPTError(f"token dtype must be auto, uint16 or uint32, got {dtype!r}")
    if dtype == "uint16" and vocab_size > (1 << 16) - 1:
        raise StoryGPTError(f"vocab size {vocab_size} does not fit uint16 tokens (max 65,535); use uint32")
    return np.dtype(dtype)


def _encode_chunk(tok: Tokenizer, stories: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Encode a chunk: (tokens with EOS after each story, tokens per story, UTF-8 bytes per story, loss
    mask per token). An instruct record's prompt and story are encoded apart, as generation does (the
    prompt alone, then the story); the prompt's tokens get mask 0. SentencePiece releases the GIL while
    it encodes, so threads running this use every core."""
    records = [split_record(s) for s in stories]
    prompts = tok.encode_batch([r[0] for r in records if r is not None], num_threads=1)
    texts = tok.encode_batch([s if r is None else r[1] for s, r in zip(stories, records)], num_threads=1)
    prompt_iter = iter(prompts)
    heads = [[] if r is None else next(prompt_iter) for r in records]
    lengths = np.fromiter((len(h) + len(x) + 1 for h, x in zip(heads, texts)), dtype=np.int64, count=len(texts))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    mask = np.ones(len(flat), dtype=np.uint8)
    pos = 0
    for h, x in zip(heads, texts):
        flat[pos:pos + len(h)] = h
        mask[pos:pos + len(h)] = 0
        flat[pos + len(h):pos + len(h) + len(x)] = x
        pos += len(h) + len(x)
        flat[pos] = tok.eos_id
        pos += 1
    nbytes = np.fromiter((len(s.encode("utf-8")) for s in stories), dtype=np.int64, count=len(stories))
    return flat, lengths, nbytes, mask


def _chunks(stories: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for s in stories:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class _Bucket:
    tokens: object  # open binary file
    mask: object    # open binary file of the loss mask, one byte per token
    lengths: list
    nbytes: int = 0


def check_replaceable(out: str | os.PathLike) -> None:
    """`out` may take the new shards: it is absent, empty, or prepared data (which is replaced). Anything else in
    it (the stories themselves, a download) would be lost, so it is refused."""
    out = Path(out)
    if out.is_file():
        raise StoryGPTError(f"{out}: is a file; --out takes a directory for the prepared data")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise StoryGPTError(f"{out}: exists and is not prepared data ({META_FILE} missing); refusing to replace "
                            "what is in it: give another --out")


def prepare(inputs: list[str | os.PathLike], tokenizer: str | os.PathLike, out: str | os.PathLike,
            val_fraction: float = 0.02, seed: int = 1337, field: str | None = None,
            workers: int | None = None, dtype: str = "auto", chunk_stories: int = 256,
            bucket_bytes: int = 128 << 20, progress: bool = True, instruct: bool = False) -> dict:
    """Tokenize stories from `inputs` into shuffled train/val shards in `out`; returns meta.json's dict.

    Each story goes to val with probability `val_fraction` (seeded), so the split is the same
    whatever the number of workers. `bucket_bytes` of input text make one shard (and bound memory).
    Instruction records (TinyStories-Instruct text, or with `instruct` the JSON release's `instruction`
    fields) get a loss mask that leaves their instruction out of the loss (meta.json "mask": true).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise StoryGPTError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if field is not None and not field:
        raise StoryGPTError("--field must not be empty")
    files = expand_inputs(inputs)
    check_inputs(files, field)
    check_replaceable(out)
    tok = Tokenizer.load(tokenizer)
    np_dtype = token_dtype(tok.vocab_size, dtype)
    workers = max(1, workers or os.cpu_count() or 1)
    total_bytes = sum(f.stat().st_size for f in files)
    n_buckets = max(1, math.ceil(total_bytes / bucket_bytes))

    with atomic_dir(out) as work:
        buckets = {(split, b): _Bucket(open(work / f"{split}_{b:05d}.tmp", "wb"),
                                       open(work / f"{split}_{b:05d}.masktmp", "wb"), [])
                   for split in ("train", "val") for b in range(n_buckets)}
        stories = iter_stories(files, field, instruct)
        masked = False
        bar = tqdm_bar(total=total_bytes, unit="B", unit_scale=True, desc="encoding", enabled=progress)
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        try:
            pending: deque = deque()
            chunk_iter = enumerate(_chunks(stories, chunk_stories))
            done = False
            while True:
                while not done and len(pending) < 4 * workers:  # bounded number of chunks in flight
                    nxt = next(chunk_iter, None)
                    if nxt is None:
                        done = True
                        break
                    idx, chunk = nxt
                    if pool is None:
                        pending.append((idx, _encode_chunk(tok, chunk, np_dtype.name)))
                    else:
                        pending.append((idx, pool.submit(_encode_chunk, tok, chunk, np_dtype.name)))
                if not pending:
                    break
                idx, res = pending.popleft()
                flat, lengths, nbytes, mask = res if pool is None else res.result()
                masked = masked or not mask.all()
                _scatter(buckets, idx, flat, lengths, nbytes, mask, seed, val_fraction, n_buckets)
                bar.update(int(nbytes.sum()) + EOS_LINE_BYTES * len(lengths))
        except BaseException:
            bar.leave = False  # erase the bar so the error is the only line left
            raise
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            bar.close()
        for b in buckets.values():
            b.tokens.close()
            b.mask.close()

        meta = {"format": 1, "tokenizer": {"sha256": tok.checksum, "type": tok.type},
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": np_dtype.name,
                "seed": seed, "val_fraction": val_fraction, "inputs": [str(f) for f in files],
                "splits": {}}
        if masked:
            meta |= {"mask": True, "instruct": INSTRUCT_INFO}
        for split in ("train", "val"):
            shards = []
            for b in range(n_buckets):
                info = _write_shard(work, split, b, buckets[(split, b)], np_dtype, seed, masked)
                if info is not None:
                    shards.append(info)
            meta["splits"][split] = {
                "tokens": sum(s["tokens"] for s in shards), "stories": sum(s["stories"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards), "shards": shards}
        if meta["splits"]["train"]["tokens"] == 0:
            raise StoryGPTError("no stories found in the input")
        tok.save(work / "tokenizer")
        (work / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


EOS_LINE_BYTES = len(EOS_TEXT) + 2  # "\n<|endoftext|>\n" around each story, for the progress bar


def _scatter(buckets, chunk_idx, flat, lengths, nbytes, mask, seed, val_fraction, n_buckets) -> None:
    rng = np.random.default_rng([seed, chunk_idx])
    is_val = rng.random(len(lengths)) < val_fraction
    which = rng.integers(n_buckets, size=len(lengths))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for i in range(len(lengths)):
        b = buckets[("val" if is_val[i] else "train", int(which[i]))]
        b.tokens.write(flat[starts[i]:ends[i]].tobytes())
        b.mask.write(mask[starts[i]:ends[i]].tobytes())
        b.lengths.append(int(lengths[i]))
        b.nbytes += int(nbytes[i])


def _write_shard(work: Path, split: str, b: int, bucket: _Bucket, dtype: np.dtype, seed: int,
                 masked: bool) -> dict | None:
    tmp, mask_tmp = work / f"{split}_{b:05d}.tmp", work / f"{split}_{b:05d}.masktmp"
    lengths = np.asarray(bucket.lengths, dtype=np.int64)
    if len(lengths) == 0:
        tmp.unlink()
        mask_tmp.unlink()
        return None
    order = np.random.default_rng([seed, b, split == "val"]).permutation(len(lengths))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    name = f"{split}_{b:05d}.bin"
    for src, dst, typ in ((tmp, name, dtype), (mask_tmp, name[:-4] + ".mask", np.uint8)):
        if dst == name or masked:
            values = np.fromfile(src, dtype=typ)
            np.concatenate([values[starts[i]:ends[i]] for i in order]).tofile(work / dst)
        src.unlink()
    shuffled_tokens = int(ends[-1])
    return {"file": name, "tokens": shuffled_tokens, "stories": int(len(lengths)), "bytes": bucket.nbytes}


