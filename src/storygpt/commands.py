"""What each `storygpt` subcommand does with its parsed arguments (cli.py builds the parser): each calls the
Python functions of the module it is about; user errors are StoryGPTError, which cli.main prints as one line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import StoryGPTError


def cmd_tokenizer_train(args) -> None:
    from .data import check_inputs, expand_inputs, iter_stories
    from .tokenizer import train_tokenizer

    files = expand_inputs(args.input)
    check_inputs(files, args.field)
    tok = train_tokenizer(iter_stories(files, args.field), args.vocab_size, args.type, seed=args.seed)
    tok.save(args.out)
    print(f"tokenizer: {tok.type}, {tok.vocab_size} tokens -> {args.out}")


def cmd_data_prepare(args) -> None:
    from .data import prepare

    meta = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   field=args.field, workers=args.workers, dtype=args.dtype, progress=not args.quiet,
                   instruct=args.instruct)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['stories']:,} stories, {info['tokens']:,} tokens, {info['bytes']:,} bytes, "
              f"{len(info['shards'])} shard(s)")
    if meta.get("mask"):
        print("instruction records: the loss leaves out their instructions (masked)")
    print(f"-> {args.out}")


def cmd_data_instruct(args) -> None:
    from .instruct_data import build

    counts = build(args.input, args.out, seed=args.seed, request_share=args.request_share, copies=args.copies,
                   field=args.field)
    print(f"{counts['records']:,} instruction records from {counts['stories']:,} stories "
          f"({counts['skipped']:,} gave none) -> {args.out}")


def cmd_data_rename(args) -> None:
    from .rename import build

    counts = build(args.input, args.out, share=args.share, seed=args.seed, field=args.field)
    print(f"{counts['renamed']:,} of {counts['stories']:,} stories renamed -> {args.out}")


def cmd_data_sample(args) -> None:
    from .generate import load
    from .selfsample import build

    counts = build(load(args.model, dtype="fp32"), args.data, args.out, prompts=args.prompts, samples=args.samples,
                   keep=args.keep, cut=args.cut, split=args.split, seed=args.seed, slots=args.slots,
                   progress=not args.quiet, temperature=args.temperature, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens)
    failed = ", ".join(f"{n:,} {check}" for check, n in counts["failed"].items())
    print(f"{counts['passed']:,} of {counts['completions']:,} completions passed (failed first: {failed}); "
          f"{counts['kept']:,} stories from {counts['prompts']:,} beginnings -> {args.out}")


def cmd_data_download(args) -> None:
    from .download import describe, download_tinystories

    placed = download_tinystories(args.out, version=args.version, split=args.split, revision=args.revision,
                                  progress=not args.quiet)
    print(describe(placed, args.out))


def cmd_train(args) -> None:
    from .train import train

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
    from .finetune import finetune

    summary = finetune(args.model, args.data, args.out, lora=args.lora, lora_alpha=args.lora_alpha,
                       lora_dropout=args.lora_dropout, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                       seq_len=args.seq_len, overrides=args.set, resume=args.resume, compile=args.compile,
                       dtype="fp32" if args.fp32 else None, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns; one prints
        print(json.dumps(summary, indent=2))


def cmd_eval(args) -> None:
    if args.suite:
        return cmd_eval_suite(args)
    if len(args.model or []) > 1:
        raise StoryGPTError("eval: one --model at a time (several with --suite stories)")
    if not args.text and not args.data:
        raise StoryGPTError("eval: give --text FILE... or --data DIR (or --suite stories)")
    args.model = args.model[0] if args.model else None
    from .evaluate import evaluate

    result = evaluate(args.model, text=args.text, data=args.data, split=args.split, device=args.device,
                      dtype=args.dtype, batch_size=args.batch_size, stride=args.stride)
    if args.record:
        from pathlib import Path

        from .checkpoint import record_eval, shipped_or

        name = "+".join(Path(f).name for f in args.text) if args.text else f"{Path(args.data).name}:{args.split}"
        record_eval(shipped_or(args.model), name, result)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.2f} | "
              f"{result['bits_per_byte']:.4f} bits/byte | {result['tokens']:,} tokens, {result['bytes']:,} bytes")


def cmd_eval_suite(args) -> None:
    from .suite import SuiteConfig, run_suite
    from .suite_report import check_out, write_report

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
        from .checkpoint import record_suite

        for result in report["models"].values():
            record_suite(result["path"], result, report["suite"])
    if args.json:
        print((out / "report.json").read_text(), end="")
    else:
        print((out / "report.md").read_text().split("\n## ")[0].rstrip())
        print(f"-> {out}/report.json, report.md, *.png")


def cmd_generate(args) -> None:
    from .generate import instruction_header, load

    prompt = args.prompt or ""
    try:
        for text in (prompt, args.sentence, args.summary, args.request, args.character):
            (text or "").encode("utf-8")
    except UnicodeEncodeError:
        raise StoryGPTError("prompt is not valid UTF-8 text") from None
    if args.num_samples < 1:
        raise StoryGPTError(f"--num-samples must be >= 1, got {args.num_samples}")
    instruction = dict(words=args.words, sentence=args.sentence, features=args.features, summary=args.summary,
                       character=args.character, request=args.request)
    instruction_header(**instruction)  # bad requirements fail before the model loads
    model = load(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    model_prompt = model.instruct_prompt(prompt, **instruction)  # a plain model refuses requirements
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                   guide=not args.no_guide, **instruction)
    if args.json or args.num_samples > 1 or args.no_stream:
        stories = model.generate(prompt, num_samples=args.num_samples, **options)
        if args.json:
            extra = {"instruction": model_prompt} if model_prompt is not None else {}
            print(json.dumps({"prompt": prompt, **extra, "stories": stories, "stats": model.last_stats}))
        else:
            print("\n\n".join(stories) if args.num_samples == 1 else
                  "\n\n".join(f"--- story {i + 1} ---\n{t}" for i, t in enumerate(stories)))
    else:
        for piece in model.stream(prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if args.verbose:
        st = model.last_stats
        print(f"{st['new_tokens']} tokens in {st['seconds']:.2f} s: {st['tokens_per_s']:.1f} tokens/s, "
              f"first token after {1000 * st['time_to_first_token_s']:.0f} ms", file=sys.stderr)


def cmd_app(args) -> None:
    from .app import launch

    code = launch(args.model, args.models_dir, host=args.host, port=args.port, compile=args.compile, dtype=args.dtype)
    if code not in (0, -15):
        raise StoryGPTError(f"the web app stopped with exit code {code}")


def cmd_serve(args) -> None:
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("STORYGPT_API_KEY"),
          max_concurrency=args.max_concurrency, max_queue=args.max_queue, device=args.device, dtype=args.dtype,
          log_level=args.log_level, compile=args.compile)


def cmd_export(args) -> None:
    from .export import export_model

    out = export_model(args.model, args.out, args.dtype, args.format)
    if args.format == "gguf":
        from .gguf_export import GGUF_FILE, gguf_dtype

        f = out / GGUF_FILE
        print(f"-> {f} (gguf, {f.stat().st_size / 1e6:.1f} MB, {gguf_dtype(args.dtype)})")
        return
    size = sum(f.stat().st_size for f in out.iterdir())
    dtype = "fp32" if args.format == "llama2c" else args.dtype
    print(f"-> {out} ({args.format}, {size / 1e6:.1f} MB, {dtype})")


def cmd_average(args) -> None:
    from .averaging import average_snapshots
    from .device import DTYPES

    out = average_snapshots(args.run, args.out, args.from_step, DTYPES[args.dtype])
    steps = json.loads((out / "config.json").read_text())["storygpt"]["averaged_steps"]
    print(f"-> {out} (mean of {len(steps)} snapshots, steps {steps[0]}-{steps[-1]}, {args.dtype})")


def cmd_import(args) -> None:
    from .importer import import_model

    out = import_model(args.source, args.out, args.format, tokenizer=args.tokenizer, dtype=args.dtype)
    params = json.loads((out / "config.json").read_text())["storygpt"]["params"]
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"-> {out} (storygpt model from {args.format} {args.source}: {params / 1e6:.2f}M params, "
          f"{size / 1e6:.1f} MB, {args.dtype})")


def cmd_presets(args) -> None:
    from .model import PRESETS, Transformer

    print(f"{'preset':8} {'params':>10} {'dim':>5} {'layers':>6} {'heads':>5} {'vocab':>6} {'context':>7}")
    for name, cfg in PRESETS.items():
        n = Transformer(cfg).num_params()
        print(f"{name:8} {n / 1e6:9.2f}M {cfg.dim:5} {cfg.n_layers:6} {cfg.n_heads:5} {cfg.vocab_size:6} {cfg.max_seq_len:7}")
