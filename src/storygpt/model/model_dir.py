"""Model directories: a model without pickles, loadable anywhere, and the facts recorded with it.

    config.json            {"model": ModelConfig, "storygpt": {...facts: params, val loss, bpb, suite...}}
    model.safetensors
    tokenizer.model, tokenizer.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_write
from storygpt.text.tokenizer import Tokenizer

from .config import ModelConfig

WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------
def save_model_dir(out: str | os.PathLike, model_cfg: ModelConfig, state_dict: dict, tokenizer: Tokenizer,
                   info: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a model directory; tied weights are stored once. `dtype` casts floating weights (e.g. fp16)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state_dict.items():
        if model_cfg.tie_embeddings and k == "output.weight":
            continue
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    tokenizer.save(out)
    meta = {"model": model_cfg.to_dict(), "storygpt": info or {}}
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


RECORD_NEEDS = "--record needs a model directory (a run's is RUN/model)"


def read_model_info(model_dir: str | os.PathLike, problem: str = "not a model directory") -> dict:
    """The storygpt section of a model directory's config.json; StoryGPTError "{model_dir}: {problem}"
    when `model_dir` is not a model directory."""
    return _model_config(model_dir, problem)[1].get("storygpt", {})


def edit_model_info(model_dir: str | os.PathLike, edit: Callable[[dict], None],
                    problem: str = "not a model directory") -> None:
    """Let `edit` change the storygpt section of a model directory's config.json, and write it back atomically."""
    path, meta = _model_config(model_dir, problem)
    edit(meta.setdefault("storygpt", {}))
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def _model_config(model_dir: str | os.PathLike, problem: str) -> tuple[Path, dict]:
    path = Path(model_dir) / "config.json"
    if not (Path(model_dir) / WEIGHTS).is_file() or not path.is_file():
        raise StoryGPTError(f"{model_dir}: {problem}")
    return path, json.loads(path.read_text())


def record_eval(model_dir: str | os.PathLike, name: str, result: dict) -> None:
    """Keep an evaluation result in a model directory's config.json (under storygpt.evals[name]), so the
    model carries its measured quality with it (the web app and `facts()` show it)."""
    keep = {k: result[k] for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "context")}
    edit_model_info(model_dir, lambda info: info.setdefault("evals", {}).update({name: keep}), RECORD_NEEDS)


def record_suite(model_dir: str | os.PathLike, result: dict, settings: dict) -> None:
    """Keep a story-quality suite result (`eval --suite stories --record`) in a model directory's
    config.json, under storygpt.suite: the measures (without the sample stories) and the settings."""
    measures = {k: v for k, v in result.items() if k not in ("samples", "path")}
    edit_model_info(model_dir, lambda info: info.update(suite={"measures": measures, "settings": settings}),
                    RECORD_NEEDS)


