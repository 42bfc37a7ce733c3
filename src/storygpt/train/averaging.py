"""Weight averaging: the mean of a run's weights over the end of its training.

A run with `train.snapshot_from = N` keeps the model weights of each regular checkpoint from step N on
(RUN/snapshots/step_NNNNNN.safetensors, fp32) and of its last step; `average_snapshots` (`storygpt average
RUN`) writes their mean as a model directory. Averaging the weights along the end of a run smooths the noise of
its last steps, as a lower learning rate would (for the 512-token default model: docs/roadmap.md).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_write
from storygpt.model.checkpoint import checkpoint_weights, load_checkpoint
from storygpt.model.config import ModelConfig
from storygpt.model.model_dir import save_model_dir
from storygpt.text.tokenizer import Tokenizer

from .config import RunConfig

SNAPSHOTS = "snapshots"
_NAME = re.compile(r"step_(\d+)\.safetensors")


def keep_snapshot(run: Path, step: int, checkpoint: str, cfg: ModelConfig) -> Path:
    """RUN/snapshots/step_NNNNNN.safetensors: the model weights of RUN/checkpoint (just written at `step`),
    read back whole, so that sharded (FSDP) checkpoints give the same file as the others. A step kept already
    (the last step of a run is often a regular checkpoint too) is not written again."""
    out = run / SNAPSHOTS / f"step_{step:06d}.safetensors"
    if out.is_file():
        return out
    ckpt = load_checkpoint(run / checkpoint)
    weights = checkpoint_weights(run / checkpoint, ckpt, cfg)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()
               if not (cfg.tie_embeddings and k == "output.weight")}  # tied: stored once
    out.parent.mkdir(exist_ok=True)
    atomic_write(out, lambda tmp: save_file(tensors, tmp))
    return out


def snapshots(run: str | os.PathLike, from_step: int = 0) -> dict[int, Path]:
    """The run's kept snapshots at or after `from_step`: step -> file, in step order."""
    folder = Path(run) / SNAPSHOTS
    found = {int(m.group(1)): p for p in folder.glob("step_*.safetensors") if (m := _NAME.fullmatch(p.name))}
    return {s: found[s] for s in sorted(found) if s >= from_step}


def average_snapshots(run: str | os.PathLike, out: str | os.PathLike | None = None, from_step: int = 0,
                      dtype: torch.dtype | None = None) -> Path:
    """The mean of the run's snapshots from `from_step` on, as a model directory (default RUN/model_avg)."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise StoryGPTError(f"{run}: not a run directory (no config.json)")
    kept = snapshots(run, from_step)
    if not kept:
        raise StoryGPTError(f"{run}: no weight snapshots at or after step {from_step} "
                            f"(train with --set train.snapshot_from=STEP to keep them)")
    saved = json.loads((run / "config.json").read_text())
    cfg = RunConfig.from_dict({k: saved[k] for k in ("model", "train")}, str(run / "config.json"))
    total: dict[str, torch.Tensor] = {}
    for path in kept.values():
        for k, v in load_file(path).items():
            total[k] = total[k] + v if k in total else v.double()
    mean = {k: (v / len(kept)).float() for k, v in total.items()}
    info = {"step": max(kept), "averaged_steps": list(kept), "train": asdict(cfg.train)}
    return save_model_dir(out or run / "model_avg", cfg.model, mean, Tokenizer.load(run / "tokenizer"), info, dtype)
