"""The tokenizer and data commands: `storygpt tokenizer train`, `storygpt data prepare|rename|sample|instruct|download`.

Each command's parser next to what it does; the handlers import what they use when they run, so that
`storygpt --help` stays fast."""

from __future__ import annotations

from .options import Parser, stories_in_out, suite_sampling


def add_commands(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="action", required=True,
                                                                                  parser_class=Parser)
    t = tok.add_parser("train", help="train a SentencePiece unigram/BPE or char tokenizer")
    t.add_argument("--input", nargs="+", required=True, help="TinyStories .txt, .json/.jsonl files or folders")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--type", choices=["unigram", "bpe", "char"], default="unigram")
    t.add_argument("--field", default=None, help="JSON field holding the story (default: story, then text)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data commands").add_subparsers(dest="action", required=True,
                                                                         parser_class=Parser)
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
    d.set_defaults(func=cmd_data_prepare)
    dr = data.add_parser("rename", help="the same stories with a share of them renamed: each character whose "
                                        "gender is known gets a new name, the same at every use")
    stories_in_out(dr, "the stories, in TinyStories .txt format")
    dr.add_argument("--share", type=float, default=0.8, help="share of stories whose characters are renamed")
    dr.add_argument("--seed", type=int, default=0)
    dr.set_defaults(func=cmd_data_rename)
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
    ds.set_defaults(func=cmd_data_sample)
    di = data.add_parser("instruct", help="turn stories into TinyStories-Instruct records (words, sentence, "
                                          "features, or a request in plain language; then `data prepare`)")
    stories_in_out(di, "the records, in TinyStories .txt format")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--request-share", type=float, default=0.5,
                    help="share of records that state their requirements as a request in plain language")
    di.add_argument("--copies", type=int, default=1, help="records per story (different draws)")
    di.set_defaults(func=cmd_data_instruct)
    dl = data.add_parser("download", help="download TinyStories from the Hugging Face Hub (cached, verified)")
    dl.add_argument("dataset", choices=["tinystories"])
    dl.add_argument("--version", choices=["v1", "v2", "json"], default="v1",
                    help="v1: the original .txt release; v2: GPT-4 stories only; json: the all-data archive")
    dl.add_argument("--split", choices=["train", "validation", "all"], default="all")
    dl.add_argument("--out", required=True)
    dl.add_argument("--revision", default="main", help="branch, tag or commit of the dataset repository")
    dl.add_argument("--quiet", action="store_true")
    dl.set_defaults(func=cmd_data_download)


def cmd_tokenizer_train(args) -> None:
    from storygpt.text.stories import check_inputs, expand_inputs, iter_stories
    from storygpt.text.tokenizer import train_tokenizer

    files = expand_inputs(args.input)
    check_inputs(files, args.field)
    tok = train_tokenizer(iter_stories(files, args.field), args.vocab_size, args.type, seed=args.seed)
    tok.save(args.out)
    print(f"tokenizer: {tok.type}, {tok.vocab_size} tokens -> {args.out}")


def cmd_data_prepare(args) -> None:
    from storygpt.data.prepare import prepare

    meta = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   field=args.field, workers=args.workers, dtype=args.dtype, progress=not args.quiet,
                   instruct=args.instruct)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['stories']:,} stories, {info['tokens']:,} tokens, {info['bytes']:,} bytes, "
              f"{len(info['shards'])} shard(s)")
    if meta.get("mask"):
        print("instruction records: the loss leaves out their instructions (masked)")
    print(f"-> {args.out}")


def cmd_data_rename(args) -> None:
    from storygpt.data.rename import build

    counts = build(args.input, args.out, share=args.share, seed=args.seed, field=args.field)
    print(f"{counts['renamed']:,} of {counts['stories']:,} stories renamed -> {args.out}")


def cmd_data_sample(args) -> None:
    from storygpt.eval.selfsample import build
    from storygpt.generate.story_model import load

    counts = build(load(args.model, dtype="fp32"), args.data, args.out, prompts=args.prompts, samples=args.samples,
                   keep=args.keep, cut=args.cut, split=args.split, seed=args.seed, slots=args.slots,
                   progress=not args.quiet, temperature=args.temperature, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens)
    failed = ", ".join(f"{n:,} {check}" for check, n in counts["failed"].items())
    print(f"{counts['passed']:,} of {counts['completions']:,} completions passed (failed first: {failed}); "
          f"{counts['kept']:,} stories from {counts['prompts']:,} beginnings -> {args.out}")


def cmd_data_instruct(args) -> None:
    from storygpt.data.instruct import build

    counts = build(args.input, args.out, seed=args.seed, request_share=args.request_share, copies=args.copies,
                   field=args.field)
    print(f"{counts['records']:,} instruction records from {counts['stories']:,} stories "
          f"({counts['skipped']:,} gave none) -> {args.out}")


def cmd_data_download(args) -> None:
    from storygpt.data.download import describe, download_tinystories

    placed = download_tinystories(args.out, version=args.version, split=args.split, revision=args.revision,
                                  progress=not args.quiet)
    print(describe(placed, args.out))
