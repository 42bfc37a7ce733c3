"""The training loop that `train()` and `finetune()` share: AdamW, warmup + cosine, gradient accumulation and
clipping, autocast, periodic evaluation, atomic checkpoints and exact resume, logs, and the run's summary.

A caller builds the model (fresh weights, a base model's, a PEFT LoRA wrapper around them) and hands it to
`start()`, which wraps it for DDP/FSDP, makes the optimizer and restores a checkpoint into a `Job` (what
does not change while training) and a `LoopState` (what does, and what a checkpoint holds). `fit()` runs
the steps; `finish()` writes summary.json, the loss plot and, through the caller's `export`, the best model.
Targets of -1 carry no loss (instruction tokens of masked data): each step and each evaluation counts only
the targets that carry loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from storygpt.data.epochs import StoryEpochs
from storygpt.data.shards import TokenData, instruction_pairs
from storygpt.errors import StoryGPTError
from storygpt.model.checkpoint import BEST, LATEST, load_checkpoint
from storygpt.model.device import autocast, maybe_compile
from storygpt.progress import progress_bar
from storygpt.text.tokenizer import Tokenizer

from . import distributed
from .averaging import keep_snapshot
from .config import RunConfig
from .distill import distill_loss, load_teachers, teacher_probs
from .distributed import Dist
from .runlog import RunLog, plot_losses
from .runstate import Job, LoopState, restore, save, warn, write_run_dir
from .validation import counted, evaluate_batches, evaluate_rows, instruction_gain, rank_rows


# --------------------------------------------------------------------------------------------
# Schedule and optimizer
# --------------------------------------------------------------------------------------------
def lr_at(step: int, progress: float, cfg) -> float:
    """Linear warmup over `warmup_steps`, then, as progress goes 0 -> 1: cosine from lr to min_lr
    (`schedule = "cosine"`), or lr held constant until the last `cooldown` share of the run and then a
    (1 - sqrt) cooldown to min_lr (`schedule = "wsd"`, Hägele et al. 2024: a WSD run can be extended, and a
    cooldown can branch from any checkpoint of its constant phase)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "wsd":
        into_cooldown = max(0.0, p - (1.0 - cfg.cooldown)) / cfg.cooldown
        return warm * (cfg.min_lr + (1.0 - math.sqrt(into_cooldown)) * (cfg.lr - cfg.min_lr))
    return warm * (cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (cfg.lr - cfg.min_lr))


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on matrices (>= 2-D) only; fused kernel where
    available."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def open_data(data, tc, d: Dist) -> tuple[TokenData, TokenData, list]:
    """(train split of this rank, val split, the fixed validation batches this rank evaluates)."""
    train_data = TokenData(data, "train", d.rank, d.world_size)
    val_data = TokenData(data, "val")
    # the batches one process would use with the global batch size; batches of instructions alone carry no loss
    batches = val_data.sequential_batches(tc.batch_size * d.world_size, tc.seq_len, tc.eval_iters)
    batches = [(x, y) for x, y in batches if counted(y)]
    if not batches:
        raise StoryGPTError(f"{data}: the val split's first {tc.eval_iters} batches hold no story tokens to score")
    return train_data, val_data, (batches if d.world_size == 1 else rank_rows(batches, d))


