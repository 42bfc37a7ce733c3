"""The tokenizer data the web page loads: a storygpt `Tokenizer` as JSON for resources/web/tokenizer.js.

`tokenizer_data(tok)` reads the SentencePiece model proto (every piece with its score and type, the model type,
the normalizer settings, the unknown piece's id and surface) and adds storygpt's conventions (the end- and
start-of-story ids, which tokenizer.json may override, and the `<|endoftext|>` text). tokenizer.js encodes and
decodes with it exactly as `Tokenizer.encode` / `Tokenizer.decode` do (tests/web/test_tokenizer_js.py checks).

Layout (version 1):

    {"format": "storygpt-sentencepiece", "version": 1,
     "model_type": "unigram" | "bpe" | "char",
     "pieces": [[piece, score, type], ...],   # by id; type: 1 normal, 2 unknown, 3 control,
                                               # 4 user-defined, 5 unused, 6 byte (SentencePiece's numbers)
     "unk_id": 0, "unk_surface": "\\u2047",
     "add_dummy_prefix": true, "remove_extra_whitespaces": false, "escape_whitespaces": true,
     "treat_whitespace_as_suffix": false, "byte_fallback": true,
     "eos_id": 1, "bos_id": 1, "eos_text": "<|endoftext|>"}

Scores are float32 in the model; each is written with the fewest digits that read back (through Math.fround) to
the same float32. What the JS cannot reproduce is refused: a normalization rule with a character map (anything
but identity), a denormalizer, and SentencePiece's word model.
"""

from __future__ import annotations

import json
import os
import struct

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_write
from storygpt.text.tokenizer import EOS_TEXT, Tokenizer

FORMAT = "storygpt-sentencepiece"
VERSION = 1
MODEL_TYPES = {1: "unigram", 2: "bpe", 4: "char"}  # ModelProto.TrainerSpec.ModelType; 3 is "word"
PIECE_TYPES = (1, 2, 3, 4, 5, 6)  # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE


def _float32(x: float) -> float:
    """The shortest decimal that reads back to the same float32 as `x` (itself a float32 value)."""
    if x == 0 or x != x or x in (float("inf"), float("-inf")):
        return x
    want = struct.pack("<f", x)
    for digits in range(1, 10):
        y = float(f"{x:.{digits}g}")
        if struct.pack("<f", y) == want:
            return y
    return x


def _byte_value(piece: str) -> int | None:
    """The byte of a byte-fallback piece "<0xNN>" (SentencePiece writes NN in upper case), else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        hexa = piece[3:5]
        if all(c in "0123456789ABCDEF" for c in hexa):
            return int(hexa, 16)
    return None


def tokenizer_data(tokenizer: Tokenizer) -> dict:
    """The JSON-serialisable description of `tokenizer` that tokenizer.js's `Tokenizer` takes."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(tokenizer.model_proto)
    except Exception:  # protobuf's DecodeError; the Tokenizer loaded it, so this is unexpected
        raise StoryGPTError("the tokenizer's SentencePiece model cannot be read as a model proto") from None
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    model_type = MODEL_TYPES.get(trainer.model_type)
    if model_type is None:
        name = pb.TrainerSpec.ModelType.Name(trainer.model_type) if trainer.model_type in (1, 2, 3, 4) else trainer.model_type
        raise StoryGPTError(f"the web tokenizer supports SentencePiece unigram, bpe and char models, not {name}")
    if norm.precompiled_charsmap:
        raise StoryGPTError(f"the web tokenizer cannot apply the normalization rule {norm.name or 'custom'!r} "
                            "(only identity: a SentencePiece model without a character map)")
    if proto.HasField("denormalizer_spec") and proto.denormalizer_spec.precompiled_charsmap:
        raise StoryGPTError("the web tokenizer cannot apply a SentencePiece denormalizer (the model has one)")
    pieces, unk_id = [], None
    for i, p in enumerate(proto.pieces):
        if p.type not in PIECE_TYPES:
            raise StoryGPTError(f"piece {i} ({p.piece!r}) has an unknown SentencePiece type {p.type}")
        if p.type == 6 and _byte_value(p.piece) is None:
            raise StoryGPTError(f"piece {i} ({p.piece!r}) is a byte piece but not of the form <0xNN>")
        if p.type == 2 and unk_id is None:
            unk_id = i
        pieces.append([p.piece, _float32(p.score), p.type])
    if unk_id is None:
        raise StoryGPTError("the SentencePiece model has no unknown piece")
    if len(pieces) != tokenizer.vocab_size:
        raise StoryGPTError(f"the model proto has {len(pieces)} pieces but the tokenizer {tokenizer.vocab_size}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_type": model_type,
        "pieces": pieces,
        "unk_id": unk_id,
        "unk_surface": trainer.unk_surface,  # the proto's default is SentencePiece's " \u2047 "
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "escape_whitespaces": norm.escape_whitespaces,
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
        "byte_fallback": trainer.byte_fallback,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "eos_text": EOS_TEXT,
    }


def write_tokenizer_json(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tokenizer_data(tokenizer)` to `path` as compact UTF-8 JSON (atomically)."""
    text = json.dumps(tokenizer_data(tokenizer), ensure_ascii=False, separators=(",", ":"))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)
