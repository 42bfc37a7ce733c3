"""The training commands: `storygpt train`, `storygpt finetune`, `storygpt average`, `storygpt presets`.

Each command's parser next to what it does; the handlers import what they use when they run, so that
`storygpt --help` stays fast."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from storygpt.errors import StoryGPTError


def add_commands(sub) -> None:
    tr = sub.add_parser("train", help="train a model (or resume a run)")
    tr.add_argument("--data", help="prepared data directory (default on --resume: the run's)")
    tr.add_argument("--out", help="run directory")
    tr.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint; with another --out, "
                    "branch: OUT starts from RUN's latest checkpoint (or a checkpoint file given as RUN), RUN is left "
                    "as it was (e.g. a WSD cooldown: --set max_steps=N)")
    tr.add_argument("--teacher", action="append", default=None, metavar="DIR",
                    help="distil from this model (repeatable; same tokenizer): train.distill_alpha and "
                         "train.distill_temperature set the loss")
    tr.add_argument("--preset", default="small", help="tiny | small | 15m | 33m | 110m")
    tr.add_argument("--config", help="TOML file with [model] and [train] tables")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    tr.add_argument("--max-steps", type=int)
    tr.add_argument("--max-time", type=float, help="minutes of training")
    tr.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: the preset's choice; small compiles)")
    tr.add_argument("--fp32", action="store_true", help="no autocast: compute in fp32")
    tr.add_argument("--strategy", choices=["ddp", "fsdp"], default=None,
                    help="under torchrun: DDP (replicated weights) or FSDP2 (sharded weights and optimizer state); "
                         "default: the config's (ddp)")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="train a trained model further (all weights, or a LoRA adapter)",
                        description="Fine-tune a model on data prepared with its tokenizer (`storygpt data prepare "
                                    "--tokenizer MODEL`). Full fine-tuning writes RUN/model (a model directory); "
                                    "--lora R writes RUN/adapter (PEFT's adapter files + storygpt.json naming the "
                                    "base model), which --model takes like a model directory.")
    ft.add_argument("--model", default=None, help="model or run directory to start from (default: the shipped model)")
    ft.add_argument("--data", help="prepared data directory (default on --resume: the run's)")
    ft.add_argument("--out", required=True, help="run directory")
    ft.add_argument("--lora", type=int, default=None, metavar="R", help="train a LoRA adapter of rank R instead of "
                    "all weights (attention q/k/v/o and MLP projections; default lr 2e-3 instead of 3e-4)")
    ft.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="LoRA scale alpha (default: 2 R)")
    ft.add_argument("--lora-dropout", type=float, default=None, metavar="P", help="dropout on LoRA's input (default 0)")
    ft.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    ft.add_argument("--lr", type=float, help="peak learning rate (default 3e-4; with --lora 2e-3)")
    ft.add_argument("--batch-size", type=int, help="sequences per step (default 16)")
    ft.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's trained context)")
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train key (e.g. eval_interval=25) or model.dropout")
    ft.add_argument("--resume", action="store_true", help="continue --out from its latest checkpoint")
    ft.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    ft.add_argument("--fp32", action="store_true", help="no autocast: compute in fp32")
    ft.add_argument("--quiet", action="store_true")
    ft.set_defaults(func=cmd_finetune)

    av = sub.add_parser("average", help="the mean of a run's kept weights (train.snapshot_from) as a model directory")
    av.add_argument("run", help="run directory trained with --set train.snapshot_from=STEP")
    av.add_argument("--from-step", type=int, default=0, help="average the snapshots of this step and later")
    av.add_argument("--out", help="model directory (default RUN/model_avg)")
    av.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    av.set_defaults(func=cmd_average)

    pr = sub.add_parser("presets", help="list the model presets and their parameter counts")
    pr.set_defaults(func=cmd_presets)


def cmd_train(args) -> None:
    from storygpt.train.pretrain import train

    if args.resume is None and args.out is None:
        raise StoryGPTError("train: give --out RUN (or --resume RUN)")
    branch = args.resume is not None and args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve()
    overrides = args.set + ([f"train.strategy={args.strategy}"] if args.strategy else [])
    summary = train(args.data, args.out or args.resume, preset=args.preset, config_file=args.config,
                    overrides=overrides, resume=args.resume is not None and not branch, max_steps=args.max_steps,
                    max_time=args.max_time, compile=args.compile,
                    dtype="fp32" if args.fp32 else None, progress=not args.quiet, teachers=args.teacher,
                    branch_from=args.resume if branch else None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns; one prints
        print(json.dumps(summary, indent=2))


def cmd_finetune(args) -> None:
    from storygpt.train.finetune import finetune

    summary = finetune(args.model, args.data, args.out, lora=args.lora, lora_alpha=args.lora_alpha,
                       lora_dropout=args.lora_dropout, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                       seq_len=args.seq_len, overrides=args.set, resume=args.resume, compile=args.compile,
                       dtype="fp32" if args.fp32 else None, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns; one prints
        print(json.dumps(summary, indent=2))


def cmd_average(args) -> None:
    from storygpt.model.device import DTYPES
    from storygpt.train.averaging import average_snapshots

    out = average_snapshots(args.run, args.out, args.from_step, DTYPES[args.dtype])
    steps = json.loads((out / "config.json").read_text())["storygpt"]["averaged_steps"]
    print(f"-> {out} (mean of {len(steps)} snapshots, steps {steps[0]}-{steps[-1]}, {args.dtype})")


def cmd_presets(args) -> None:
    from storygpt.model.config import PRESETS
    from storygpt.model.transformer import Transformer

    print(f"{'preset':8} {'params':>10} {'dim':>5} {'layers':>6} {'heads':>5} {'vocab':>6} {'context':>7}")
    for name, cfg in PRESETS.items():
        n = Transformer(cfg).num_params()
        print(f"{name:8} {n / 1e6:9.2f}M {cfg.dim:5} {cfg.n_layers:6} {cfg.n_heads:5} {cfg.vocab_size:6} {cfg.max_seq_len:7}")