# --------------------------------------------------------------------------------------------
# Starting and steps
# --------------------------------------------------------------------------------------------
def start(run: Path, cfg: RunConfig, data, tokenizer: Tokenizer, build: Callable[[], torch.nn.Module],
          ckpt: dict | None, device: torch.device, amp: str, d: Dist, config_extra: dict | None = None,
          ckpt_extra: dict | None = None, teachers: list[str] | None = None) -> tuple[Job, LoopState]:
    """Open the data, write the run directory (config.json with `config_extra`, tokenizer), build the model
    (`build()`: on `device`, under the run's seed), wrap it for DDP/FSDP, make its optimizer, load the
    `teachers` to distil from, and restore `ckpt` when resuming. `ckpt_extra` goes into every checkpoint.
    Every rank calls this."""
    tc = cfg.train
    if device.type == "cuda":  # TF32 for what autocast leaves in fp32
        torch.set_float32_matmul_precision("high")
    if tc.ema_decay and tc.strategy == "fsdp" and d.active:
        raise StoryGPTError("train.ema_decay needs whole weights on every rank: use strategy=ddp")
    train_data, val_data, val_batches = open_data(data, tc, d)
    epochs = StoryEpochs(train_data, tc.seq_len, tc.seed) if tc.sampling == "epochs" else None
    teacher_models = load_teachers(teachers or [], tokenizer.checksum, cfg.model.vocab_size, device)
    write_run_dir(run, cfg, data, tokenizer, d, config_extra)  # once all the input checks have passed
    torch.manual_seed(tc.seed)
    model = build()
    if d.world_size > 1:  # same initial weights everywhere, then a dropout stream per rank
        torch.manual_seed(tc.seed + d.rank)
    trained = distributed.wrap(model, tc.strategy, d, device)
    optimizer = make_optimizer(model, tc, device)
    job = Job(run, cfg, model, trained, optimizer, train_data, val_batches,
              val_data.tokens / max(val_data.bytes, 1) / math.log(2), device, amp, d, ckpt is not None,
              ckpt_extra or {}, epochs=epochs, teachers=teacher_models)
    if tc.ema_decay:  # a copy of the weights, lerped toward them after every step
        job.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=False)
    if val_data.starts is not None:
        pairs = instruction_pairs(val_data, tc.seq_len)
        job.instruction_pairs = pairs if pairs[0] else None
    state = LoopState() if ckpt is None else restore(job, ckpt)
    for group in optimizer.param_groups:  # --set may change these on resume
        group["betas"] = (tc.beta1, tc.beta2)
        if group["weight_decay"]:
            group["weight_decay"] = tc.weight_decay
    return job, state


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy; on CUDA from pinned memory, so that non_blocking really overlaps the copy with compute."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def validation_loss(job: Job, model: torch.nn.Module) -> float:
    d = job.d
    if not d.active:
        return evaluate_batches(model, job.val_batches, job.device, job.amp)  # eager: no recompile for eval
    return d.broadcast(evaluate_rows(model, job.val_batches, job.device, job.amp, d))  # one decision for all ranks


def evaluate(job: Job, state: LoopState, log: Callable[[dict], None]) -> float:
    """Validation loss (and the EMA's, when kept), logged; a new best of either is checkpointed to
    RUN/ckpt_best.pt, with the weights that made it."""
    val_loss = validation_loss(job, job.model)
    record = {"step": state.step, "tokens": state.tokens, "time": round(state.train_time, 2), "val_loss": val_loss,
              "val_bpb": val_loss * job.bpb_scale}
    ema_loss = math.inf
    if job.ema is not None:
        ema_loss = validation_loss(job, job.ema.module)
        record |= {"ema_val_loss": ema_loss, "ema_val_bpb": ema_loss * job.bpb_scale}
    if job.epochs is not None:
        record["epoch"] = round(job.epoch(state.step), 4)
    if job.instruction_pairs:  # instruction data: how much the model reads its instructions (log.jsonl)
        record["instruction_gain"] = instruction_gain(job.model, *job.instruction_pairs, job.device, job.amp)
    log(record)
    state.last_eval_step = state.step
    if min(val_loss, ema_loss) < state.best_val:
        state.best_val = min(val_loss, ema_loss)
        save(job, state, BEST, use_ema=ema_loss < val_loss)
    return val_loss


def micro_step(job: Job, fwd, x: torch.Tensor, y: torch.Tensor, n: int, may_fall_back: bool):
    """Forward and backward of one micro-batch (its loss / grad_accum_steps); returns (its mean loss over the
    `n` targets that count, or None when none does, and the forward to go on with). A micro-batch with no
    target to count (instructions alone) backpropagates zeros: every rank runs every backward."""
    tc = job.cfg.train
    try:
        with autocast(job.device, job.amp):
            logits, loss = fwd(x, y)
    except Exception as e:  # torch.compile fails on the first call if it cannot build
        if fwd is job.trained or not may_fall_back:
            raise
        warn(f"torch.compile failed ({type(e).__name__}); training without it")
        fwd = job.trained
        with autocast(job.device, job.amp):
            logits, loss = fwd(x, y)
    if not n:
        (logits.float().sum() * 0.0).backward()
        return None, fwd
    objective = loss
    if job.teachers:  # the loss logged stays the cross-entropy, comparable with runs without teachers
        with autocast(job.device, job.amp):
            probs = teacher_probs(job.teachers, x, y, tc.distill_temperature)
        objective = distill_loss(loss, logits, probs, y, tc.distill_alpha, tc.distill_temperature)
    (objective / tc.grad_accum_steps).backward()
    return loss.detach(), fwd


