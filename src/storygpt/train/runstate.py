"""A training run's state and its checkpoints: the `Job` (what does not change while training), the
`LoopState` (what does), the run directory's config, and `save`/`restore` of checkpoints with every RNG
state, which is what makes a resumed run continue bit for bit. The loop itself is in loop.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from storygpt.data.shards import TokenData
from storygpt.errors import StoryGPTError
from storygpt.model.checkpoint import BEST, LATEST, PREV, load_checkpoint, load_sharded, save_checkpoint
from storygpt.text.tokenizer import Tokenizer

from . import distributed
from .config import RunConfig, apply_overrides
from .distributed import Dist
from .runlog import read_log


def warn(msg: str) -> None:
    print(f"storygpt: warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# The job and its state
# --------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """What changes as training goes; a checkpoint holds it (with the weights, optimizer and RNG states)."""

    step: int = 0
    train_time: float = 0.0           # wall-clock seconds of training over all sessions, evals included
    tokens: int = 0                   # tokens seen (inputs, all ranks), masked targets included
    best_val: float = math.inf
    stop_reason: str = "max_steps"
    last_eval_step: int = -1
    tok_per_s: float = 0.0            # of this session, when it ends


@dataclass
class Job:
    """What does not change while training: the run directory, config, model, optimizer, data, devices."""

    run: Path
    cfg: RunConfig
    model: torch.nn.Module            # the weights checkpoints hold (a PEFT model for LoRA)
    trained: torch.nn.Module          # what forward/backward run on: the DDP/FSDP wrapper, or `model`
    optimizer: torch.optim.Optimizer
    train_data: TokenData
    val_batches: list
    bpb_scale: float                  # nats/token -> bits/byte of the val split
    device: torch.device
    amp: str
    d: Dist
    resumed: bool = False
    extra: dict = field(default_factory=dict)  # more keys for every checkpoint (e.g. a fine-tune's base and LoRA)
    instruction_pairs: tuple | None = None  # instruction data: (own, other) batches for the instruction gain
    epochs: object | None = None      # train.sampling=epochs: the StoryEpochs sampler; else TokenData.batch
    teachers: list = field(default_factory=list)  # distillation: frozen teacher models
    ema: torch.nn.Module | None = None  # train.ema_decay: an AveragedModel holding the EMA of the weights
    latest_is_good: bool = True       # RUN/ckpt_latest.pt becomes ckpt_prev.pt when the next one is written (not
                                      # when --resume skipped it as unreadable: ckpt_prev.pt is then kept instead)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index` (optimizer step x grad_accum_steps + micro-step) of this rank."""
        tc = self.cfg.train
        if self.epochs is not None:
            return self.epochs.batch(index, tc.batch_size)
        return self.train_data.batch(index, tc.batch_size, tc.seq_len, tc.seed)

    def epoch(self, step: int) -> float | None:
        """Epochs of whole stories read before optimizer step `step` (train.sampling=epochs; else None)."""
        if self.epochs is None:
            return None
        tc = self.cfg.train
        return self.epochs.epoch(step * tc.grad_accum_steps, tc.batch_size)

    @property
    def fsdp(self) -> bool:
        return self.cfg.train.strategy == "fsdp" and self.d.active

    @property
    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.seq_len * tc.grad_accum_steps * self.d.world_size


