"""Evaluation: loss, perplexity and bits per UTF-8 byte over every token of a text.

The text is encoded exactly as training data is (each story followed by the end-of-story token)
and scored with strided windows as long as the context the model was trained on (the training
seq_len recorded with the model, at most max_seq_len): each token is predicted exactly once, with
at least `context - stride` tokens of history once the text is longer than the context.

Bits per byte = (sum of token losses in nats) / ln 2 / (UTF-8 bytes of the stories' text). It
compares models across tokenizers (char, 4K, 8K). The end-of-story tokens are scored too (knowing
when a story ends is part of the job) but add no bytes, so bpb is slightly pessimistic.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from storygpt.data.shards import TokenData
from storygpt.errors import StoryGPTError
from storygpt.model.device import autocast, pick_device, pick_dtype
from storygpt.model.load import load_model, shipped_or, trained_context
from storygpt.model.transformer import Transformer
from storygpt.text.stories import expand_inputs, iter_stories
from storygpt.text.tokenizer import Tokenizer


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) for strided windows over a stream of n_tokens.

    Inputs are tokens[start:end], targets tokens[start+1:end+1]; targets with absolute index
    > first_scored are scored (first window: all). Every index 1..n_tokens-1 is scored exactly once.
    """
    if not 0 < stride <= context:
        raise StoryGPTError(f"stride must be in [1, context={context}], got {stride}")
    out, done = [], 0
    while done < n_tokens - 1:
        end = min(done + (stride if done else context), n_tokens - 1)
        start = max(0, end - context)
        out.append((start, end, done))
        done = end
    return out


@torch.inference_mode()
def score_stream(model: Transformer, tokens: np.ndarray, device: torch.device, dtype: str = "fp32",
                 batch_size: int = 8, stride: int | None = None, context: int | None = None) -> tuple[float, int]:
    """Sum of next-token losses (nats) over the stream, and the number of tokens scored."""
    context = context or model.cfg.max_seq_len
    stride = stride or max(1, context // 2)
    wins = windows(len(tokens), context, stride)
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(wins), batch_size):
        group = wins[i:i + batch_size]
        width = max(end - start for start, end, _ in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -1, dtype=torch.long)
        for row, (start, end, done) in enumerate(group):
            seq = torch.from_numpy(np.asarray(tokens[start:end + 1], dtype=np.int64))
            x[row, :end - start] = seq[:-1]
            targets = seq[1:].clone()
            skip = done - start  # targets before this were scored by an earlier window
            targets[:skip] = -1
            y[row, :end - start] = targets
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits, _ = model(x, y)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum")
        total += loss.item()
        count += int((y >= 0).sum())
    return total, count


def summarize(nats: float, tokens: int, nbytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
            "tokens": tokens, "bytes": nbytes}


def text_stream(tokenizer: Tokenizer, files: list[str | os.PathLike]) -> tuple[np.ndarray, int]:
    """Tokens of the stories in `files` (EOS first and after each story; where the start-of-story token
    differs, as in some imported models: BOS, story, EOS for each) and their UTF-8 byte count."""
    stories = list(iter_stories(expand_inputs(files)))
    if not stories:
        raise StoryGPTError("no text to evaluate")
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    start = [] if bos == eos else [bos]  # one token that both ends a story and starts the next: not repeated
    ids = [eos] if bos == eos else []
    for seq in tokenizer.encode_batch(stories):
        ids.extend(start + seq + [eos])
    return np.asarray(ids, dtype=np.int64), sum(len(s.encode("utf-8")) for s in stories)


def evaluate(model: str | os.PathLike | None, text: list[str] | None = None, data: str | os.PathLike | None = None,
             split: str = "val", device: str = "auto", dtype: str = "fp32", batch_size: int = 8,
             stride: int | None = None) -> dict:
    """Evaluate a model (directory or run) on text files or on a split of a prepared data directory.

    dtype: fp32, bf16/fp16 (autocast), or int8 (weight-only int8 matrices, CPU: see storygpt.quantize).
    Returns {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}; loss is nats per token.
    """
    if bool(text) == bool(data):
        raise StoryGPTError("give either --text FILE... or --data DIR")
    dev = pick_device(device)
    amp = pick_dtype(dev, "fp32" if dtype == "int8" else dtype)
    net, tokenizer, info = load_model(shipped_or(model), device=dev)  # None, "default", "instruct": shipped
    if dtype == "int8":  # the int8 weights of `storygpt generate --dtype int8`, fp32 activations
        from storygpt.model.quantize import quantize_int8

        net = quantize_int8(net)
    context = trained_context(net.cfg, info)
    if text:
        tokens, nbytes = text_stream(tokenizer, text)
    else:
        split_data = TokenData(data, split)
        if split_data.masks:
            raise StoryGPTError(f"{data}: instruction data (its instructions carry no loss); its bits per byte would "
                                "score them too: evaluate on story text with --text, or read the run's val loss")
        if split_data.meta["tokenizer"]["sha256"] != tokenizer.checksum:
            raise StoryGPTError(f"{data}: prepared with a different tokenizer than the model's (checksum mismatch)")
        tokens = np.concatenate([[tokenizer.eos_id], *split_data.shards]).astype(np.int64)
        nbytes = split_data.bytes
    nats, count = score_stream(net, tokens, dev, amp, batch_size=batch_size, stride=stride, context=context)
    result = summarize(nats, count, nbytes)
    result["context"] = context
    result["model"] = str(model or "default")
    return result