def optimizer_step(job: Job, state: LoopState, fwd, lr: float, may_fall_back: bool):
    """One optimizer step over grad_accum_steps micro-batches (gradients reduced across ranks on the last).
    Returns ([summed micro-batch losses, micro-batches counted] on the device, the forward to go on with)."""
    tc = job.cfg.train
    for group in job.optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(2, device=job.device)
    for micro in range(tc.grad_accum_steps):
        x, y = job.batch(state.step * tc.grad_accum_steps + micro)
        n = counted(y)
        x, y = to_device(x, job.device), to_device(y, job.device)
        with distributed.grad_sync(job.trained, micro == tc.grad_accum_steps - 1):
            loss, fwd = micro_step(job, fwd, x, y, n, may_fall_back)
        if loss is not None:
            sums[0] += loss
            sums[1] += 1
    if tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(job.model.parameters(), tc.grad_clip)
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    if job.ema is not None:
        job.ema.update_parameters(job.model)
    return sums, fwd


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
class StopFlag:
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


@dataclass
class Session:
    """This process's share of the run: its clock (train_time goes on from the checkpoint's) and the window
    of steps its throughput is measured over (evals and checkpoints left out)."""

    time_before: float
    tokens_before: int
    start: float = field(default_factory=time.perf_counter)
    window_start: float = 0.0
    window_tokens: int = 0

    def __post_init__(self):
        self.window_start = self.start

    def now(self) -> float:
        return self.time_before + time.perf_counter() - self.start


def progress_of(tc, step: int, t: float) -> float:
    """How far the schedule is, 0 -> 1: by steps, or by time when max_time is set and that is further."""
    p = step / tc.max_steps
    return max(p, t / (tc.max_time * 60)) if tc.max_time else p


def stop_reason(tc, state: LoopState, until_step: int | None, stopping: bool) -> str | None:
    if progress_of(tc, state.step, state.train_time) >= 1.0:
        return "max_time" if state.step < tc.max_steps else "max_steps"
    if until_step is not None and state.step >= until_step:
        return "until_step"
    return "interrupted" if stopping else None


def fit(job: Job, state: LoopState, progress: bool = True, until_step: int | None = None, desc: str = "train") -> None:
    """Train from `state` until max_steps, max_time, until_step or a signal; then evaluate (unless this step
    was) and checkpoint RUN/ckpt_latest.pt. `state` holds the result."""
    d = job.d
    log_file = RunLog(job.run, state.step if job.resumed else None) if d.is_main else None
    log = log_file.log if log_file is not None else (lambda record: None)
    bar = progress_bar(job.cfg.train.max_steps, state.step, desc, enabled=progress and d.is_main)
    session = Session(state.train_time, state.tokens)
    try:
        with StopFlag() as stop:
            _steps(job, state, session, stop, log, bar, until_step)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    state.tok_per_s = round((state.tokens - session.tokens_before) / max(state.train_time - session.time_before, 1e-9), 1)


def _steps(job: Job, state: LoopState, session: Session, stop: StopFlag, log, bar, until_step: int | None) -> None:
    tc, d = job.cfg.train, job.d
    fwd = maybe_compile(job.trained, job.device) if tc.compile else job.trained
    job.model.train()
    start_step = state.step
    if state.step == 0:
        evaluate(job, state, log)
    while True:
        state.train_time, stopping = d.agree(session.now(), stop.set)
        reason = stop_reason(tc, state, until_step, stopping)
        if reason is not None:
            state.stop_reason = reason
            break
        lr = lr_at(state.step, progress_of(tc, state.step, state.train_time), tc)
        sums, fwd = optimizer_step(job, state, fwd, lr, may_fall_back=state.step == start_step)
        state.step += 1
        state.tokens += job.tokens_per_step
        session.window_tokens += job.tokens_per_step
        if state.step % tc.log_interval == 0 or state.step == 1:
            _log_step(job, state, session, sums, lr, log, bar)
        bar.update(1)
        _periodic(job, state, session, log)
    state.train_time = session.now()
    if state.last_eval_step != state.step:
        evaluate(job, state, log)
    save(job, state, LATEST)
    if state.stop_reason in ("max_steps", "max_time"):
        snapshot(job, state)


