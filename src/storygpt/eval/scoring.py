"""Log-likelihoods of continuations: the primitive behind the suite's cloze, grammar and continuation
measures (see suite.py).

A continuation is scored after its context the way a story is generated: the start-of-story token,
then the context, then the continuation. Context and continuation are encoded together and the
continuation's tokens are those past the longest common prefix with the context alone, so a
tokenizer that merges across the boundary never scores a piece of the context (the approach of
lm-evaluation-harness). Sequences longer than the model's context keep the continuation (at most
half the context) and the latest context tokens before it.

Scoring runs in fp32 in batches sorted by length; the same inputs give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from storygpt.errors import StoryGPTError
from storygpt.generate.story_model import StoryModel


@dataclass(frozen=True)
class Scored:
    logprob: float  # summed natural-log probability of the continuation's tokens
    tokens: int     # how many tokens the continuation took

    @property
    def mean(self) -> float:
        return self.logprob / self.tokens


def split_tokens(model: StoryModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids starting with the start-of-story token, continuation ids)."""
    ctx = model.encode_prompt(context)
    full = model.encode_prompt(context + continuation)
    common = 0
    for a, b in zip(ctx, full):
        if a != b:
            break
        common += 1
    if common == len(full):
        raise StoryGPTError(f"continuation {continuation!r} adds no tokens to its context")
    return full[:common], full[common:]


def fit(ctx: list[int], cont: list[int], context: int) -> tuple[list[int], list[int]]:
    """Trim to at most `context` + 1 tokens: the continuation keeps its first half-context tokens,
    the context its latest tokens."""
    cont = cont[:max(1, context // 2)] if len(ctx) + len(cont) > context + 1 else cont
    keep = context + 1 - len(cont)
    return ctx[-keep:], cont


@torch.inference_mode()
def score_tokens(model: StoryModel, items: list[tuple[list[int], list[int]]], batch_size: int = 32) -> list[Scored]:
    """Summed log-probability of each (context ids, continuation ids) pair's continuation."""
    net, device = model.model, model.device
    net.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    out: list[Scored | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        group = [fit(*items[i], model.context) for i in order[start:start + batch_size]]
        width = max(len(c) + len(t) for c, t in group) - 1
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -1, dtype=torch.long)
        for row, (ctx, cont) in enumerate(group):
            seq = torch.tensor(ctx + cont)
            x[row, :len(seq) - 1] = seq[:-1]
            y[row, len(ctx) - 1:len(seq) - 1] = seq[len(ctx):]
        logits, _ = net(x.to(device), y.to(device))
        logp = F.log_softmax(logits.float(), dim=-1)
        mask = y.to(device) >= 0
        picked = logp.gather(-1, y.clamp(min=0).to(device)[..., None]).squeeze(-1) * mask
        sums, counts = picked.sum(-1).tolist(), mask.sum(-1).tolist()
        for row, i in enumerate(order[start:start + batch_size]):
            out[i] = Scored(sums[row], int(counts[row]))
    return out  # type: ignore[return-value]


def score_continuations(model: StoryModel, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[Scored]:
    """Summed log-probability of each (context, continuation) text pair's continuation."""
    return score_tokens(model, [split_tokens(model, c, t) for c, t in pairs], batch_size)
