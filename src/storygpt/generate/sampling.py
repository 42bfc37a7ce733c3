"""Sampling: the filters that turn a row of logits into the next token, and the options a story is written
with (shared by `StoryModel`, continuous batching and the HTTP API)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from storygpt.errors import StoryGPTError

MAX_NEW_TOKENS = 4096


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: logits of tokens already in `history` (B, T) are divided by `penalty` when
    positive and multiplied by it when negative. penalty 1.0 = off."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)
    big = torch.finfo(seen.dtype).max  # a tiny penalty must not make +inf (inf - inf is nan when sampling)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty).clamp(-big, big)
    return logits.scatter(1, history, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value kept), -inf elsewhere. k=0 = off."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p. p=1 = off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p              # already enough mass without it
    drop_sorted[..., 0] = False            # the top token always stays (a tiny p can round to 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The probabilities `draw_tokens` draws from (temperature > 0), row by row: temperature, then top-k, then
    top-p, as whole-vocabulary masks (the reference for `draw_tokens` and for the web page's sampling.js)."""
    return top_p_filter(top_k_filter(_tempered(logits, temperature), top_k), top_p).softmax(dim=-1)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits divided by the temperature, shifted so that the top logit is 0: a tiny temperature then gives
    -inf below it, never inf (and nan); a temperature below float32's smallest normal number would round to a
    division by 0."""
    logits = logits.float()
    return (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)


NUCLEUS_CANDIDATES = 128  # top-p looks for its tokens among this many of the most likely first (see `draw_tokens`)


def draw_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                uniforms: torch.Tensor) -> torch.Tensor:
    """The next token of each row of (B, vocab) logits (temperature > 0), drawn from `sampling_probs`'
    distribution by inverse CDF: row b takes the first token, from the most likely down (in vocabulary order when
    top-p is off), at which the cumulative probability of the kept tokens exceeds `uniforms[b]` (in [0, 1)) of
    their total. One uniform number per row, so rows of many stories are drawn together while each story's
    numbers come from its own generator.

    Top-p needs the tokens in order of probability: only the `NUCLEUS_CANDIDATES` most likely ones are sorted
    (torch.topk), which nearly always hold top_p of the probability after a temperature; the rows where they do
    not are sorted whole."""
    probs = top_k_filter(_tempered(logits, temperature), top_k).softmax(dim=-1)
    if top_p >= 1.0:  # every token kept: their order does not matter
        return _search(probs.cumsum(dim=-1), uniforms)
    top, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.size(-1)), dim=-1)
    tokens = _nucleus(top, order, top_p, uniforms)
    short = top.cumsum(dim=-1)[:, -1] < top_p
    if bool(short.any()):
        top, order = probs[short].sort(dim=-1, descending=True)
        tokens[short] = _nucleus(top, order, top_p, uniforms[short])
    return tokens


def _nucleus(top: torch.Tensor, order: torch.Tensor, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """The draw among probabilities `top` sorted from the largest (their token ids `order`), keeping the smallest
    set of them whose mass reaches top_p."""
    before = top.cumsum(dim=-1) - top  # mass of the tokens ranked above each one
    keep = before < top_p
    keep[:, 0] = True  # the top token always stays (a tiny p can round to 0)
    return order.gather(1, _search((top * keep).cumsum(dim=-1), uniforms)[:, None]).squeeze(1)


def _search(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first index at which `cdf` exceeds uniforms[b] x its last value (never past the last index:
    rounding cannot pick a token beyond the row)."""
    found = torch.searchsorted(cdf, (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(1)
    return found.clamp_(max=cdf.size(-1) - 1)


@dataclass
class SamplingOptions:
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # never end the story early: always max_new_tokens (for benchmarks)
    guide: bool = True  # an instruct model's story is steered toward what its instruction asks for (guide.py)

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise StoryGPTError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise StoryGPTError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise StoryGPTError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise StoryGPTError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty <= 10:
            raise StoryGPTError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise StoryGPTError("stop strings must be non-empty strings")
