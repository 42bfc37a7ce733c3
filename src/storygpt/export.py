"""Export a trained model (run or model directory) as a model directory, optionally in fp16/bf16.

This is how the shipped default model is made: `storygpt export --model RUN --out DIR --dtype fp16`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import load_model, save_model_dir
from .device import DTYPES
from .errors import StoryGPTError


def export_model(model: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp16") -> Path:
    """Write `model` to `out` with floating weights cast to `dtype` (fp32, fp16 or bf16)."""
    if dtype not in DTYPES:
        raise StoryGPTError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")
    if Path(out).resolve() == Path(model).resolve():
        raise StoryGPTError("--out must differ from --model")
    net, tokenizer, info = load_model(model)
    return save_model_dir(out, net.cfg, net.state_dict(), tokenizer, info, dtype=DTYPES[dtype])
