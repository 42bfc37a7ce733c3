"""The `storygpt export` and `storygpt import`: models to and from transformers, llama2.c and llama.cpp.

Each command's parser next to what it does; the handlers import what they use when they run, so that
`storygpt --help` stays fast."""

from __future__ import annotations

import json


def add_commands(sub) -> None:
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
    x.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="make a storygpt model of a llama2.c model.bin or a transformers llama folder")
    im.add_argument("source", help="llama2c: the model.bin (version 0); hf: the LlamaForCausalLM folder")
    im.add_argument("--format", required=True, choices=["llama2c", "hf"])
    im.add_argument("--tokenizer", help="the SentencePiece .model (llama2c: required; hf: default SOURCE/tokenizer.model)")
    im.add_argument("--out", required=True, help="the model directory to write")
    im.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    im.set_defaults(func=cmd_import)


def cmd_export(args) -> None:
    from storygpt.convert.export import export_model

    out = export_model(args.model, args.out, args.dtype, args.format)
    if args.format == "gguf":
        from storygpt.convert.gguf import GGUF_FILE, gguf_dtype

        f = out / GGUF_FILE
        print(f"-> {f} (gguf, {f.stat().st_size / 1e6:.1f} MB, {gguf_dtype(args.dtype)})")
        return
    size = sum(f.stat().st_size for f in out.iterdir())
    dtype = "fp32" if args.format == "llama2c" else args.dtype
    print(f"-> {out} ({args.format}, {size / 1e6:.1f} MB, {dtype})")


def cmd_import(args) -> None:
    from storygpt.convert.importer import import_model

    out = import_model(args.source, args.out, args.format, tokenizer=args.tokenizer, dtype=args.dtype)
    params = json.loads((out / "config.json").read_text())["storygpt"]["params"]
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"-> {out} (storygpt model from {args.format} {args.source}: {params / 1e6:.2f}M params, "
          f"{size / 1e6:.1f} MB, {args.dtype})")
