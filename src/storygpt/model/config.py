"""The model's shape: `ModelConfig` (LLaMA or GPT-2 style) and the named shapes `PRESETS`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from storygpt.errors import StoryGPTError


@dataclass
class ModelConfig:
    arch: str = "llama"            # "llama" | "gpt2"
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    hidden_dim: int | None = None  # MLP width; None = derived from dim and multiple_of
    multiple_of: int = 32
    max_seq_len: int = 512
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attention: str = "auto"        # "auto" | "sdpa" | "naive" (see `matmul_attention`)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.arch not in ("llama", "gpt2"):
            raise StoryGPTError(f"model.arch must be 'llama' or 'gpt2', got {self.arch!r}")
        if self.attention not in ("auto", "sdpa", "naive"):
            raise StoryGPTError(f"model.attention must be 'auto', 'sdpa' or 'naive', got {self.attention!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) < 1:
                raise StoryGPTError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise StoryGPTError(f"model.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 and self.arch == "llama":
            raise StoryGPTError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise StoryGPTError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise StoryGPTError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_dim(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        if self.arch == "gpt2":
            return 4 * self.dim
        hidden = int(2 * 4 * self.dim / 3)  # SwiGLU: 2/3 of 4*dim keeps the parameter count of a GELU MLP
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise StoryGPTError(f"unknown model config key(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# Named shapes. vocab_size here is the default; training takes the tokenizer's.
PRESETS: dict[str, ModelConfig] = {
    # For tests: trains in seconds.
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=256),
    # The CPU default: the best 10-minute model on a 2-core CPU that we measured (docs/results/models.md, "The 10-minute CPU model").
    "small": ModelConfig(vocab_size=4096, dim=256, n_layers=6, n_heads=4, max_seq_len=256),
    # llama2.c's stories15M shape.
    "15m": ModelConfig(vocab_size=32000, dim=288, n_layers=6, n_heads=6, max_seq_len=256),
    # Roughly the TinyStories paper's 33M model, as a LLaMA.
    "33m": ModelConfig(vocab_size=8192, dim=512, n_layers=9, n_heads=8, max_seq_len=512),
    # llama2.c's stories110M shape.
    "110m": ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
}