def snapshot(job: Job, state: LoopState) -> None:
    """The weights of the checkpoint just written, kept for weight averaging from train.snapshot_from on."""
    tc = job.cfg.train
    if tc.snapshot_from and state.step >= tc.snapshot_from and job.d.is_main:
        keep_snapshot(job.run, state.step, LATEST, job.cfg.model)


def _log_step(job: Job, state: LoopState, session: Session, sums: torch.Tensor, lr: float, log, bar) -> None:
    """The mean training loss over ranks and micro-batches (syncs the device), tokens/s of the window."""
    tc = job.cfg.train
    loss_sum, micro_batches = job.d.all_sum(sums).tolist()
    loss = loss_sum / micro_batches if micro_batches else float("nan")
    now = time.perf_counter()
    tps = session.window_tokens / (now - session.window_start)
    record = {"step": state.step, "tokens": state.tokens, "time": round(session.now(), 2), "lr": lr, "loss": loss,
              "tok_per_s": round(tps, 1)}
    if job.epochs is not None:
        record["epoch"] = round(job.epoch(state.step), 4)
    log(record)
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
    if tc.max_time:  # a time-boxed run ends before max_steps: keep the ETA honest
        bar.total = min(tc.max_steps, round(state.step / max(progress_of(tc, state.step, session.now()), 1e-9)))


def _periodic(job: Job, state: LoopState, session: Session, log) -> None:
    """Evaluation and the latest checkpoint every eval_interval / checkpoint_interval steps; a new throughput
    window every log_interval steps (so windows leave evals and checkpoints out)."""
    tc = job.cfg.train
    if state.step % tc.eval_interval == 0 or state.step % tc.checkpoint_interval == 0:
        state.train_time = session.now()
        if state.step % tc.eval_interval == 0:
            evaluate(job, state, log)
        if state.step % tc.checkpoint_interval == 0:
            save(job, state, LATEST)
            snapshot(job, state)
    if state.step % tc.log_interval == 0:
        session.window_start, session.window_tokens = time.perf_counter(), 0


# --------------------------------------------------------------------------------------------
# The end
# --------------------------------------------------------------------------------------------
def summary_of(job: Job, state: LoopState, params: int) -> dict:
    summary = {"run": str(job.run), "stop_reason": state.stop_reason, "step": state.step, "tokens": state.tokens,
               "train_time_s": round(state.train_time, 1), "tok_per_s": state.tok_per_s,
               "best_val_loss": state.best_val, "best_val_bpb": state.best_val * job.bpb_scale, "params": params,
               "device": job.device.type, "dtype": job.amp}
    flops = getattr(job.model, "flops_per_token", None)
    if flops is not None:  # training FLOPs per second, the teachers' forwards included (MFU = this / the peak)
        per_token = flops(job.cfg.train.seq_len) + sum(t.flops_per_token(job.cfg.train.seq_len) / 3 for t in job.teachers)
        summary["model_flops_per_s"] = round(state.tok_per_s * per_token)
    if job.epochs is not None:
        summary["epochs"] = round(job.epoch(state.step), 3)
    if job.teachers:
        summary["teachers"] = len(job.teachers)
    if job.d.world_size > 1:
        summary |= {"world_size": job.d.world_size, "strategy": job.cfg.train.strategy}
    return summary


def finish(job: Job, state: LoopState, summary: dict, export: Callable[[dict], dict]) -> dict:
    """Rank 0, once the run is complete (max_steps or max_time, not stopped early): export(best checkpoint)
    (it returns summary entries, e.g. the model's path) and RUN/loss.png; then RUN/summary.json."""
    if not job.d.is_main:
        return summary
    if state.stop_reason in ("max_steps", "max_time"):
        summary |= export(load_checkpoint(job.run / BEST))
        plot_losses(job.run)
    (job.run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@contextlib.contextmanager
def process_group(device: torch.device, strategy: str):
    """(Dist, this rank's device) for the body; afterwards all ranks wait for rank 0 (which exports the model
    after the loop), so that no rank tears the process group down under one still using it (gloo could abort
    with "terminate called ..."), then the group is destroyed (also on errors)."""
    d, device = distributed.setup(device, strategy)
    try:
        yield d, device
        d.barrier()
    finally:
        distributed.teardown(d)
