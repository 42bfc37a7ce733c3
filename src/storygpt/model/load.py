"""Loading a model: from a model directory, an adapter folder (`storygpt finetune --lora`, RUN/adapter: a PEFT LoRA
adapter and storygpt.json naming its base model, merged into it on load) or a run directory; and the models
installed with the package ("default", "instruct"), found with importlib.resources.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from storygpt.errors import StoryGPTError
from storygpt.text.tokenizer import Tokenizer

from . import adapters
from .checkpoint import BEST, LATEST, checkpoint_weights, load_checkpoint
from .config import ModelConfig
from .model_dir import WEIGHTS
from .transformer import Transformer

DEFAULT_MODEL = Path(str(resources.files("storygpt") / "default_model"))


def default_model_path() -> Path:
    """The model installed with the package (src/storygpt/default_model)."""
    if not (DEFAULT_MODEL / WEIGHTS).is_file():
        raise StoryGPTError("no default model is installed with this copy of storygpt; pass --model DIR")
    return DEFAULT_MODEL


INSTRUCT_MODEL = Path(str(resources.files("storygpt") / "instruct_model"))
SHIPPED_MODELS = ("default", "instruct")  # the names `--model` and `storygpt.load()` take for the shipped models


def instruct_model_installed() -> bool:
    """Whether the instruction-tuned model ships with this copy (src/storygpt/instruct_model: a model
    directory, or an adapter folder over the default model)."""
    return (INSTRUCT_MODEL / WEIGHTS).is_file() or (INSTRUCT_MODEL / "adapter_config.json").is_file()


def instruct_model_path() -> Path:
    """The instruction-tuned model installed with the package (src/storygpt/instruct_model)."""
    if not instruct_model_installed():
        raise StoryGPTError("no instruct model is installed with this copy of storygpt; pass --model DIR of an "
                            "instruction-tuned model")
    return INSTRUCT_MODEL


def shipped_or(path: str | os.PathLike | None) -> str | os.PathLike:
    """`path` itself, except None or "default" (the shipped model) and "instruct" (the shipped instruct model),
    which name the models installed with the package (a folder of that name is ./default, ./instruct)."""
    if path is None or str(path) == "default":
        return default_model_path()
    if str(path) == "instruct":
        return instruct_model_path()
    return path


def trained_context(cfg: ModelConfig, info: dict) -> int:
    """The context a model can be used with: the training seq_len recorded with it, at most max_seq_len
    (RoPE does not extrapolate past what it was trained on)."""
    return min(cfg.max_seq_len, info.get("train", {}).get("seq_len") or cfg.max_seq_len)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model directory, an adapter folder, or a run directory (its exported model or adapter, else its
    best/latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise StoryGPTError(f"{path}: no such model or run directory")
    if path.is_file():
        raise StoryGPTError(f"{path}: expected a model or run directory, got a file")
    if (path / WEIGHTS).is_file() or adapters.is_adapter_dir(path):
        return path
    if (path / "model" / WEIGHTS).is_file():
        return path / "model"
    if adapters.is_adapter_dir(path / "adapter"):
        return path / "adapter"
    if (path / BEST).is_file() or (path / LATEST).is_file():
        return path
    raise StoryGPTError(f"{path}: not a model directory (no {WEIGHTS}) nor a run directory (no checkpoint)")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer, dict]:
    """Load (model in eval mode, tokenizer, info) from a model directory, an adapter folder or a run directory."""
    path = resolve_model_path(path)
    if adapters.is_adapter_dir(path):
        return load_adapter(path, device, dtype)
    if (path / WEIGHTS).is_file():
        cfg_path = path / "config.json"
        try:
            meta = json.loads(cfg_path.read_text())
            cfg = ModelConfig.from_dict(meta["model"])
        except FileNotFoundError:
            raise StoryGPTError(f"{path}: model directory has no config.json") from None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StoryGPTError(f"{cfg_path}: not a storygpt model config") from None
        try:
            state = load_file(str(path / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as e:
            raise StoryGPTError(f"{path / WEIGHTS}: corrupt weights file ({str(e).splitlines()[0]})") from None
        info = meta.get("storygpt", {})
        tokenizer = Tokenizer.load(path)
    else:
        ckpt_path = path / (BEST if (path / BEST).is_file() else LATEST)
        ckpt = load_checkpoint(ckpt_path)
        cfg = ModelConfig.from_dict(ckpt["config"]["model"])
        state = checkpoint_weights(ckpt_path, ckpt, cfg)
        if (ckpt.get("finetune") or {}).get("lora"):  # a LoRA run's checkpoint: a PEFT model's weights
            state = adapters.merge_lora_state(cfg, state, ckpt["finetune"]["lora"])
        info = {"step": ckpt["step"], "val_loss": ckpt.get("best_val_loss"), "train": ckpt["config"]["train"]}
        tokenizer = Tokenizer.load(path / "tokenizer")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise StoryGPTError(f"{path}: tokenizer vocab ({tokenizer.vocab_size}) does not match the model ({cfg.vocab_size})")
    model = Transformer(cfg)
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise StoryGPTError(f"{path}: weights do not match the config ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise StoryGPTError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, info


def load_adapter(path: Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer, dict]:
    """An adapter folder: its base model (a path, or "default") with the adapter merged in (see adapters.py)."""
    spec = adapters.read_spec(path)
    net, tokenizer, info = load_model(adapter_base(path, spec))
    net = adapters.apply_adapter(net, tokenizer, path, spec)
    return net.to(device=device, dtype=dtype).eval(), tokenizer, adapters.adapter_info(info, spec, path)


def adapter_base(path: Path, spec: dict) -> Path:
    """The folder of an adapter's base model (storygpt.json's `base_model`: a path, or "default")."""
    return default_model_path() if spec["base_model"] == "default" else adapters.find_base(path, spec)
