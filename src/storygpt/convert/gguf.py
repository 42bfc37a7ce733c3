"""Export to llama.cpp's GGUF (one `model.gguf`: weights, hyperparameters and the tokenizer).

    storygpt export --model RUN --out DIR --format gguf --dtype f32|f16|q8_0

Written with the `gguf` package (llama.cpp's own writer), as llama.cpp's convert_hf_to_gguf.py writes a
LlamaForCausalLM: architecture `llama`, tensors `token_embd`, `blk.N.attn_q` ... `output_norm`, `output`
(untied models only), the `llama.*` hyperparameters and the SentencePiece vocabulary.

Layouts: llama.cpp's LLM_ARCH_LLAMA rotates consecutive pairs of each head's query/key dims (its "normal"
RoPE), which is storygpt's layout, so q/k go in as they are. (convert_hf_to_gguf.py permutes transformers'
halves layout back to pairs; transformers' GGUF loader undoes that when it reads a llama GGUF.)

Dtypes: f32; f16 (2-D weights; norms stay f32, as llama.cpp's converter keeps 1-D tensors); q8_0 (2-D
weights, the embedding included, in llama.cpp's Q8_0 blocks of 32: one f16 scale + 32 int8; a matrix
whose rows are not a multiple of 32 falls back to f16).

Tokenizer: every SentencePiece piece with its score and type (normal, unknown, control, byte,
user-defined); the story start (BOS, added to every prompt) and end (EOS) ids, which are the same token
for storygpt-trained tokenizers. `tokenizer.ggml.model` follows the SentencePiece model type:
- unigram (storygpt's default) -> "t5", llama.cpp's unigram tokenizer (UGM: SentencePiece's Viterbi
  search, so the same pieces, except that a character missing from the vocabulary becomes <unk> where
  SentencePiece falls back to its UTF-8 bytes). Written as "llama", llama.cpp's SPM tokenizer would
  merge pairs greedily by score, which reaches many unigram pieces by no chain of merges: on the shipped
  model 2.7x the tokens and not one of 100 held-out stories tokenized as storygpt does.
- bpe, char -> "llama" (SPM: SentencePiece's BPE merges, exactly).
One deliberate difference: a one-character user-defined piece (storygpt's "\n") is written as a normal
token. llama.cpp cuts user-defined tokens out of the text and prefixes the next piece of text with a
space, so "a\nThe" would become "a", "\n", "▁The" where SentencePiece gives "a", "\n", "The"; as a
normal one-character token it is matched all the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_write
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer

GGUF_FILE = "model.gguf"
GGUF_DTYPES = ("f32", "f16", "q8_0")
_ALIASES = {"fp32": "f32", "fp16": "f16"}


def gguf_dtype(dtype: str) -> str:
    """f32|f16|q8_0 (fp32 and fp16 accepted as their aliases)."""
    name = _ALIASES.get(dtype, dtype)
    if name not in GGUF_DTYPES:
        raise StoryGPTError(f"gguf dtype must be f32, f16 or q8_0 (or fp32/fp16), got {dtype!r}")
    return name


def gguf_tensors(net: Transformer) -> dict[str, torch.Tensor]:
    """storygpt weights under llama.cpp's names, in GGUF's llama layout (= storygpt's)."""
    if net.cfg.arch != "llama":
        raise StoryGPTError(f"only llama-architecture models export to gguf (this one is {net.cfg.arch})")
    c = net.cfg
    sd = {"token_embd.weight": net.tok_emb.weight}
    for i, layer in enumerate(net.layers):
        q, k, v = layer.attn.wqkv.weight.split([c.n_heads * c.head_dim, c.kv_heads * c.head_dim,
                                                c.kv_heads * c.head_dim])
        gate, up = layer.mlp.w_gate_up.weight.chunk(2)
        p = f"blk.{i}."
        sd |= {p + "attn_norm.weight": layer.attn_norm.weight, p + "attn_q.weight": q, p + "attn_k.weight": k,
               p + "attn_v.weight": v, p + "attn_output.weight": layer.attn.wo.weight,
               p + "ffn_norm.weight": layer.mlp_norm.weight, p + "ffn_gate.weight": gate,
               p + "ffn_up.weight": up, p + "ffn_down.weight": layer.mlp.w_down.weight}
    sd["output_norm.weight"] = net.norm.weight
    if not c.tie_embeddings:
        sd["output.weight"] = net.output.weight
    return {k: v.detach().float() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# SentencePiece vocabulary
# --------------------------------------------------------------------------------------------
def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, at


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for length-delimited."""
    at = 0
    while at < len(buf):
        key, at = _varint(buf, at)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(buf, at)
        elif wire == 2:
            n, at = _varint(buf, at)
            value, at = buf[at:at + n], at + n
        elif wire in (1, 5):
            value, at = None, at + (8 if wire == 1 else 4)
        else:
            raise StoryGPTError(f"tokenizer.model: unexpected protobuf wire type {wire}")
        yield num, value


def sentencepiece_spec(model_proto: bytes) -> dict:
    """What llama.cpp needs of a SentencePiece ModelProto, read straight from its protobuf fields
    (sentencepiece's Python API has no is_user_defined; this needs no protobuf package): each piece's
    type (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6: GGUF's token types use the
    same numbers), the model type (1 unigram, 2 bpe, 3 word, 4 char) and the normalizer's settings."""
    spec = {"types": [], "model_type": 1, "add_dummy_prefix": True, "remove_extra_whitespaces": True,
            "charsmap": b""}
    for num, value in _fields(model_proto):
        if num == 1:  # repeated SentencePiece pieces: piece = 1, score = 2, type = 3 (default NORMAL)
            spec["types"].append(next((v for n, v in _fields(value) if n == 3), 1))
        elif num == 2:  # TrainerSpec: model_type = 3 (default UNIGRAM)
            spec["model_type"] = next((v for n, v in _fields(value) if n == 3), 1)
        elif num == 3:  # NormalizerSpec: precompiled_charsmap = 2, add_dummy_prefix = 3, remove_extra_whitespaces = 4
            norm = dict(_fields(value))
            spec["charsmap"] = norm.get(2, b"")
            spec["add_dummy_prefix"] = bool(norm.get(3, 1))
            spec["remove_extra_whitespaces"] = bool(norm.get(4, 1))
    return spec


def gguf_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[float], list[int], dict]:
    """tokens, scores, token types and the SentencePiece spec (see sentencepiece_spec)."""
    sp = tokenizer.sp
    spec = sentencepiece_spec(tokenizer.model_proto)
    types = spec["types"]
    if len(types) != sp.get_piece_size():
        raise StoryGPTError(f"tokenizer.model: {len(types)} pieces read, SentencePiece has {sp.get_piece_size()}")
    tokens = [sp.id_to_piece(i) for i in range(len(types))]
    types = [1 if t == 4 and len(p) == 1 else t for t, p in zip(types, tokens)]  # see the module docstring
    return tokens, [sp.get_score(i) for i in range(len(tokens))], types, spec


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------
def _encode(t: torch.Tensor, dtype: str):
    """(numpy data, GGML type or None) for one tensor: 1-D stays f32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    a = t.contiguous().numpy().astype(np.float32)
    if a.ndim == 1 or dtype == "f32":
        return a, None
    if dtype == "q8_0" and a.shape[-1] % 32 == 0:
        return quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def export_gguf(net: Transformer, tokenizer: Tokenizer, out: str | os.PathLike, dtype: str = "f16",
                name: str = "storygpt") -> Path:
    """Write OUT/model.gguf; returns OUT."""
    import gguf

    dtype = gguf_dtype(dtype)
    tensors = gguf_tensors(net)
    tokens, scores, types, spec = gguf_vocab(tokenizer)
    c = net.cfg
    if len(tokens) != c.vocab_size:
        raise StoryGPTError(f"the tokenizer has {len(tokens)} tokens but the model a vocabulary of {c.vocab_size}")
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.mlp_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    unigram = spec["model_type"] == 1
    w.add_tokenizer_model("t5" if unigram else "llama")  # see the module docstring
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    if (unk := tokenizer.sp.unk_id()) >= 0:
        w.add_unk_token_id(unk)
    w.add_add_bos_token(True)  # a story starts with the start token
    w.add_add_eos_token(False)
    w.add_add_space_prefix(spec["add_dummy_prefix"])
    if unigram:  # llama.cpp's UGM normalizes as SentencePiece does; its SPM does neither
        w.add_remove_extra_whitespaces(spec["remove_extra_whitespaces"])
        if spec["charsmap"]:
            w.add_precompiled_charsmap(spec["charsmap"])
    for key, t in tensors.items():
        data, raw = _encode(t, dtype)
        w.add_tensor(key, data, raw_dtype=raw)

    def write(tmp: str) -> None:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(Path(out) / GGUF_FILE, write)
    return Path(out)
