"""Attention kernels besides SDPA: the reference two-matmul attention, its causal-block variant, and the rule
that picks them (`matmul_attention`); model.py's Attention calls them, benchmarks/attention.py times them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def matmul_attention(choice: str, q: torch.Tensor, S: int) -> bool:
    """Whether to attend with two matmuls and a softmax (`naive_attention`) instead of SDPA.

    "sdpa" never, "naive" always, "auto" on CPU in bf16 with up to 1024 keys: there oneDNN's bf16 GEMMs
    (in causal query blocks, fused with the softmax by torch.compile) beat SDPA's CPU flash kernel,
    forward and backward: the compiled `small` training step at T=512 runs 1.4x faster
    (benchmarks/attention.py shows the kernels alone). Everywhere else (GPUs, fp32, long sequences,
    where the scores would be large) SDPA is faster or needs far less memory."""
    if choice == "auto":
        return q.device.type == "cpu" and q.dtype == torch.bfloat16 and S <= 1024
    return choice == "naive"


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) boolean mask for T queries that are the last T of S positions: True = may attend."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                      block: int = 128) -> torch.Tensor:
    """`naive_attention` one block of queries at a time, each against only the keys it can see: with
    4 blocks a causal T x T attention computes 10/16 of the scores instead of all of them."""
    T, S = q.size(-2), k.size(-2)
    if T <= block:
        return naive_attention(q, k, v, dropout_p)
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        seen = S - T + end  # the keys visible to the block's last query
        outs.append(naive_attention(q[..., start:end, :], k[..., :seen, :], v[..., :seen, :], dropout_p))
    return torch.cat(outs, dim=-2)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: softmax(QK^T / sqrt(d) + mask) V, materialising the T x S matrix. `mask` (True = may
    attend, broadcast over the scores) defaults to the causal mask of T queries that are the last T of S."""
    T, S = q.size(-2), k.size(-2)
    if mask is None:
        mask = causal_mask(T, S, q.device)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    # in bf16 the softmax accumulates in fp32 and rounds its output to bf16, as FlashAttention does
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    att = F.dropout(att, dropout_p)
    return att @ v
