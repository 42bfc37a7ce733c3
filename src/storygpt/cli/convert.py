"""The `storygpt export` and `storygpt import`: models to and from transformers, llama2.c and llama.cpp (and to ONNX).

Each command's parser next to what it does; the handlers import what they use when they run, so that
`storygpt --help` stays fast."""

from __future__ import annotations

import json


def add_commands(sub) -> None:
    x = sub.add_parser("export", help="write a model for storygpt (e.g. fp16), transformers (hf), llama2.c's run.c, "
                                      "llama.cpp (gguf) or onnxruntime (onnx)")
    x.description = ("hf of a LoRA adapter folder (storygpt finetune --lora: RUN/adapter or RUN): OUT is the base model "
                     "for transformers and OUT/adapter the LoRA for PEFT under transformers' module names (q_proj, ..., "
                     "down_proj): PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(OUT), OUT/adapter). "
                     "The other formats write the adapter merged into its base model. onnx: OUT/model.onnx (one "
                     "graph for prefill and decoding with a KV cache), the tokenizer and OUT/onnx.json, for "
                     "onnxruntime in Python or onnxruntime-web.")
    x.add_argument("--model", required=True, help="run, model or adapter directory; 'default', 'instruct': the "
                   "shipped models")
    x.add_argument("--out", required=True)
    x.add_argument("--format", default="storygpt", choices=["storygpt", "hf", "llama2c", "gguf", "onnx"])
    x.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16", "f32", "f16", "q8_0", "int8"],
                   help="weights: fp32|fp16|bf16, default fp16 (llama2c: always fp32); gguf: f32|f16|q8_0 "
                        "(fp32/fp16 accepted), default f16; onnx: fp32|int8, default fp32")
    x.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="make a storygpt model of a llama2.c model.bin or a transformers llama folder")
    im.add_argument("source", help="llama2c: the model.bin (version 0); hf: the LlamaForCausalLM folder")
    im.add_argument("--format", required=True, choices=["llama2c", "hf"])
    im.add_argument("--tokenizer", help="the SentencePiece .model (llama2c: required; hf: default SOURCE/tokenizer.model)")
    im.add_argument("--out", required=True, help="the model directory to write")
    im.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    im.set_defaults(func=cmd_import)


def cmd_export(args) -> None:
    from storygpt.convert.export import default_dtype, export_model

    dtype = args.dtype or default_dtype(args.format)
    out = export_model(args.model, args.out, dtype, args.format)
    if args.format in ("gguf", "onnx"):
        from storygpt.convert.gguf import GGUF_FILE, gguf_dtype
        from storygpt.convert.onnx import ONNX_FILE

        f = out / (GGUF_FILE if args.format == "gguf" else ONNX_FILE)
        name = gguf_dtype(dtype) if args.format == "gguf" else dtype
        print(f"-> {f} ({args.format}, {f.stat().st_size / 1e6:.1f} MB, {name})")
        return
    size = sum(f.stat().st_size for f in out.iterdir())
    dtype = "fp32" if args.format == "llama2c" else dtype
    print(f"-> {out} ({args.format}, {size / 1e6:.1f} MB, {dtype})")


def cmd_import(args) -> None:
    from storygpt.convert.importer import import_model

    out = import_model(args.source, args.out, args.format, tokenizer=args.tokenizer, dtype=args.dtype)
    params = json.loads((out / "config.json").read_text())["storygpt"]["params"]
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"-> {out} (storygpt model from {args.format} {args.source}: {params / 1e6:.2f}M params, "
          f"{size / 1e6:.1f} MB, {args.dtype})")
