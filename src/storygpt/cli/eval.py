"""The `storygpt eval`: bits per byte, or with `--suite stories` the story-quality suite.

Each command's parser next to what it does; the handlers import what they use when they run, so that
`storygpt --help` stays fast."""

from __future__ import annotations

import json

from storygpt.errors import StoryGPTError

from .options import suite_sampling


def add_commands(sub) -> None:
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
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> None:
    if args.suite:
        return cmd_eval_suite(args)
    if len(args.model or []) > 1:
        raise StoryGPTError("eval: one --model at a time (several with --suite stories)")
    if not args.text and not args.data:
        raise StoryGPTError("eval: give --text FILE... or --data DIR (or --suite stories)")
    args.model = args.model[0] if args.model else None
    from storygpt.eval.bpb import evaluate

    result = evaluate(args.model, text=args.text, data=args.data, split=args.split, device=args.device,
                      dtype=args.dtype, batch_size=args.batch_size, stride=args.stride)
    if args.record:
        from pathlib import Path

        from storygpt.model.load import shipped_or
        from storygpt.model.model_dir import record_eval

        name = "+".join(Path(f).name for f in args.text) if args.text else f"{Path(args.data).name}:{args.split}"
        record_eval(shipped_or(args.model), name, result)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.2f} | "
              f"{result['bits_per_byte']:.4f} bits/byte | {result['tokens']:,} tokens, {result['bytes']:,} bytes")


def cmd_eval_suite(args) -> None:
    from storygpt.eval.report import check_out, write_report
    from storygpt.eval.suite import SuiteConfig, run_suite

    if args.data:
        raise StoryGPTError("eval --suite: held-out text is given with --text, not --data")
    if not args.out:
        raise StoryGPTError("eval --suite: give --out DIR for the report")
    check_out(args.out)
    cfg = SuiteConfig(text=args.text or [], train=args.train or [], cloze=args.cloze, prompts=args.prompts,
                      samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, dtype=args.dtype, device=args.device,
                      grammar_per_phenomenon=args.grammar_pairs)
    report = run_suite(args.model or ["default"], cfg, progress=not args.quiet)
    out = write_report(report, args.out)
    if args.record:
        from storygpt.model.model_dir import record_suite

        for result in report["models"].values():
            record_suite(result["path"], result, report["suite"])
    if args.json:
        print((out / "report.json").read_text(), end="")
    else:
        print((out / "report.md").read_text().split("\n## ")[0].rstrip())
        print(f"-> {out}/report.json, report.md, *.png")
