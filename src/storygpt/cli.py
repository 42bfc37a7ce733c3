"""The `storygpt` command: its argument parser (commands.py holds what each subcommand does, a thin layer
over the Python functions of each module).

Every user error (StoryGPTError) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import commands
from .errors import StoryGPTError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        raise StoryGPTError(f"{self.prog}: {message}")


def suite_sampling(parser) -> None:
    """--temperature, --top-p, --max-new-tokens with the story-quality suite's defaults (the paper's sampling):
    `eval --suite` and `data sample`, which samples as the suite does."""
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="storygpt", description="Train, evaluate and talk to small story-telling language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="action", required=True,
                                                                                  parser_class=_Parser)
    t = tok.add_parser("train", help="train a SentencePiece unigram/BPE or char tokenizer")
    t.add_argument("--input", nargs="+", required=True, help="TinyStories .txt, .json/.jsonl files or folders")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--type", choices=["unigram", "bpe", "char"], default="unigram")
    t.add_argument("--field", default=None, help="JSON field holding the story (default: story, then text)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.set_defaults(func=commands.cmd_tokenizer_train)

    data = sub.add_parser("data", help="data commands").add_subparsers(dest="action", required=True,
                                                                         parser_class=_Parser)
    d = data.add_parser("prepare", help="tokenize stories into shuffled train/val token shards")
    d.add_argument("--input", nargs="+", required=True)
    d.add_argument("--tokenizer", required=True, help="tokenizer directory")
    d.add_argument("--out", required=True)
    d.add_argument("--val-fraction", type=float, default=0.02)
    d.add_argument("--field", default=None)
    d.add_argument("--seed", type=int, default=1337)
    d.add_argument("--workers", type=int, default=None, help="encoding threads (default: all cores)")
    d.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    d.add_argument("--instruct", action="store_true",
                   help="JSON records with an `instruction` field (the TinyStories JSON release) become "
                        "TinyStories-Instruct records; .txt records in that format are read as such anyway")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=commands.cmd_data_prepare)
    dr = data.add_parser("rename", help="the same stories with a share of them renamed: each character whose "
                                        "gender is known gets a new name, the same at every use")
    dr.add_argument("--input", nargs="+", required=True, help="TinyStories .txt, .json/.jsonl files or folders")
    dr.add_argument("--out", required=True, help="the stories, in TinyStories .txt format")
    dr.add_argument("--share", type=float, default=0.8, help="share of stories whose characters are renamed")
    dr.add_argument("--seed", type=int, default=0)
    dr.add_argument("--field", default=None)
    dr.set_defaults(func=commands.cmd_data_rename)
    ds = data.add_parser("sample", help="the model's own stories, kept when they pass the suite's checks (names "
                                        "kept, English words, an ending, no loop): rejection sampling, to fine-tune on")
    ds.add_argument("--model", default=None, help="model or run directory (default: the shipped model)")
    ds.add_argument("--data", required=True, help="prepared data: the beginnings are its stories, cut at --cut")
    ds.add_argument("--split", default="train", choices=["train", "val"])
    ds.add_argument("--out", required=True, help="the kept stories, in TinyStories .txt format")
    ds.add_argument("--prompts", type=int, default=2000, help="story beginnings")
    ds.add_argument("--samples", type=int, default=8, help="completions sampled per beginning")
    ds.add_argument("--keep", type=int, default=1, help="at most this many passing completions per beginning")
    ds.add_argument("--cut", type=float, default=0.2, help="share of each story's words in its beginning")
    suite_sampling(ds)
    ds.add_argument("--slots", type=int, default=64, help="rows of the KV cache decoded together")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--quiet", action="store_true")
    ds.set_defaults(func=commands.cmd_data_sample)
    di = data.add_parser("instruct", help="turn stories into TinyStories-Instruct records (words, sentence, "
                                          "features, or a request in plain language; then `data prepare`)")
    di.add_argument("--input", nargs="+", required=True, help="TinyStories .txt, .json/.jsonl files or folders")
    di.add_argument("--out", required=True, help="the records, in TinyStories .txt format")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--request-share", type=float, default=0.5,
                    help="share of records that state their requirements as a request in plain language")
    di.add_argument("--copies", type=int, default=1, help="records per story (different draws)")
    di.add_argument("--field", default=None)
    di.set_defaults(func=commands.cmd_data_instruct)
    dl = data.add_parser("download", help="download TinyStories from the Hugging Face Hub (cached, verified)")
    dl.add_argument("dataset", choices=["tinystories"])
    dl.add_argument("--version", choices=["v1", "v2", "json"], default="v1",
                    help="v1: the original .txt release; v2: GPT-4 stories only; json: the all-data archive")
    dl.add_argument("--split", choices=["train", "validation", "all"], default="all")
    dl.add_argument("--out", required=True)
    dl.add_argument("--revision", default="main", help="branch, tag or commit of the dataset repository")
    dl.add_argument("--quiet", action="store_true")
    dl.set_defaults(func=commands.cmd_data_download)

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
    tr.set_defaults(func=commands.cmd_train)

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
    ft.set_defaults(func=commands.cmd_finetune)

    e = sub.add_parser("eval", help="bits per byte on text or prepared data; --suite stories: the story-quality suite")
    e.add_argument("--model", action="append", default=None, metavar="[NAME=]DIR",
                   help="model or run directory (default: the shipped model); repeatable with --suite")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--text", nargs="+", help="text files (TinyStories .txt format or plain text); "
                     "with --suite: held-out stories for bits/byte and continuation")
    src.add_argument("--data", help="prepared data directory")
    e.add_argument("--split", default="val")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="fp32")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--stride", type=int, default=None, help="window stride (default: half the context)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--record", action="store_true", help="keep the result in the model directory's config.json")
    q = e.add_argument_group("story-quality suite (--suite stories)")
    q.add_argument("--suite", choices=["stories"], help="grade the models' stories: cloze, grammar, continuation, "
                   "and measures of completions of the paper's 44 story beginnings")
    q.add_argument("--out", help="report folder: report.json, report.md, *.png")
    q.add_argument("--train", nargs="+", help="training stories, for the novelty (memorisation) measures")
    q.add_argument("--cloze", help="cloze items, one JSON object a line (default: the package's)")
    q.add_argument("--prompts", help="YAML list of story beginnings (default: the paper's, shipped with the package)")
    q.add_argument("--samples", type=int, default=10, help="completions per story beginning")
    suite_sampling(q)
    q.add_argument("--grammar-pairs", type=int, default=100, help="minimal pairs per grammar phenomenon")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=commands.cmd_eval)

    g = sub.add_parser("generate", help="write a story from a prompt")
    g.add_argument("prompt", nargs="?", default="", help="the story's beginning (default: start from scratch)")
    g.add_argument("--model", default=None, help="model or run directory (default: the shipped model; "
                   "'instruct': the shipped instruction-tuned model)")
    ins = g.add_argument_group("instructions (instruction-tuned models: --model instruct, or one fine-tuned on "
                               "TinyStories-Instruct); the story is printed without them, the prompt is its beginning")
    ins.add_argument("--words", help="words the story must use, comma-separated: dog,ball,happy")
    ins.add_argument("--sentence", help="a sentence the story must contain")
    ins.add_argument("--features", help="comma-separated, of: Dialogue, BadEnding, MoralValue, Twist, Foreshadowing, "
                     "Conflict (case, spaces and '-' do not matter)")
    ins.add_argument("--summary", help="what the story is about, in a sentence or two")
    ins.add_argument("--character", help="the story's main character, its kind and name: \"a cat named Pip\"")
    ins.add_argument("--request", help="instead of the above, a request in plain words: \"Write a story about ...\"")
    ins.add_argument("--no-guide", action="store_true", help="leave the model to itself: no guided decoding toward "
                     "the words and the sentence asked for (see the README, \"Instruction following\")")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="same seed, same story")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--stop", action="append", default=[], help="end the story at this string (repeatable)")
    g.add_argument("--no-stream", action="store_true")
    g.add_argument("--json", action="store_true")
    g.add_argument("--verbose", action="store_true", help="print speed on stderr")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="weights' precision (auto: bf16 where the hardware has it, else fp32; int8: weight-only "
                        "int8 on CPU, 1/4 of the weights' memory, slower than fp32 on AVX2 CPUs)")
    g.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd step: faster per token after a one-off compile (seconds)")
    g.set_defaults(func=commands.cmd_generate)

    a = sub.add_parser("app", help="the web app: type a prompt, watch a story being written")
    a.add_argument("--model", action="append", default=None, help="model or run directory (repeatable; "
                   "default: the shipped models: default, and instruct when installed)")
    a.add_argument("--models-dir", help="offer every model or run folder inside this directory")
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    a.add_argument("--port", type=int, default=8501)
    a.add_argument("--compile", action="store_true",
                   help="decode with torch.compile'd steps: ~2x the words/s after a compile when a model loads")
    a.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="weights' precision, as for generate (int8: CPU only)")
    a.set_defaults(func=commands.cmd_app)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API: completions and chat, streamed or not")
    s.add_argument("--model", action="append", default=None, metavar="[NAME=]DIR",
                   help="model or run directory, repeatable; named after its folder (default: the shipped model, "
                        "storygpt-default, and storygpt-instruct when installed; 'default', 'instruct' name them)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="0 = any free port")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $STORYGPT_API_KEY)")
    s.add_argument("--max-concurrency", type=int, default=None,
                   help="stories each model decodes at once, batched: its engine's slots (default 64, fewer for "
                        "models whose KV cache would pass 1 GiB)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for slots; more get 503")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="weights (int8: weight-only int8 matrices on CPU, a quarter of fp32's memory)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--compile", action="store_true",
                   help="decode with torch.compile'd steps, compiled at start for every batch size (1, 2, 4, ... up "
                        "to --max-concurrency)")
    s.set_defaults(func=commands.cmd_serve)

    x = sub.add_parser("export", help="write a model for storygpt (e.g. fp16), transformers (hf), llama2.c's run.c "
                                      "or llama.cpp (gguf)")
    x.description = ("hf of a LoRA adapter folder (storygpt finetune --lora: RUN/adapter or RUN): OUT is the base model "
                     "for transformers and OUT/adapter the LoRA for PEFT under transformers' module names (q_proj, ..., "
                     "down_proj): PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(OUT), OUT/adapter). "
                     "The other formats write the adapter merged into its base model.")
    x.add_argument("--model", required=True, help="run, model or adapter directory")
    x.add_argument("--out", required=True)
    x.add_argument("--format", default="storygpt", choices=["storygpt", "hf", "llama2c", "gguf"])
    x.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16", "f32", "f16", "q8_0"],
                   help="weights: fp32|fp16|bf16 (llama2c: always fp32); gguf: f32|f16|q8_0 (fp32/fp16 accepted)")
    x.set_defaults(func=commands.cmd_export)

    av = sub.add_parser("average", help="the mean of a run's kept weights (train.snapshot_from) as a model directory")
    av.add_argument("run", help="run directory trained with --set train.snapshot_from=STEP")
    av.add_argument("--from-step", type=int, default=0, help="average the snapshots of this step and later")
    av.add_argument("--out", help="model directory (default RUN/model_avg)")
    av.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    av.set_defaults(func=commands.cmd_average)

    im = sub.add_parser("import", help="make a storygpt model of a llama2.c model.bin or a transformers llama folder")
    im.add_argument("source", help="llama2c: the model.bin (version 0); hf: the LlamaForCausalLM folder")
    im.add_argument("--format", required=True, choices=["llama2c", "hf"])
    im.add_argument("--tokenizer", help="the SentencePiece .model (llama2c: required; hf: default SOURCE/tokenizer.model)")
    im.add_argument("--out", required=True, help="the model directory to write")
    im.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    im.set_defaults(func=commands.cmd_import)

    pr = sub.add_parser("presets", help="list the model presets and their parameter counts")
    pr.set_defaults(func=commands.cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except StoryGPTError as e:
        print(f"storygpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("storygpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`storygpt generate | head -1`): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush of stdout fails no more
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
