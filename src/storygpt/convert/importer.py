"""Import models storygpt did not train: llama2.c's `model.bin` and Hugging Face llama directories.

    storygpt import --format llama2c MODEL.bin --tokenizer TOKENIZER.model --out DIR
    storygpt import --format hf HF_DIR --out DIR

Both become a storygpt model directory (`checkpoint.save_model_dir`); this is export.py run backwards.
- llama2c: the version-0 `model.bin` that run.c reads (a header of 7 int32, then fp32 weights) plus
  the SentencePiece `.model` of its vocabulary. llama2.c rotates consecutive pairs of each head's
  query/key dims, as storygpt does, so the weights are taken as they are. run.c hard-codes RoPE base
  10000, RMSNorm epsilon 1e-5 and token 1 as the token that starts and ends a story; so does this.
- hf: a transformers `LlamaForCausalLM` folder (config.json, model.safetensors or shards with
  model.safetensors.index.json, a SentencePiece tokenizer.model). transformers rotates the two halves
  of each head, so the query/key rows are permuted back per head (the inverse of export's
  `_pairs_to_halves`). A story starts with the config's bos_token_id and ends with its eos_token_id.

The model directory records where it came from under `imported` in its info. Nothing is written to
`out` unless the import succeeds: the directory is built in a temporary folder and then moved in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_dir
from storygpt.model.config import ModelConfig
from storygpt.model.device import DTYPES
from storygpt.model.model_dir import WEIGHTS, save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer

FORMATS = ("llama2c", "hf")
LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's version-1+ exports start with it; they are not read here


def import_model(source: str | os.PathLike, out: str | os.PathLike, format: str,
                 tokenizer: str | os.PathLike | None = None, dtype: str = "fp32") -> Path:
    """Write the model at `source` (a llama2.c model.bin, or a transformers folder) to the storygpt model
    directory `out`, floating weights in `dtype`. `tokenizer`: the SentencePiece .model (llama2c: required;
    hf: default SOURCE/tokenizer.model)."""
    if format not in FORMATS:
        raise StoryGPTError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise StoryGPTError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise StoryGPTError(f"{source}: no such file or directory")
    _check_out(source, out)
    if format == "llama2c":
        if tokenizer is None:
            raise StoryGPTError("--format llama2c needs --tokenizer TOKENIZER.model (its SentencePiece model)")
        cfg, state, tok = read_llama2c(source, tokenizer)
        provenance = {"sha256": _sha256(source), "tokenizer": str(Path(tokenizer).resolve())}
    else:
        cfg, state, tok = read_hf(source, tokenizer)
        provenance = {}
    net = Transformer(cfg)
    net.load_state_dict(state)  # strict: every weight present, every shape right
    info = {"imported": {"format": format, "source": str(source.resolve()), **provenance},
            "params": net.num_params()}
    with atomic_dir(out) as work:
        save_model_dir(work, cfg, net.state_dict(), tok, info, dtype=DTYPES[dtype])
    return out


def _check_out(source: Path, out: Path) -> None:
    """`out` is replaced whole: refuse where that would delete the source or a folder that is not a model."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise StoryGPTError(f"--out {out} would replace the source {source}")
    if dst.exists() and not (dst.is_dir() and (not any(dst.iterdir()) or _is_model_dir(dst))):
        raise StoryGPTError(f"--out {out} exists and is not a storygpt model directory; not replacing it")


def _is_model_dir(path: Path) -> bool:
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "storygpt" in meta and (path / WEIGHTS).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def storygpt_state(emb: torch.Tensor, norm: torch.Tensor, output: torch.Tensor, layers: list[dict]) -> dict:
    """storygpt's state dict from llama weights in Meta's layout; each of `layers` holds attn_norm,
    q, k, v, o, mlp_norm, gate, up, down. wqkv is q, k, v stacked; w_gate_up is gate then up."""
    sd = {"tok_emb.weight": emb, "norm.weight": norm, "output.weight": output}
    for i, w in enumerate(layers):
        p = f"layers.{i}."
        sd |= {p + "attn_norm.weight": w["attn_norm"], p + "attn.wqkv.weight": torch.cat([w["q"], w["k"], w["v"]]),
               p + "attn.wo.weight": w["o"], p + "mlp_norm.weight": w["mlp_norm"],
               p + "mlp.w_gate_up.weight": torch.cat([w["gate"], w["up"]]), p + "mlp.w_down.weight": w["down"]}
    return sd


