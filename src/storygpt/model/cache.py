"""The KV cache of incremental decoding: `KVCache` (preallocated per layer) and `RowsCache` (each row of a batch
at its own position, for continuous batching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


class KVCache:
    """Preallocated keys and values for incremental decoding: one (B, kv_heads, max_len, head_dim)
    buffer pair per layer, filled in place (no re-concatenation). `pos` counts filled positions."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device=None, dtype=torch.float32, max_len: int | None = None):
        shape = (batch_size, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def rows(self, rows: slice, pos: int) -> KVCache:
        """A cache over `rows` of this one's buffers (the same memory, not a copy) with `pos` filled positions:
        `Transformer.forward` with it writes into those rows only (continuous batching prefills one slot)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.pos = [k[rows] for k in self.k], [v[rows] for v in self.v], pos
        return view


@dataclass
class RowsCache:
    """What `Transformer.forward(idx, cache=RowsCache(...))` needs to decode one token per row with each row
    at its own position (`Transformer.decode_rows`); wrappers of a model that pass `cache` on work unchanged."""

    cache: KVCache
    slots: torch.Tensor | slice
    pos: torch.Tensor
    length: int | None = None