def write_run_dir(run: Path, cfg: RunConfig, data, tokenizer: Tokenizer, d: Dist, extra: dict | None = None) -> None:
    """RUN/config.json ({"model", "train", "data", ...extra}) and RUN/tokenizer/, written by rank 0 once all
    input checks have passed."""
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        tokenizer.save(run / "tokenizer")
        saved = {**cfg.to_dict(), "data": str(Path(data).resolve()), **(extra or {})}
        (run / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    d.barrier()


# --------------------------------------------------------------------------------------------
# Random number generators (part of every checkpoint: the dropout masks replay exactly on resume)
# --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(ckpt: dict, d: Dist, seed: int) -> None:
    """Each rank's own RNG state when the run resumes on as many ranks; otherwise rank 0's, plus a fresh
    dropout stream per rank (a different world size cannot replay the same dropout masks anyway)."""
    per_rank = ckpt.get("rng_ranks")
    if per_rank and len(per_rank) == d.world_size:
        set_rng_state(per_rank[d.rank])
        return
    set_rng_state(ckpt["rng"])
    if d.world_size > 1:
        torch.manual_seed(seed + d.rank + 7919 * ckpt["step"])


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save(job: Job, state: LoopState, name: str, use_ema: bool = False) -> None:
    """RUN/name: weights (with `use_ema`, the EMA's in their place), optimizer, state, RNG states (each
    rank's), config, the EMA; sharded under FSDP. Writing RUN/ckpt_latest.pt keeps the one it replaces as
    RUN/ckpt_prev.pt. A write that fails (a full disk) leaves the checkpoints there as they were and raises
    StoryGPTError on every rank."""
    tc, d = job.cfg.train, job.d
    rng = rng_state()
    meta = {"scheduler": {"step": state.step, "train_time": state.train_time},  # lr = lr_at(step, progress)
            "step": state.step, "train_time": state.train_time, "tokens": state.tokens,
            "best_val_loss": state.best_val, "rng": rng,
            "data_position": {"micro_step": state.step * tc.grad_accum_steps, "seed": tc.seed},
            "config": job.cfg.to_dict(), **job.extra}
    if job.ema is not None:
        meta |= {"ema": job.ema.state_dict(), "weights": "ema" if use_ema else "model"}
    rng_ranks = d.gather(rng)  # each rank's dropout stream, for an exact resume on as many ranks
    if rng_ranks is not None:
        meta |= {"rng_ranks": rng_ranks, "world_size": d.world_size}
    prev = job.run / PREV if name == LATEST and job.latest_is_good else None
    error = None
    try:
        if job.fsdp:
            distributed.save_sharded_checkpoint(job.run / name, job.model, job.optimizer, meta, d, prev)
        elif d.is_main:
            weights = job.ema.module.state_dict() if use_ema else job.model.state_dict()
            save_checkpoint(job.run / name, {"model": weights, "optimizer": job.optimizer.state_dict(), **meta}, prev)
    except StoryGPTError as e:
        error = str(e)
    errors = d.gather(error) or [error]  # every rank's: they all stop, none is left waiting for the others
    error = next((e for e in errors if e), None)
    if error:
        raise StoryGPTError(error)
    if name == LATEST:
        job.latest_is_good = True


def restore(job: Job, ckpt: dict) -> LoopState:
    """Weights, optimizer state and RNG states from a checkpoint (newest_checkpoint's); the state to go on from."""
    tc, d = job.cfg.train, job.d
    if ckpt["config"]["model"] != asdict(job.cfg.model):
        raise StoryGPTError("model config keys cannot change on --resume (only train keys can)")
    path = job.run / ckpt.get("loaded_from", LATEST)
    job.latest_is_good = path.name == LATEST
    if "dcp" in ckpt:  # a checkpoint from before the first step has no optimizer state
        load_sharded(path.parent / ckpt["dcp"], job.model, job.optimizer if ckpt["dcp_optimizer"] else None,
                     collective=job.fsdp)
    elif job.fsdp:
        raise StoryGPTError(f"{path}: this run was trained with ddp or in one process; resume it with --strategy ddp")
    else:
        job.model.load_state_dict(ckpt["model"])
        job.optimizer.load_state_dict(ckpt["optimizer"])
    if job.ema is not None:
        if "ema" not in ckpt:
            raise StoryGPTError(f"{path}: the run has no EMA of its weights to go on from; resume with ema_decay=0")
        job.ema.load_state_dict(ckpt["ema"])
    restore_rng(ckpt, d, tc.seed)
    saved = ckpt["config"]["train"]
    before = saved["batch_size"] * saved["grad_accum_steps"] * ckpt.get("world_size", 1)
    now = tc.batch_size * tc.grad_accum_steps * d.world_size
    if d.is_main and before != now:
        warn(f"the global batch changes from {before} to {now} sequences (batch_size x grad_accum_steps x "
             "ranks); --set batch_size=... keeps it")
    return LoopState(step=ckpt["step"], train_time=ckpt["train_time"], tokens=ckpt["tokens"],
                     best_val=ckpt["best_val_loss"])


# --------------------------------------------------------------------------------------------
# Run directories to start or resume
# --------------------------------------------------------------------------------------------
def check_new_run(run: Path) -> None:
    if any((run / name).exists() for name in (LATEST, PREV, BEST)):
        raise StoryGPTError(f"{run}: already holds a training run; use --resume to continue it or a new --out")


def load_run(run: Path, overrides: list[str]) -> tuple[dict, RunConfig, dict, Tokenizer]:
    """What a run to resume holds: (its config.json, its RunConfig with `overrides` applied, its newest
    checkpoint that loads, its tokenizer)."""
    if not (run / "config.json").is_file():
        raise StoryGPTError(f"{run}: nothing to resume (no config.json)")
    saved = json.loads((run / "config.json").read_text())
    cfg = apply_overrides(RunConfig.from_dict({k: saved[k] for k in ("model", "train")}, str(run / "config.json")),
                          overrides)
    cfg.train.validate()
    return saved, cfg, newest_checkpoint(run), Tokenizer.load(run / "tokenizer")


def newest_checkpoint(run: Path) -> dict:
    """The newest checkpoint of `run` that loads whole: ckpt_latest.pt, else ckpt_prev.pt (the one before),
    with "loaded_from": the name of its file. Falling back is one warning line: what was skipped and why,
    and the steps it costs (those log.jsonl holds after the checkpoint's)."""
    try:
        return load_checkpoint(run / LATEST, verify=True) | {"loaded_from": LATEST}
    except StoryGPTError as e:
        if not (run / PREV).exists():
            raise
        skipped = str(e)
    try:
        ckpt = load_checkpoint(run / PREV, verify=True)
    except StoryGPTError as e:
        raise StoryGPTError(f"no checkpoint of {run} loads: {skipped}; {e}") from None
    logged = max((r["step"] for r in read_log(run)), default=ckpt["step"])
    lost = max(logged - ckpt["step"], 0)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank reads it; one tells
        warn(f"skipped {skipped}; resuming from {PREV} at step {ckpt['step']} costs {lost} step{'s' * (lost != 1)} "
             f"(log.jsonl reached step {logged})")
    return ckpt | {"loaded_from": PREV}


def branch_run(source: Path, run: Path, overrides: list[str] | None = None) -> None:
    """Start run folder `run` as a copy of `source` at its newest checkpoint that loads (source: a run folder,
    or a checkpoint file in one): its config, tokenizer, log up to that step and that checkpoint, with no best
    yet (the branch's own evaluations choose its model). The source run is left as it was, resumable; a
    WSD cooldown branches this way with `--set max_steps=...`."""
    src_run = source.parent if source.is_file() else source
    if not (src_run / "config.json").is_file():
        raise StoryGPTError(f"{src_run}: not a run folder (no config.json)")
    saved = json.loads((src_run / "config.json").read_text())  # bad overrides fail here, before `run` is made
    apply_overrides(RunConfig.from_dict({k: saved[k] for k in ("model", "train")}, str(src_run / "config.json")),
                    overrides or []).train.validate()
    ckpt = load_checkpoint(source) if source.is_file() else newest_checkpoint(source)
    ckpt_path = source if source.is_file() else source / ckpt.pop("loaded_from")
    if "dcp" in ckpt:
        raise StoryGPTError(f"{ckpt_path}: a sharded (FSDP) checkpoint cannot be branched; resume it in place")
    check_new_run(run)
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src_run / "config.json", run / "config.json")
    shutil.copytree(src_run / "tokenizer", run / "tokenizer", dirs_exist_ok=True)
    for name in ("log.jsonl", "log.csv"):  # RunLog drops what was logged after the checkpoint's step
        if (src_run / name).is_file():
            shutil.copy2(src_run / name, run / name)
    save_checkpoint(run / LATEST, ckpt | {"best_val_loss": math.inf, "branched_from": str(ckpt_path.resolve())})


def check_fit(cfg: RunConfig, meta: dict) -> None:
    """The model's vocabulary is the data's, and the training sequences fit the model's context."""
    if cfg.model.vocab_size != meta["vocab_size"]:
        raise StoryGPTError(f"model vocab ({cfg.model.vocab_size}) != data vocab ({meta['vocab_size']})")
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise StoryGPTError(f"train.seq_len ({cfg.train.seq_len}) > model.max_seq_len ({cfg.model.max_seq_len})")
    cfg.model.validate()
