"""Export a trained model for other tools.

- `storygpt`: a storygpt model directory, optionally in fp16/bf16 (how the shipped default model is made).
- `hf`: a Hugging Face `transformers` LlamaForCausalLM directory (config.json, model.safetensors,
  generation_config.json, the SentencePiece tokenizer.model): `LlamaForCausalLM.from_pretrained(DIR)`. Of a
  LoRA adapter folder: its base model so, and DIR/adapter, the LoRA in PEFT's format under transformers' module
  names: `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(DIR), DIR/adapter)`. (The other formats
  take an adapter merged into its base's weights.)
- `llama2c`: llama2.c's `model.bin` (version-0 format, fp32) and `tokenizer.bin`, for
  `./run model.bin -z tokenizer.bin`.
- `gguf`: llama.cpp's `model.gguf` in f32, f16 or q8_0 (see gguf.py).
- `onnx`: `model.onnx` (fp32 or int8) with the tokenizer and `onnx.json`, for onnxruntime (see onnx.py).

    storygpt export --model RUN --out DIR [--format storygpt|hf|llama2c|gguf|onnx] [--dtype fp16]

Layouts: storygpt rotates consecutive pairs of each head's query/key dims (Meta's and llama2.c's
layout), so llama2.c takes the weights as they are; `transformers` rotates the two halves of each head
(`rotate_half`), so the hf export permutes the rows of the query and key projections per head, which
gives the same attention scores.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_write
from storygpt.model import adapters
from storygpt.model.device import DTYPES
from storygpt.model.load import adapter_base, load_model, resolve_model_path, shipped_or
from storygpt.model.model_dir import save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer

FORMATS = ("storygpt", "hf", "llama2c", "gguf", "onnx")


def default_dtype(format: str) -> str:
    """The weights' dtype when none is asked for: fp32 for onnx (fp32 or int8), fp16 for the others."""
    return "fp32" if format == "onnx" else "fp16"


def export_model(model: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                 format: str = "storygpt") -> Path:
    """Write `model` (a run, model or adapter directory; "default"/"instruct": the shipped models) to `out` in
    `format`, floating weights in `dtype` (None: `default_dtype(format)`; llama2c is always fp32: run.c reads
    nothing else; gguf: f32, f16 or q8_0, fp32/fp16 as aliases; onnx: fp32 or int8)."""
    if format not in FORMATS:
        raise StoryGPTError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    dtype = dtype or default_dtype(format)
    model = shipped_or(model)
    if format == "onnx":
        from .onnx import export_onnx

        return export_onnx(model, out, dtype)
    if format == "gguf":
        from .gguf import gguf_dtype

        dtype = gguf_dtype(dtype)
    elif dtype not in DTYPES:
        raise StoryGPTError(f"dtype must be fp32, fp16 or bf16 for {format}, got {dtype!r}")
    if Path(out).resolve() == Path(model).resolve():
        raise StoryGPTError("--out must differ from --model")
    if format == "hf" and adapters.is_adapter_dir(resolve_model_path(model)):
        return export_hf_adapter(resolve_model_path(model), out, DTYPES[dtype])
    net, tokenizer, info = load_model(model)
    info = {k: v for k, v in info.items() if k != "adapter"}  # an adapter exports merged: no longer one
    if format == "storygpt":
        return save_model_dir(out, net.cfg, net.state_dict(), tokenizer, info, dtype=DTYPES[dtype])
    if format == "hf":
        return export_hf(net, tokenizer, out, DTYPES[dtype])
    if format == "gguf":
        from .gguf import export_gguf

        return export_gguf(net, tokenizer, out, dtype, name=Path(model).resolve().name)
    return export_llama2c(net, tokenizer, out)


def _llama_only(net: Transformer, target: str) -> None:
    if net.cfg.arch != "llama":
        raise StoryGPTError(f"only llama-architecture models export to {target} (this one is {net.cfg.arch})")


