"""`train()`: a model trained from scratch on a prepared data directory, the best checkpoint exported to
RUN/model. The loop (AdamW, warmup + cosine, accumulation, clipping, autocast, evaluation, atomic
checkpoints and exact resume, logs, loss curve) is loop.py's, shared with `finetune()`.

`storygpt train` is a thin wrapper around `train()`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from storygpt.data.shards import read_meta
from storygpt.errors import StoryGPTError
from storygpt.model.checkpoint import BEST, checkpoint_weights
from storygpt.model.device import pick_device, pick_dtype
from storygpt.model.model_dir import save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer

from . import loop
from .config import RunConfig, build_config
from .distill import teacher_paths
from .distributed import Dist
from .runstate import branch_run, check_fit, check_new_run, load_run


def train(data: str | os.PathLike | None, out: str | os.PathLike, preset: str = "small",
          config_file: str | None = None, overrides: list[str] | None = None, resume: bool = False,
          max_steps: int | None = None, max_time: float | None = None, compile: bool | None = None,
          dtype: str | None = None, progress: bool = True, until_step: int | None = None,
          teachers: list[str] | None = None, branch_from: str | os.PathLike | None = None) -> dict:
    """Train a model on a prepared data directory and export the best checkpoint to OUT/model.

    resume: continue OUT from its latest checkpoint (config from OUT/config.json, then overrides).
    branch_from: a run folder or one of its checkpoint files; OUT starts as a copy of it at that checkpoint
      and goes on from there (e.g. a WSD cooldown with `max_steps`), the source run left resumable.
    teachers: model directories to distil from (train.distill_alpha, train.distill_temperature); kept in
      OUT/config.json, so that --resume goes on distilling.
    until_step: stop (with a checkpoint) after this step, as if interrupted; for tests and staged runs.
    Returns a summary dict (steps, tokens, best val loss, tokens/s, paths).

    Under torchrun every process calls this: the ranks train data-parallel (`train.strategy` ddp or
    fsdp, see distributed.py), rank 0 alone writes the run directory, and every rank returns the summary.
    """
    run = Path(out)
    overrides = list(overrides or []) + [f"train.{k}={v}" for k, v in (("max_steps", max_steps), ("max_time", max_time),
                                                                       ("compile", compile), ("dtype", dtype))
                                         if v is not None]
    ckpt = None
    if branch_from is not None:
        branch_run(Path(branch_from), run, overrides)
        try:  # the same checks as any resume; one that fails leaves no half-made branch behind
            return train(data, run, overrides=overrides, resume=True, progress=progress, until_step=until_step,
                         teachers=teachers)
        except StoryGPTError:
            shutil.rmtree(run, ignore_errors=True)
            raise
    if resume:
        saved, cfg, ckpt, tokenizer = load_run(run, overrides)
        if "finetune" in saved:
            raise StoryGPTError(f"{run}: a fine-tuning run; continue it with `storygpt finetune --resume --out {run}`")
        data = data or saved.get("data")
        teachers = teachers or saved.get("teachers")
    else:
        check_new_run(run)
        cfg = build_config(preset, config_file, overrides)
    if data is None:
        raise StoryGPTError("no --data given")
    meta = read_meta(data)
    if resume:
        if meta["tokenizer"]["sha256"] != tokenizer.checksum:
            raise StoryGPTError(f"{data}: prepared with a different tokenizer than the run's (checksum mismatch)")
    else:
        tokenizer = Tokenizer.load(Path(data) / "tokenizer")
        if tokenizer.checksum != meta["tokenizer"]["sha256"]:
            raise StoryGPTError(f"{data}: tokenizer files do not match meta.json (checksum mismatch)")
        cfg.model.vocab_size = meta["vocab_size"]
    check_fit(cfg, meta)
    device = pick_device(cfg.train.device)
    amp = pick_dtype(device, cfg.train.dtype)
    with loop.process_group(device, cfg.train.strategy) as (d, device):
        return _train(run, cfg, data, meta, tokenizer, ckpt, device, amp, d, progress, until_step,
                      teacher_paths(teachers))


def _train(run: Path, cfg: RunConfig, data, meta: dict, tokenizer: Tokenizer, ckpt: dict | None,
           device: torch.device, amp: str, d: Dist, progress: bool, until_step: int | None,
           teachers: list[str]) -> dict:
    """The training run of `train()`, once its inputs are checked; on every rank under torchrun."""
    mc, tc = cfg.model, cfg.train
    extra = {"teachers": teachers} if teachers else None
    job, state = loop.start(run, cfg, data, tokenizer, lambda: Transformer(mc).to(device), ckpt, device, amp, d,
                            config_extra=extra, teachers=teachers)
    n_params = job.model.num_params()
    loop.fit(job, state, progress, until_step, desc=f"train {n_params / 1e6:.1f}M {device.type}/{amp}")

    def export(best: dict) -> dict:
        info = {"params": n_params, "step": best["step"], "tokens": best["tokens"],
                "val_loss": best["best_val_loss"], "val_bpb_estimate": best["best_val_loss"] * job.bpb_scale,
                "train": asdict(tc), "data": meta["splits"]["train"] | {"shards": None}}
        weights = checkpoint_weights(run / BEST, best, mc)  # FSDP: read whole from the sharded folder
        return {"model": str(save_model_dir(run / "model", mc, weights, tokenizer, info))}

    return loop.finish(job, state, loop.summary_of(job, state, n_params), export)
