"""Training checkpoints, in a run directory (what `storygpt train --out RUN` writes):

    RUN/config.json        {"model": ..., "train": ..., "data": ...}
    RUN/tokenizer/         the tokenizer of the data
    RUN/ckpt_latest.pt     weights + optimizer + step + RNG states (written atomically)
    RUN/ckpt_best.pt       the same, at the best validation loss so far
    RUN/ckpt_*.dcp-*/      FSDP runs: the weights and optimizer state sharded by torch.distributed.checkpoint;
                           ckpt_*.pt then holds everything else and the folder's name ("dcp")
    RUN/log.jsonl, log.csv, loss.png
    RUN/model/             the exported best model (a model directory, model_dir.py)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_write

from .config import ModelConfig
from .transformer import Transformer

LATEST = "ckpt_latest.pt"
BEST = "ckpt_best.pt"


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StoryGPTError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoryGPTError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not ("model" in state or "dcp" in state) or "step" not in state:
        raise StoryGPTError(f"{path}: not a storygpt checkpoint")
    if "dcp" in state and not (path.parent / state["dcp"] / ".metadata").is_file():
        raise StoryGPTError(f"{path}: its sharded weights ({state['dcp']}/) are missing or incomplete")
    return state


def checkpoint_weights(path: str | os.PathLike, ckpt: dict, cfg: ModelConfig) -> dict:
    """A checkpoint's full model state dict: stored in it, or read whole from its sharded folder (FSDP runs).

    Reading a sharded folder needs no process group, so any single process can do it (export, eval).
    """
    if "model" in ckpt:
        return ckpt["model"]
    model = Transformer(cfg)
    load_sharded(Path(path).parent / ckpt["dcp"], model, None, collective=False)
    return model.state_dict()


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): torch.distributed.checkpoint, one file per rank, any world size on load
# (distributed.save_sharded_checkpoint writes them during training; any process can read them here)
# --------------------------------------------------------------------------------------------
def save_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Every rank writes its shards of the weights and optimizer state into the folder `path` (collective).

    An optimizer that has not stepped yet has no state, and is left out: asking torch for its state
    dict would make it initialize the state with a zero-lr step, which shifts Adam's bias correction.
    Returns whether the optimizer state was saved.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))
    return "optim" in state


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 collective: bool) -> None:
    """Load a sharded checkpoint into `model` (and `optimizer`, when given), whatever world size wrote it.

    collective: True when `model` is FSDP-sharded over the current process group (all ranks call this
    together); False for a plain model, which each process then reads whole on its own.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with warnings.catch_warnings():  # "torch.distributed is uninitialized, assuming a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(path), no_dist=not collective)
            set_model_state_dict(model, state["model"])
            return
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path), no_dist=not collective)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