def _split_qkv(net: Transformer, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = net.cfg
    return layer.attn.wqkv.weight.detach().split([c.n_heads * c.head_dim, c.kv_heads * c.head_dim,
                                                  c.kv_heads * c.head_dim])


def _pairs_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's output rows from consecutive pairs (0,1), (2,3), ... to halves (0, D/2), ...:
    row order 0, 2, 4, ..., 1, 3, 5, ... within each head."""
    out_dim, in_dim = w.shape
    return w.view(heads, out_dim // heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# --------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------
def hf_config(net: Transformer, tokenizer: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    c = net.cfg
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "use_cache": True,
        # a story starts after the end-of-story token, so it is also the start token
        "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_state_dict(net: Transformer) -> dict[str, torch.Tensor]:
    """storygpt weights under LlamaForCausalLM's names and layouts."""
    _llama_only(net, "transformers")
    c = net.cfg
    sd = {"model.embed_tokens.weight": net.tok_emb.weight.detach(), "model.norm.weight": net.norm.weight.detach()}
    if not c.tie_embeddings:
        sd["lm_head.weight"] = net.output.weight.detach()
    for i, layer in enumerate(net.layers):
        p = f"model.layers.{i}."
        q, k, v = _split_qkv(net, layer)
        gate, up = layer.mlp.w_gate_up.weight.detach().chunk(2)
        sd |= {p + "self_attn.q_proj.weight": _pairs_to_halves(q, c.n_heads),
               p + "self_attn.k_proj.weight": _pairs_to_halves(k, c.kv_heads),
               p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.attn.wo.weight.detach(),
               p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
               p + "mlp.down_proj.weight": layer.mlp.w_down.weight.detach(),
               p + "input_layernorm.weight": layer.attn_norm.weight.detach(),
               p + "post_attention_layernorm.weight": layer.mlp_norm.weight.detach()}
    return sd


def export_hf(net: Transformer, tokenizer: Tokenizer, out: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous().clone() for k, v in hf_state_dict(net).items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    cfg = hf_config(net, tokenizer, dtype)
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["eos_token_id"]}
    for name, obj in (("config.json", cfg), ("generation_config.json", gen)):
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(tokenizer.model_proto)
    return out


def export_hf_adapter(path: Path, out: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """OUT: the adapter's base model for transformers (export_hf); OUT/adapter: the LoRA for PEFT, converted to
    transformers' modules. storygpt's fused q/k/v (and gate/up) projection has one A and a B whose rows are
    the q, k and v rows; so q_proj, k_proj and v_proj each get that A and their rows of B (q and k rows in
    transformers' RoPE layout, like their weights): the same update, the same rank and scale."""
    from peft import LoraConfig

    spec = adapters.read_spec(path)
    net, tokenizer, _ = load_model(adapter_base(path, spec))
    _llama_only(net, "transformers")
    tensors = adapters.checked_tensors(net, tokenizer, path, spec)
    lora = hf_lora_tensors(net, tensors, path)
    out = Path(out)
    export_hf(net, tokenizer, out, dtype)
    targets = sorted({k.split(".")[-3] for k in lora})
    config = LoraConfig(r=spec["lora"]["r"], lora_alpha=spec["lora"]["alpha"], target_modules=targets,
                        lora_dropout=(spec.get("lora") or {}).get("dropout", 0.0), task_type="CAUSAL_LM",
                        base_model_name_or_path=str(out.resolve()))
    (out / "adapter").mkdir(exist_ok=True)
    config.save_pretrained(str(out / "adapter"))
    lora = {k: v.to(dtype).contiguous().clone() for k, v in lora.items()}  # shared A: one copy each
    atomic_write(out / "adapter" / adapters.ADAPTER_WEIGHTS, lambda tmp: save_file(lora, tmp, metadata={"format": "pt"}))
    return out


def hf_lora_tensors(net: Transformer, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """An adapter's lora_A/lora_B tensors under PEFT's names for LlamaForCausalLM's modules."""
    c = net.cfg
    # storygpt module -> [(transformers module, B's rows -> its rows)]
    splits = {"attn.wqkv": [("self_attn.q_proj", lambda b: _pairs_to_halves(b[:c.n_heads * c.head_dim], c.n_heads)),
                            ("self_attn.k_proj", lambda b: _pairs_to_halves(
                                b[c.n_heads * c.head_dim:(c.n_heads + c.kv_heads) * c.head_dim], c.kv_heads)),
                            ("self_attn.v_proj", lambda b: b[(c.n_heads + c.kv_heads) * c.head_dim:])],
              "attn.wo": [("self_attn.o_proj", lambda b: b)],
              "mlp.w_gate_up": [("mlp.gate_proj", lambda b: b.chunk(2)[0]), ("mlp.up_proj", lambda b: b.chunk(2)[1])],
              "mlp.w_down": [("mlp.down_proj", lambda b: b)]}
    out, used = {}, set()
    for i in range(c.n_layers):
        for name, parts in splits.items():
            a_key, b_key = (f"{adapters.PREFIX}layers.{i}.{name}.lora_{x}.weight" for x in "AB")
            if a_key not in tensors:
                continue
            used |= {a_key, b_key}
            for hf_name, rows in parts:
                p = f"base_model.model.model.layers.{i}.{hf_name}"
                out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = tensors[a_key], rows(tensors[b_key])
    left = sorted(set(tensors) - used)
    if left:
        raise StoryGPTError(f"{path}: no transformers module for the adapter's {left[0]}")
    return out


# --------------------------------------------------------------------------------------------
# llama2.c
# --------------------------------------------------------------------------------------------
def llama2c_weights(net: Transformer) -> tuple[list[int], list[torch.Tensor]]:
    """run.c's version-0 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    vocab_size negative when the classifier is not the embedding) and its tensors, in file order."""
    _llama_only(net, "llama2.c")
    c = net.cfg
    # run.c hard-codes both (RoPE base 10000, RMSNorm epsilon 1e-5)
    if c.rope_theta != 10000.0 or c.norm_eps != 1e-5:
        raise StoryGPTError(f"llama2.c's run.c assumes rope_theta 10000 and norm_eps 1e-5; this model has "
                            f"{c.rope_theta:g} and {c.norm_eps:g}")
    header = [c.dim, c.mlp_dim, c.n_layers, c.n_heads, c.kv_heads,
              c.vocab_size if c.tie_embeddings else -c.vocab_size, c.max_seq_len]
    layers = list(net.layers)
    qkv = [_split_qkv(net, layer) for layer in layers]
    gate_up = [layer.mlp.w_gate_up.weight.detach().chunk(2) for layer in layers]
    tensors = [net.tok_emb.weight.detach(),
               *(layer.attn_norm.weight.detach() for layer in layers),
               *(q for q, _, _ in qkv), *(k for _, k, _ in qkv), *(v for _, _, v in qkv),
               *(layer.attn.wo.weight.detach() for layer in layers),
               *(layer.mlp_norm.weight.detach() for layer in layers),
               *(g for g, _ in gate_up), *(layer.mlp.w_down.weight.detach() for layer in layers),
               *(u for _, u in gate_up), net.norm.weight.detach(),
               # RoPE tables (run.c skips them and rotates by itself): the model's, one cos and sin per pair
               net.rope_cos[:, ::2], net.rope_sin[:, 1::2]]
    if not c.tie_embeddings:
        tensors.append(net.output.weight.detach())
    return header, tensors


def llama2c_tokenizer(tokenizer: Tokenizer) -> bytes:
    """tokenizer.bin as run.c reads it: max token length, then per id: score (f32), length (i32), bytes.
    SentencePiece's word marker becomes a space; the end-of-story token (run.c's BOS, id 1 here too)
    is written as llama2.c writes <s>."""
    sp = tokenizer.sp
    pieces = []
    for i in range(sp.get_piece_size()):
        if i == tokenizer.eos_id:
            text = "\n<s>\n"
        elif sp.is_unknown(i):
            text = "<unk>"
        else:
            text = sp.id_to_piece(i).replace("\u2581", " ")
        pieces.append((sp.get_score(i), text.encode("utf-8")))
    body = b"".join(struct.pack("fI", score, len(b)) + b for score, b in pieces)
    return struct.pack("I", max(len(b) for _, b in pieces)) + body


def export_llama2c(net: Transformer, tokenizer: Tokenizer, out: str | os.PathLike) -> Path:
    if tokenizer.eos_id != 1:
        raise StoryGPTError(f"llama2.c's run.c starts and ends stories with token 1; this tokenizer uses {tokenizer.eos_id}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, tensors = llama2c_weights(net)

    def write_model(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("7i", *header))
            for t in tensors:
                f.write(t.to(torch.float32).contiguous().numpy().tobytes())

    atomic_write(out / "model.bin", write_model)
    atomic_write(out / "tokenizer.bin", lambda tmp: Path(tmp).write_bytes(llama2c_tokenizer(tokenizer)))
    return out
