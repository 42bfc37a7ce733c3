"""`finetune()`: a trained model (a model or run directory, or "default": the shipped model) trained further on
a prepared data directory, e.g. TinyStories-Instruct records, with the training loop of loop.py (checkpoints
and exact resume, logs, loss plot, evaluation on the data's val split).

Full fine-tuning trains every weight and exports RUN/model, a storygpt model directory. `lora=R` trains a
PEFT LoRA of rank R (adapters.py) and exports RUN/adapter: PEFT's adapter files and storygpt.json naming the
base model. Either records what the data recorded (`instruct` for instruction data) so that the result is
known as an instruction-following model.

The data must have been prepared with the base model's tokenizer (`storygpt data prepare --tokenizer MODEL`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from storygpt.data.shards import read_meta
from storygpt.errors import StoryGPTError
from storygpt.files import atomic_dir
from storygpt.model import adapters
from storygpt.model.checkpoint import BEST, checkpoint_weights
from storygpt.model.device import pick_device, pick_dtype
from storygpt.model.load import default_model_path, load_model, trained_context
from storygpt.model.model_dir import save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer

from . import loop
from .config import RunConfig, TrainConfig, apply_overrides
from .distributed import Dist
from .runstate import check_fit, check_new_run, load_run

# Fine-tuning defaults: a short run at a tenth of pretraining's learning rate (LoRA: its own, higher one, as its
# B matrices start at zero), a short warmup, no weight decay (it would pull the base weights towards zero).
FINETUNE = TrainConfig(batch_size=16, max_steps=300, lr=3e-4, min_lr=3e-5, warmup_steps=20, weight_decay=0.0,
                       eval_interval=50, eval_iters=10, checkpoint_interval=50, compile=False)
LORA_LR = {"lr": 2e-3, "min_lr": 2e-4}
KEEP_MODEL_KEYS = ("dropout", "attention")  # the only model keys a fine-tune may set: the weights fix the others


def finetune(model: str | os.PathLike | None = "default", data: str | os.PathLike | None = None,
             out: str | os.PathLike | None = None, lora: int | None = None, lora_alpha: float | None = None,
             lora_dropout: float | None = None, steps: int | None = None, lr: float | None = None,
             batch_size: int | None = None, seq_len: int | None = None, overrides: list[str] | None = None,
             resume: bool = False, compile: bool | None = None, progress: bool = True, dtype: str | None = None,
             until_step: int | None = None) -> dict:
    """Fine-tune `model` on the prepared `data` into the run directory `out`; returns the run's summary.

    lora: the LoRA rank (None: full fine-tuning); lora_alpha (default 2 x rank) and lora_dropout (default 0).
    steps, lr, batch_size, seq_len, compile, dtype and `overrides` ("key=value", as `--set`) set the training
    config over the fine-tuning defaults (FINETUNE; seq_len: the base model's trained context).
    resume: continue `out` from its latest checkpoint (its base model, LoRA settings and data are the run's).
    until_step: stop with a checkpoint after this step, as if interrupted (tests, staged runs).
    """
    if out is None:
        raise StoryGPTError("finetune: give --out RUN")
    run = Path(out)
    flags = {"max_steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len, "compile": compile,
             "dtype": dtype}
    overrides = [f"train.{k}={v}" for k, v in flags.items() if v is not None] + list(overrides or [])
    if resume:
        cfg, ft, ckpt, tokenizer, data = _resume(run, model, data, lora, lora_alpha, lora_dropout, overrides)
        base_state = None
    else:
        check_new_run(run)
        cfg, ft, tokenizer, base_state = _start(model, lora, lora_alpha, lora_dropout, overrides)
        ckpt = None
    if data is None:
        raise StoryGPTError("finetune: give --data DIR (prepared with the model's tokenizer)")
    meta = read_meta(data)
    if meta["tokenizer"]["sha256"] != tokenizer.checksum:
        where = default_model_path() if ft["base_model"] == "default" else ft["base_model"]
        raise StoryGPTError(f"{data}: prepared with another tokenizer than the model {ft['base_model']}'s (checksum "
                            f"mismatch); prepare it with `storygpt data prepare --tokenizer {where}`")
    check_fit(cfg, meta)
    if ft["lora"] and cfg.train.strategy == "fsdp":
        raise StoryGPTError("LoRA fine-tuning runs with --set strategy=ddp (its trainable weights are small)")
    device = pick_device(cfg.train.device)
    amp = pick_dtype(device, cfg.train.dtype)
    with loop.process_group(device, cfg.train.strategy) as (d, device):
        return _finetune(run, cfg, ft, data, meta, tokenizer, base_state, ckpt, device, amp, d, progress, until_step)


def _start(model, lora, lora_alpha, lora_dropout, overrides) -> tuple[RunConfig, dict, Tokenizer, dict]:
    """A new fine-tune: (its config, its `finetune` record, the base model's tokenizer and weights)."""
    given = "default" if model is None or str(model) == "default" else str(model)
    path = default_model_path() if given == "default" else Path(given)
    net, tokenizer, info = load_model(path)
    train = replace(FINETUNE, seq_len=trained_context(net.cfg, info), **(LORA_LR if lora is not None else {}))
    cfg = apply_overrides(RunConfig(replace(net.cfg), train), overrides)
    cfg.train.validate()
    changed = [k for k, v in asdict(cfg.model).items() if k not in KEEP_MODEL_KEYS and v != getattr(net.cfg, k)]
    if changed:
        raise StoryGPTError(f"model.{changed[0]} cannot change in fine-tuning (the base model's weights fix it)")
    if lora is None and (lora_alpha is not None or lora_dropout is not None):
        raise StoryGPTError("--lora-alpha and --lora-dropout need --lora R")
    ft = {"base_model": given, "base_model_path": None if given == "default" else str(path.resolve()),
          "lora": None if lora is None else adapters.lora_settings(lora, lora_alpha, lora_dropout or 0.0, net.cfg),
          "base_info": {k: info.get(k) for k in ("params", "step", "val_loss", "val_bpb_estimate")}}
    return cfg, ft, tokenizer, net.state_dict()


def _resume(run: Path, model, data, lora, lora_alpha, lora_dropout, overrides):
    """A fine-tune to continue: its config (with `overrides`), `finetune` record, checkpoint, tokenizer, data."""
    saved, cfg, ckpt, tokenizer = load_run(run, overrides)
    ft = saved.get("finetune")
    if ft is None:
        raise StoryGPTError(f"{run}: not a fine-tuning run; continue it with `storygpt train --resume {run}`")
    if model not in (None, "default") and str(model) != ft["base_model"]:
        raise StoryGPTError(f"{run}: fine-tunes {ft['base_model']}, not {model} (leave --model out on --resume)")
    asked = {"r": lora, "alpha": lora_alpha, "dropout": lora_dropout}
    if any(v is not None and v != (ft["lora"] or {}).get(k) for k, v in asked.items()):
        raise StoryGPTError(f"{run}: the LoRA settings are the run's ({ft['lora']}); leave --lora* out on --resume")
    return cfg, ft, ckpt, tokenizer, data or saved.get("data")


def _finetune(run: Path, cfg: RunConfig, ft: dict, data, meta: dict, tokenizer: Tokenizer, base_state: dict | None,
              ckpt: dict | None, device: torch.device, amp: str, d: Dist, progress: bool, until_step: int | None) -> dict:
    """The fine-tuning run, once its inputs are checked; on every rank under torchrun."""
    def build() -> torch.nn.Module:
        net = Transformer(cfg.model)
        if base_state is not None:  # a resumed run's checkpoint holds every weight
            net.load_state_dict(base_state)
        return (adapters.wrap_lora(net, ft["lora"]) if ft["lora"] else net).to(device)

    job, state = loop.start(run, cfg, data, tokenizer, build, ckpt, device, amp, d, config_extra={"finetune": ft},
                            ckpt_extra={"finetune": ft})
    trainable = adapters.trainable_params(job.model)
    params = sum(p.numel() for p in job.model.parameters()) - (trainable if ft["lora"] else 0)
    kind = f"lora r={ft['lora']['r']}" if ft["lora"] else "full"
    loop.fit(job, state, progress, until_step, desc=f"finetune {kind} {trainable / 1e6:.2f}M {device.type}/{amp}")

    def export(best: dict) -> dict:
        info = {"params": params, "trainable_params": trainable, "step": best["step"], "tokens": best["tokens"],
                "val_loss": best["best_val_loss"], "val_bpb_estimate": best["best_val_loss"] * job.bpb_scale,
                "train": asdict(cfg.train), "data": meta["splits"]["train"] | {"shards": None},
                "finetune": {"base_model": ft["base_model"], "lora": ft["lora"], "base": ft["base_info"]}}
        if isinstance(meta.get("instruct"), dict):
            info["instruct"] = meta["instruct"]
        if ft["lora"]:
            return {"adapter": str(_export_adapter(job, best, ft, tokenizer, info))}
        weights = checkpoint_weights(run / BEST, best, cfg.model)  # FSDP: read whole from the sharded folder
        return {"model": str(save_model_dir(run / "model", cfg.model, weights, tokenizer, info))}

    summary = loop.summary_of(job, state, params) | {"trainable_params": trainable, "finetune": kind}
    return loop.finish(job, state, summary, export)


def _export_adapter(job: loop.Job, best: dict, ft: dict, tokenizer: Tokenizer, info: dict) -> Path:
    """RUN/adapter: the best checkpoint's LoRA in PEFT's format, and storygpt.json (see adapters.py)."""
    job.model.load_state_dict(best["model"])  # the PEFT model: training is over
    out = job.run / "adapter"
    spec = {"format": "storygpt-lora", "version": 1, "base_model": ft["base_model"]}
    if ft["base_model_path"]:
        spec |= {"base_model_path": ft["base_model_path"],
                 "base_model_relative": os.path.relpath(ft["base_model_path"], out.resolve())}
    spec |= {"tokenizer_sha256": tokenizer.checksum, "lora": ft["lora"], **info}
    with atomic_dir(out) as work:
        adapters.write_adapter(job.model, work, spec)
    return out
