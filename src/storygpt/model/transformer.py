"""The transformer: LLaMA-style (RMSNorm pre-norm, SwiGLU, rotary embeddings, no biases) or
GPT-2-style (LayerNorm, GELU MLP, learned positions), with SDPA or naive attention.

Read top to bottom: rotary embeddings, the blocks, then the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from storygpt.errors import StoryGPTError

from .attention import blocked_attention, causal_mask, matmul_attention, naive_attention
from .cache import KVCache, RowsCache
from .config import ModelConfig


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables of shape (max_seq_len, head_dim), laid out for `apply_rope`: the cosine of each
    pair's angle twice, and the sine with the sign it takes in the pair's first slot (-) and second (+)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... of the last dim (Meta/llama2.c layout):
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as x * cos + swap_pairs(x) * signed_sin, which is
    three cheap kernels forward and backward (3.5x faster than splitting and stacking the pairs).

    x: (B, T, heads, D); cos/sin: (T, D) from `rope_tables`. Queries and keys are rotated together.
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos[:, None] + swapped * sin[:, None]).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        bias = cfg.arch == "gpt2"
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int | torch.Tensor = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim) at positions start..start+T-1. With a cache (this layer's preallocated
        key/value buffers), the new keys/values are written at those positions and the queries
        attend to everything up to them. With a `mask` (compiled decoding, see
        `Transformer.decode_step`), `start` is a 1-element tensor and the queries attend to the whole
        buffer with the unwritten positions masked: the same shapes at every step."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk, v = qkv.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        if rope is not None:  # one rotation for queries and keys: fewer kernels per decoded token
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None and mask is not None:
            k_buf, v_buf = cache
            k, v = k_buf.index_copy_(2, start, k), v_buf.index_copy_(2, start, v)
        elif cache is not None:
            k_buf, v_buf = cache
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            k, v = k_buf[:, :, :start + T], v_buf[:, :, :start + T]
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.dropout if self.training else 0.0
        if mask is not None:  # one query over the whole buffer: two small matmuls that inductor fuses
            y = naive_attention(q, k, v, mask=mask)  # beat SDPA's masked CPU kernel 3x here
        elif not matmul_attention(self.cfg.attention, q, k.size(-2)):
            S = k.size(-2)
            if T == S:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            elif T == 1:  # one new token sees the whole cache
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device), dropout_p=p)
        else:
            y = blocked_attention(q, k, v, p)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def forward_rows(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, k_buf: torch.Tensor,
                     v_buf: torch.Tensor, slots: torch.Tensor | slice, pos: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """One new token per row (x: (B, 1, dim)), row b in row `slots[b]` of the cache buffers at its own
        position `pos[b]`: its key/value are written there, and its query attends to the first
        `mask.size(-1)` entries of that cache row with `mask` (B, 1, 1, S) hiding those past `pos[b]`.
        `slots` is a long tensor (B,) or, for rows next to each other in the cache, a slice (then the keys
        are read in place instead of gathered)."""
        B = x.size(0)
        qkv = self.wqkv(x).view(B, 1, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk, v = qkv.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        if rope is not None:  # cos/sin (B, 1, D): each row its own angle
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        q = q.transpose(1, 2)
        S = mask.size(-1)
        if isinstance(slots, slice):
            rows = torch.arange(slots.start, slots.stop, device=x.device)
            k_buf[rows, :, pos], v_buf[rows, :, pos] = k[:, 0], v[:, 0]
            keys, values = k_buf[slots, :, :S], v_buf[slots, :, :S]
        else:
            k_buf[slots, :, pos], v_buf[slots, :, pos] = k[:, 0], v[:, 0]
            keys, values = k_buf[:, :, :S].index_select(0, slots), v_buf[:, :, :S].index_select(0, slots)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        y = naive_attention(q, keys, values, mask=mask)  # (B, heads, 1, head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, 1, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        bias = not self.swiglu
        if self.swiglu:
            self.w_gate_up = nn.Linear(cfg.dim, 2 * cfg.mlp_dim, bias=False)  # gate and up in one matmul
        else:
            self.w_up = nn.Linear(cfg.dim, cfg.mlp_dim, bias=bias)
        self.w_down = nn.Linear(cfg.mlp_dim, cfg.dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
            return self.w_down(F.silu(gate) * up)
        return self.w_down(F.gelu(self.w_up(x), approximate="tanh"))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope, cache=None, start: int | torch.Tensor = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, start, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def forward_rows(self, x: torch.Tensor, rope, k_buf: torch.Tensor, v_buf: torch.Tensor,
                     slots: torch.Tensor | slice, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.forward_rows(self.attn_norm(x), rope, k_buf, v_buf, slots, pos, mask)
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.arch == "gpt2":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.cfg.arch == "gpt2":
                n -= self.pos_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, given targets, the mean cross-entropy (targets of -1 are ignored).

        With targets, logits (B, T, vocab) are computed for every position; without, only for the
        last one (B, 1, vocab), all that sampling needs. With a KVCache, idx continues the cached
        sequence (positions cache.pos ...) and the cache advances by T. With a `RowsCache` (continuous
        batching), it is `decode_rows`: one token per row, each row at its own position.
        """
        if isinstance(cache, RowsCache):
            return self.decode_rows(idx, cache.slots, cache.pos, cache.cache, cache.length), None
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise StoryGPTError(f"sequence of {start + T} tokens is longer than the model's context ({self.cfg.max_seq_len})")
        x = self.tok_emb(idx)
        rope = None
        if self.cfg.arch == "gpt2":
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if cache is None else (cache.k[i], cache.v[i]), start)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.output(x[:, -1:]), None
        logits = self.output(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def decode_step(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, vocab) for one new token per row at position `pos` (a 1-element long tensor),
        with a cache of any fill level: every shape is the same at every step, so
        `torch.compile(model.decode_step)` compiles once and runs each token as one fused graph instead
        of ~250 small kernels launched from Python. The caller advances `cache.pos`."""
        x = self.tok_emb(idx)
        rope = None
        if self.cfg.arch == "gpt2":
            x = x + self.pos_emb(pos)
        else:
            rope = (self.rope_cos[pos], self.rope_sin[pos])
        mask = (torch.arange(cache.k[0].size(2), device=idx.device) <= pos)[None]  # (1 query, S keys)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, (cache.k[i], cache.v[i]), pos, mask)
        return self.output(self.norm(x))

    def decode_rows(self, idx: torch.Tensor, slots: torch.Tensor | slice, pos: torch.Tensor, cache: KVCache,
                    length: int | None = None) -> torch.Tensor:
        """Logits (B, 1, vocab) for one new token per row (idx: (B, 1)), where each row is its own sequence:
        row b lives in row `slots[b]` of `cache` (a long tensor (B,), or a slice of consecutive rows) and its
        token goes at position `pos[b]` (B,); it attends to its cached positions 0..pos[b], the rest of the
        cache row is masked. `length` (at least max(pos) + 1; default the whole cache) is how many cache
        positions are read: eager decoding passes the longest row's, a compiled step the whole cache (then
        every shape is fixed for a given B). `cache.pos` is not used: continuous batching keeps each row's
        position itself. The rows' results do not depend on each other (up to the rounding of batched
        kernels)."""
        S = cache.k[0].size(2) if length is None else length
        x = self.tok_emb(idx)
        rope = None
        if self.cfg.arch == "gpt2":
            x = x + self.pos_emb(pos)[:, None]
        else:
            rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, D)
        mask = (torch.arange(S, device=idx.device)[None] <= pos[:, None])[:, None, None]  # (B, 1, 1 query, S)
        for i, layer in enumerate(self.layers):
            x = layer.forward_rows(x, rope, cache.k[i], cache.v[i], slots, pos, mask)
        return self.output(self.norm(x))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N (non-embedding matmuls + output) plus attention scores."""
        n = self.num_params(exclude_embeddings=True)
        if self.cfg.tie_embeddings:  # the output matmul still costs its FLOPs
            n += self.output.weight.numel()
        attn = 6 * self.cfg.n_layers * self.cfg.dim * seq_len  # 2 matmuls of T x d per token, x3 for fwd+bwd
        return 6 * n + attn


