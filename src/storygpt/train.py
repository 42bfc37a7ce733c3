"""The training loop: AdamW, warmup + cosine, gradient accumulation and clipping, autocast,
periodic evaluation, atomic checkpoints and exact resume, logs and a loss curve.

`train()` is the whole thing; `storygpt train` is a thin wrapper around it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (BEST, LATEST, checkpoint_weights, load_checkpoint, load_sharded, save_checkpoint,
                         save_model_dir)
from .config import RunConfig, apply_overrides, build_config
from .data import TokenData, read_meta
from .device import autocast, maybe_compile, pick_device, pick_dtype
from .distributed import Dist
from .errors import StoryGPTError
from .model import Transformer
from .tokenizer import Tokenizer

LOG_FIELDS = ["step", "tokens", "time", "lr", "loss", "val_loss", "val_bpb", "tok_per_s"]


def lr_at(step: int, progress: float, cfg) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to min_lr as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    p = min(max(progress, 0.0), 1.0)
    return warm * (cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (cfg.lr - cfg.min_lr))


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D) only; fused kernel where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def warn(msg: str) -> None:
    print(f"storygpt: warning: {msg}", file=sys.stderr)


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


@torch.inference_mode()
def evaluate_batches(model: torch.nn.Module, batches, device: torch.device, dtype: str) -> float:
    """Mean loss over fixed batches (model put back in train mode afterwards)."""
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train()
    return float(np.mean(losses))


@torch.no_grad()  # not inference_mode: FSDP2 would keep inference tensors as its unsharded weights
def evaluate_rows(model: torch.nn.Module, batches, device: torch.device, dtype: str, d: Dist) -> float:
    """Mean loss over fixed batches whose rows are spread over the ranks (see rank_rows).

    Each batch's loss is the row-weighted mean of the ranks' losses, so the result is what one process
    computes on the whole batches. Every rank runs the same number of forwards (FSDP's are collective).
    """
    model.eval()
    sums = torch.zeros(len(batches), 2, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        sums[i, 0], sums[i, 1] = loss.item() * len(x), len(x)
    model.train()
    sums = d.all_sum(sums.to(d.device)).cpu()
    return float((sums[:, 0] / sums[:, 1]).mean())


def rank_rows(batches: list[tuple[torch.Tensor, torch.Tensor]], d: Dist) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows (every world_size-th) of each batch; a batch with fewer rows than ranks is dropped."""
    mine = [(x[d.rank::d.world_size].clone(), y[d.rank::d.world_size].clone())
            for x, y in batches if len(x) >= d.world_size]
    if not mine:
        raise StoryGPTError(f"the val split is too small to give each of {d.world_size} ranks a sequence")
    return mine


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy; on CUDA from pinned memory, so that non_blocking really overlaps the copy with compute."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def restore_weights(ckpt: dict, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    fsdp: bool) -> None:
    """Load a checkpoint's weights and optimizer state: a plain one (one process or DDP) or a sharded one
    (FSDP; loads on any number of ranks, FSDP or not)."""
    if "dcp" in ckpt:  # a checkpoint from before the first step has no optimizer state
        load_sharded(path.parent / ckpt["dcp"], model, optimizer if ckpt["dcp_optimizer"] else None,
                     collective=fsdp)
    elif fsdp:
        raise StoryGPTError(f"{path}: this run was trained with ddp or in one process; resume it with --strategy ddp")
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])


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


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary, checkpoint, and exit."""

    def __init__(self):
        self.set = False
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.set:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


class _Logger:
    """Appends to log.jsonl and log.csv (and TensorBoard when installed)."""

    def __init__(self, run: Path, resume_step: int | None):
        self.jsonl, self.csv = run / "log.jsonl", run / "log.csv"
        if resume_step is None:
            for p in (self.jsonl, self.csv):
                p.unlink(missing_ok=True)
        else:  # drop what was logged after the checkpoint we resume from
            self._truncate(resume_step)
        new_csv = not self.csv.exists()
        self.csv_fh = open(self.csv, "a", newline="")
        self.csv_writer = csv.DictWriter(self.csv_fh, LOG_FIELDS)
        if new_csv:
            self.csv_writer.writeheader()
        self.jsonl_fh = open(self.jsonl, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            self.tb = None

    def _truncate(self, step: int) -> None:
        if self.jsonl.exists():
            keep = [line for line in self.jsonl.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.jsonl.write_text("".join(line + "\n" for line in keep))
        if self.csv.exists():
            with open(self.csv, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
            with open(self.csv, "w", newline="") as fh:
                w = csv.DictWriter(fh, LOG_FIELDS)
                w.writeheader()
                w.writerows(rows)

    def log(self, record: dict) -> None:
        self.jsonl_fh.write(json.dumps(record) + "\n")
        self.jsonl_fh.flush()
        self.csv_writer.writerow({k: record.get(k, "") for k in LOG_FIELDS})
        self.csv_fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.jsonl_fh.close()
        self.csv_fh.close()
        if self.tb is not None:
            self.tb.close()


def read_log(run: str | os.PathLike) -> list[dict]:
    path = Path(run) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_losses(run: str | os.PathLike) -> Path | None:
    """Write RUN/loss.png: training and validation loss against tokens seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="val", marker="o", ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def train(data: str | os.PathLike | None, out: str | os.PathLike, preset: str = "small",
          config_file: str | None = None, overrides: list[str] | None = None, resume: bool = False,
          max_steps: int | None = None, max_time: float | None = None, compile: bool | None = None,
          dtype: str | None = None, progress: bool = True, until_step: int | None = None) -> dict:
    """Train a model on a prepared data directory and export the best checkpoint to OUT/model.

    resume: continue OUT from its latest checkpoint (config from OUT/config.json, then overrides).
    until_step: stop (with a checkpoint) after this step, as if interrupted; for tests and staged runs.
    Returns a summary dict (steps, tokens, best val loss, tokens/s, paths).

    Under torchrun every process calls this: the ranks train data-parallel (`train.strategy` ddp or
    fsdp, see distributed.py), rank 0 alone writes the run directory, and every rank returns the summary.
    """
    run = Path(out)
    overrides = list(overrides or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if max_time is not None:
        overrides.append(f"train.max_time={max_time}")
    if compile is not None:
        overrides.append(f"train.compile={compile}")
    if dtype is not None:
        overrides.append(f"train.dtype={dtype}")

    ckpt = None
    if resume:
        if not (run / "config.json").is_file():
            raise StoryGPTError(f"{run}: nothing to resume (no config.json)")
        saved = json.loads((run / "config.json").read_text())
        cfg = apply_overrides(RunConfig.from_dict({k: saved[k] for k in ("model", "train")}, str(run / "config.json")), overrides)
        cfg.train.validate()
        data = data or saved.get("data")
        ckpt = load_checkpoint(run / LATEST)
        tokenizer = Tokenizer.load(run / "tokenizer")
    else:
        if (run / LATEST).exists() or (run / BEST).exists():
            raise StoryGPTError(f"{run}: already holds a training run; use --resume to continue it or a new --out")
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
    if cfg.model.vocab_size != meta["vocab_size"]:
        raise StoryGPTError(f"model vocab ({cfg.model.vocab_size}) != data vocab ({meta['vocab_size']})")
    tc, mc = cfg.train, cfg.model
    if tc.seq_len > mc.max_seq_len:
        raise StoryGPTError(f"train.seq_len ({tc.seq_len}) > model.max_seq_len ({mc.max_seq_len})")
    mc.validate()

    device = pick_device(tc.device)
    amp = pick_dtype(device, tc.dtype)
    d, device = distributed.setup(device, tc.strategy)
    try:
        summary = _train(run, cfg, data, meta, tokenizer, ckpt, device, amp, d, progress, until_step)
        # rank 0 exports the model after the loop: the others wait for it, so that no rank tears the
        # process group down under one still using it (gloo could abort with "terminate called ...")
        d.barrier()
        return summary
    finally:
        distributed.teardown(d)


def _train(run: Path, cfg: RunConfig, data, meta: dict, tokenizer: Tokenizer, ckpt: dict | None,
           device: torch.device, amp: str, d: Dist, progress: bool, until_step: int | None) -> dict:
    """The training loop of `train()`, once its inputs are checked; on every rank under torchrun."""
    tc, mc = cfg.train, cfg.model
    fsdp = tc.strategy == "fsdp" and d.active
    if device.type == "cuda":  # TF32 for what autocast leaves in fp32
        torch.set_float32_matmul_precision("high")
    train_data = TokenData(data, "train", d.rank, d.world_size)
    val_data = TokenData(data, "val")
    if d.world_size == 1:
        val_batches = val_data.sequential_batches(tc.batch_size, tc.seq_len, tc.eval_iters)
    else:  # the batches one process would use with the global batch size, each rank holding its rows
        val_batches = rank_rows(val_data.sequential_batches(tc.batch_size * d.world_size, tc.seq_len, tc.eval_iters), d)

    # --- run directory (written only once all the input checks above have passed) ---
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        tokenizer.save(run / "tokenizer")
        saved = {**cfg.to_dict(), "data": str(Path(data).resolve())}
        (run / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    d.barrier()

    torch.manual_seed(tc.seed)
    model = Transformer(mc).to(device)
    n_params = model.num_params()
    if d.world_size > 1:  # same initial weights everywhere, then a dropout stream per rank
        torch.manual_seed(tc.seed + d.rank)
    trained = distributed.wrap(model, tc.strategy, d, device)  # what forward/backward run on
    optimizer = make_optimizer(model, tc, device)
    step, train_time, tokens_seen, best_val = 0, 0.0, 0, float("inf")
    if ckpt is not None:
        if ckpt["config"]["model"] != asdict(mc):
            raise StoryGPTError("model config keys cannot change on --resume (only train keys can)")
        restore_weights(ckpt, run / LATEST, model, optimizer, fsdp)
        step, train_time, tokens_seen = ckpt["step"], ckpt["train_time"], ckpt["tokens"]
        best_val = ckpt["best_val_loss"]
        restore_rng(ckpt, d, tc.seed)
        saved = ckpt["config"]["train"]
        before = saved["batch_size"] * saved["grad_accum_steps"] * ckpt.get("world_size", 1)
        now = tc.batch_size * tc.grad_accum_steps * d.world_size
        if d.is_main and before != now:
            warn(f"the global batch changes from {before} to {now} sequences (batch_size x grad_accum_steps x "
                 "ranks); --set batch_size=... keeps it")
    for group in optimizer.param_groups:  # --set may change these on resume
        group["betas"] = (tc.beta1, tc.beta2)
        if group["weight_decay"]:
            group["weight_decay"] = tc.weight_decay
    fwd = maybe_compile(trained, device) if tc.compile else trained
    model.train()

    logger = _Logger(run, step if ckpt is not None else None) if d.is_main else None
    log = logger.log if logger is not None else (lambda record: None)
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum_steps * d.world_size
    bpb_scale = val_data.tokens / max(val_data.bytes, 1) / math.log(2)
    tokens_at_start, start_step = tokens_seen, step

    def progress_of(step: int, t: float) -> float:
        p = step / tc.max_steps
        return max(p, t / (tc.max_time * 60)) if tc.max_time else p

    def checkpoint(path: str) -> None:
        rng = rng_state()
        state = {"scheduler": {"step": step, "train_time": train_time},  # lr = lr_at(step, progress)
                 "step": step, "train_time": train_time, "tokens": tokens_seen, "best_val_loss": best_val,
                 "rng": rng, "data_position": {"micro_step": step * tc.grad_accum_steps, "seed": tc.seed},
                 "config": cfg.to_dict()}
        rng_ranks = d.gather(rng)  # each rank's dropout stream, for an exact resume on as many ranks
        if rng_ranks is not None:
            state |= {"rng_ranks": rng_ranks, "world_size": d.world_size}
        if fsdp:
            distributed.save_sharded_checkpoint(run / path, model, optimizer, state, d)
        elif d.is_main:
            save_checkpoint(run / path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})

    def run_eval() -> float:
        nonlocal best_val
        if not d.active:
            val_loss = evaluate_batches(model, val_batches, device, amp)  # eager: no recompile for eval mode
        else:
            val_loss = d.broadcast(evaluate_rows(model, val_batches, device, amp, d))  # one decision on BEST
        log({"step": step, "tokens": tokens_seen, "time": round(train_time, 2), "val_loss": val_loss,
             "val_bpb": val_loss * bpb_scale})
        if val_loss < best_val:
            best_val = val_loss
            checkpoint(BEST)
        return val_loss

    bar = tqdm(total=tc.max_steps, initial=step, disable=not progress or not d.is_main, unit="step",
               dynamic_ncols=True, desc=f"train {n_params / 1e6:.1f}M {device.type}/{amp}")
    stop_reason = "max_steps"
    last_eval_step = -1
    time_before = train_time  # train_time counts wall-clock seconds of this run, evals included
    loop_start = time.perf_counter()
    window_start, window_tokens = loop_start, 0
    try:
        with _StopFlag() as stop:
            if step == 0:
                run_eval()
                last_eval_step = 0
            while True:
                train_time, stopping = d.agree(time_before + time.perf_counter() - loop_start, stop.set)
                if progress_of(step, train_time) >= 1.0:
                    stop_reason = "max_time" if step < tc.max_steps else "max_steps"
                    break
                if until_step is not None and step >= until_step:
                    stop_reason = "until_step"
                    break
                if stopping:
                    stop_reason = "interrupted"
                    break
                lr = lr_at(step, progress_of(step, train_time), tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for micro in range(tc.grad_accum_steps):
                    x, y = train_data.batch(step * tc.grad_accum_steps + micro, tc.batch_size, tc.seq_len, tc.seed)
                    x, y = to_device(x, device), to_device(y, device)
                    with distributed.grad_sync(trained, micro == tc.grad_accum_steps - 1):
                        try:
                            with autocast(device, amp):
                                _, loss = fwd(x, y)
                        except Exception as e:  # torch.compile fails on the first call if it cannot build
                            if fwd is trained or step > start_step:
                                raise
                            warn(f"torch.compile failed ({type(e).__name__}); training without it")
                            fwd = trained
                            with autocast(device, amp):
                                _, loss = trained(x, y)
                        (loss / tc.grad_accum_steps).backward()
                    loss_sum += loss.detach()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                if step % tc.log_interval == 0 or step == 1:
                    # the mean over ranks; syncs the device
                    loss_val = d.all_sum(loss_sum).item() / (tc.grad_accum_steps * d.world_size)
                    now = time.perf_counter()
                    tps = window_tokens / (now - window_start)
                    log({"step": step, "tokens": tokens_seen, "time": round(time_before + now - loop_start, 2),
                         "lr": lr, "loss": loss_val, "tok_per_s": round(tps, 1)})
                    bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                    if tc.max_time:  # a time-boxed run ends before max_steps: keep the ETA honest
                        bar.total = min(tc.max_steps, round(step / max(progress_of(step, time_before + now - loop_start), 1e-9)))
                bar.update(1)
                if step % tc.eval_interval == 0 or step % tc.checkpoint_interval == 0:
                    train_time = time_before + time.perf_counter() - loop_start
                    if step % tc.eval_interval == 0:
                        run_eval()
                        last_eval_step = step
                    if step % tc.checkpoint_interval == 0:
                        checkpoint(LATEST)
                if step % tc.log_interval == 0:  # throughput windows exclude evals and checkpoints
                    window_start, window_tokens = time.perf_counter(), 0
            train_time = time_before + time.perf_counter() - loop_start
            if last_eval_step != step:
                run_eval()
            checkpoint(LATEST)
    finally:
        bar.close()
        if logger is not None:
            logger.close()

    summary = {"run": str(run), "stop_reason": stop_reason, "step": step, "tokens": tokens_seen,
               "train_time_s": round(train_time, 1),
               "tok_per_s": round((tokens_seen - tokens_at_start) / max(train_time - time_before, 1e-9), 1),
               "best_val_loss": best_val, "best_val_bpb": best_val * bpb_scale, "params": n_params,
               "device": device.type, "dtype": amp}
    if d.world_size > 1:
        summary |= {"world_size": d.world_size, "strategy": tc.strategy}
    if not d.is_main:
        return summary
    if stop_reason in ("max_steps", "max_time"):
        best = load_checkpoint(run / BEST)
        info = {"params": n_params, "step": best["step"], "tokens": best["tokens"],
                "val_loss": best["best_val_loss"], "val_bpb_estimate": best["best_val_loss"] * bpb_scale,
                "train": asdict(tc), "data": meta["splits"]["train"] | {"shards": None}}
        weights = checkpoint_weights(run / BEST, best, mc)  # FSDP: read whole from the sharded folder
        summary["model"] = str(save_model_dir(run / "model", mc, weights, tokenizer, info))
        plot_losses(run)
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