def load_sentencepiece(path: str | os.PathLike, eos_id: int | None, bos_id: int | None) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise StoryGPTError(f"{path}: tokenizer not found (a SentencePiece .model file)")
    proto = path.read_bytes()
    try:
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf; only the type's name depends on it

        spec = sentencepiece_model_pb2.ModelProto.FromString(proto).trainer_spec
        type = spec.ModelType.Name(spec.model_type).lower()
    except Exception:
        type = "unigram"
    try:
        return Tokenizer(proto, type=type, eos_id=eos_id, bos_id=bos_id)
    except StoryGPTError as e:
        raise StoryGPTError(f"{path}: {e}") from None


def _check_vocab(tok: Tokenizer, tok_path, vocab: int, model_path) -> None:
    if tok.vocab_size != vocab:
        raise StoryGPTError(f"{tok_path}: the tokenizer has {tok.vocab_size} tokens, but {model_path} "
                            f"has a vocabulary of {vocab}")


# --------------------------------------------------------------------------------------------
# llama2.c
# --------------------------------------------------------------------------------------------
def read_llama2c(path: str | os.PathLike, tokenizer: str | os.PathLike) -> tuple[ModelConfig, dict, Tokenizer]:
    """(config, storygpt state dict, tokenizer) of a llama2.c version-0 model.bin, as run.c reads it."""
    path = Path(path)
    if not path.is_file():
        raise StoryGPTError(f"{path}: not a file (a llama2.c model.bin)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(28)
    if len(head) < 28:
        raise StoryGPTError(f"{path}: {size} bytes, too short for a llama2.c header (28 bytes)")
    if struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        raise StoryGPTError(f"{path}: a llama2.c version-1+ export; only the version-0 model.bin that run.c "
                            "reads is supported (llama2.c's export.py --version 0)")
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    h = dict(zip(names, struct.unpack("<7i", head)))
    dim, hidden, L, heads, kv_heads, seq_len = (h[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads",
                                                                 "n_kv_heads", "seq_len"))
    tied, vocab = h["vocab_size"] > 0, abs(h["vocab_size"])
    header = ", ".join(f"{k} {v}" for k, v in h.items())
    if min(dim, hidden, L, heads, kv_heads, vocab, seq_len) < 1 or dim % heads or (dim // heads) % 2 \
            or heads % kv_heads:
        raise StoryGPTError(f"{path}: not a llama2.c model.bin (its header makes no sense: {header})")
    hs = dim // heads
    kv = kv_heads * hs
    shapes = {"emb": (vocab, dim), "attn_norm": (L, dim), "q": (L, dim, dim), "k": (L, kv, dim), "v": (L, kv, dim),
              "o": (L, dim, dim), "mlp_norm": (L, dim), "gate": (L, hidden, dim), "down": (L, dim, hidden),
              "up": (L, hidden, dim), "norm": (dim,), "freq_real": (seq_len, hs // 2), "freq_imag": (seq_len, hs // 2)}
    if not tied:
        shapes["output"] = (vocab, dim)
    expected = 28 + 4 * sum(math.prod(s) for s in shapes.values())
    if size != expected:
        raise StoryGPTError(f"{path}: {size:,} bytes, but its header ({header}) implies {expected:,}")

    tok = load_sentencepiece(tokenizer, eos_id=1, bos_id=1)  # run.c: token 1 starts and ends a story
    _check_vocab(tok, tokenizer, vocab, path)

    floats = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=28))
    w, at = {}, 0
    for name, shape in shapes.items():  # in file order
        n = math.prod(shape)
        w[name] = floats[at:at + n].view(shape)
        at += n
    cfg = ModelConfig(arch="llama", vocab_size=vocab, dim=dim, n_layers=L, n_heads=heads,
                      n_kv_heads=None if kv_heads == heads else kv_heads, hidden_dim=hidden, max_seq_len=seq_len,
                      norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=tied)
    per_layer = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
    layers = [{k: w[k][i] for k in per_layer} for i in range(L)]
    return cfg, storygpt_state(w["emb"], w["norm"], w.get("output", w["emb"]), layers), tok


# --------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------
def _halves_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of export's `_pairs_to_halves`: each head's rows 0, D/2, 1, D/2+1, ... become consecutive
    pairs (0, 1), (2, 3), ... (transformers rotates halves, storygpt rotates pairs)."""
    out_dim, in_dim = w.shape
    return w.view(heads, 2, out_dim // heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_model_config(hf: dict, where: str) -> ModelConfig:
    """storygpt's ModelConfig of a LlamaForCausalLM config.json (missing keys: LlamaConfig's defaults)."""
    archs = hf.get("architectures") or (["LlamaForCausalLM"] if hf.get("model_type") == "llama" else [])
    if "LlamaForCausalLM" not in archs:
        raise StoryGPTError(f"{where}: not a LlamaForCausalLM (architectures {archs}, model_type "
                            f"{hf.get('model_type')!r})")

    def get(key, default=None, kind=int):
        value = hf.get(key, default)
        if value is None:
            raise StoryGPTError(f"{where}: no {key}")
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool) or (kind is int and value < 1):
            raise StoryGPTError(f"{where}: {key} {value!r} is not a {getattr(kind, '__name__', 'number')}"
                                f"{' >= 1' if kind is int else ''}")
        return value

    dim, heads = get("hidden_size"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads", heads)
    if hf.get("head_dim") not in (None, dim // heads):
        raise StoryGPTError(f"{where}: head_dim {hf.get('head_dim')} is not hidden_size / num_attention_heads "
                            f"({dim} / {heads}), which storygpt's attention assumes")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
        if kind != "default":
            raise StoryGPTError(f"{where}: RoPE scaling ({key}: {kind}) is not supported")
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    if get("hidden_act", "silu", str) != "silu" or get("attention_bias", False, bool) or get("mlp_bias", False, bool):
        raise StoryGPTError(f"{where}: only the plain llama block is supported (silu, no biases)")
    try:
        return ModelConfig(arch="llama", vocab_size=get("vocab_size"), dim=dim, n_layers=get("num_hidden_layers"),
                           n_heads=heads, n_kv_heads=None if kv_heads == heads else kv_heads,
                           hidden_dim=get("intermediate_size"), max_seq_len=get("max_position_embeddings", 2048),
                           norm_eps=float(get("rms_norm_eps", 1e-6, (int, float))), rope_theta=float(theta),
                           tie_embeddings=get("tie_word_embeddings", False, bool))
    except StoryGPTError as e:
        raise StoryGPTError(f"{where}: {e}") from None


def read_safetensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json names."""
    index = src / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StoryGPTError(f"{index}: not a safetensors index (no weight_map)") from None
    tensors = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise StoryGPTError(f"{path}: weights file not found (transformers folders are read from safetensors)")
        try:
            tensors |= load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise StoryGPTError(f"{path}: corrupt weights file ({str(e).splitlines()[0]})") from None
    return tensors


def read_hf(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> tuple[ModelConfig, dict, Tokenizer]:
    """(config, storygpt state dict, tokenizer) of a transformers LlamaForCausalLM folder."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise StoryGPTError(f"{src}: not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads((src / "config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise StoryGPTError(f"{src / 'config.json'}: not valid JSON") from None
    if not isinstance(hf, dict):
        raise StoryGPTError(f"{src / 'config.json'}: not a model config")
    cfg = hf_model_config(hf, str(src / "config.json"))

    eos, bos = hf.get("eos_token_id"), hf.get("bos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos  # several end tokens: the first ends our stories
    tok_path = Path(tokenizer) if tokenizer is not None else src / "tokenizer.model"
    if not tok_path.is_file():
        raise StoryGPTError(f"{tok_path}: not found (storygpt reads SentencePiece tokenizer.model files only)")
    tok = load_sentencepiece(tok_path, eos_id=eos, bos_id=bos)
    _check_vocab(tok, tok_path, cfg.vocab_size, src)

    tensors = read_safetensors(src)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensors.pop(name, None)
        if t is None:
            raise StoryGPTError(f"{src}: tensor {name} is missing")
        if tuple(t.shape) != shape:
            raise StoryGPTError(f"{src}: tensor {name} has shape {tuple(t.shape)}, the config implies {shape}")
        return t.float()

    c = cfg
    dim, kv = c.dim, c.kv_heads * c.head_dim
    emb, norm = take("model.embed_tokens.weight", (c.vocab_size, dim)), take("model.norm.weight", (dim,))
    output = emb if c.tie_embeddings else take("lm_head.weight", (c.vocab_size, dim))
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layers.append({
            "attn_norm": take(p + "input_layernorm.weight", (dim,)),
            "q": _halves_to_pairs(take(p + "self_attn.q_proj.weight", (dim, dim)), c.n_heads),
            "k": _halves_to_pairs(take(p + "self_attn.k_proj.weight", (kv, dim)), c.kv_heads),
            "v": take(p + "self_attn.v_proj.weight", (kv, dim)), "o": take(p + "self_attn.o_proj.weight", (dim, dim)),
            "mlp_norm": take(p + "post_attention_layernorm.weight", (dim,)),
            "gate": take(p + "mlp.gate_proj.weight", (c.mlp_dim, dim)),
            "up": take(p + "mlp.up_proj.weight", (c.mlp_dim, dim)),
            "down": take(p + "mlp.down_proj.weight", (dim, c.mlp_dim))})
    # left over: RoPE tables some checkpoints keep, and a tied head stored twice; anything else is not llama
    extra = [k for k in tensors if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"]
    if extra:
        raise StoryGPTError(f"{src}: tensors a plain llama does not have ({', '.join(sorted(extra)[:3])})")
    return cfg, storygpt_state(emb, norm, output, layers), tok
