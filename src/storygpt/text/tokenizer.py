"""Tokenizers: SentencePiece unigram, BPE and char-level models behind one `Tokenizer` class.

All three are SentencePiece models trained with the same settings, so they share every behaviour:
- one end-of-story token (`eos_id`); TinyStories' `<|endoftext|>` separator encodes to it, and it
  also starts a story (`bos_id` defaults to it),
- byte fallback, so no text is ever unknown (any UTF-8 round-trips exactly),
- identity normalization and kept whitespace, so `decode(encode(text)) == text`,
- "\\n" is its own token, so paragraphs survive.

A tokenizer directory holds `tokenizer.model` (the SentencePiece proto) and `tokenizer.json`
(type, vocab size, checksum). Model directories embed the same two files.

Imported models (see importer.py) bring conventions of their own: `tokenizer.json` may set `eos_id`
and `bos_id` (the token a story starts with), which override the SentencePiece model's. llama2.c
starts and ends stories with its BOS (id 1); a Hugging Face llama may start with BOS and end with EOS.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from storygpt.errors import StoryGPTError

EOS_TEXT = "<|endoftext|>"
TYPES = ("unigram", "bpe", "char")
MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"


class Tokenizer:
    """A SentencePiece model plus the conventions storygpt relies on (EOS, byte fallback)."""

    def __init__(self, model_proto: bytes, type: str = "unigram", eos_id: int | None = None,
                 bos_id: int | None = None):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with long messages
            raise StoryGPTError(f"not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self._eos_id, self._bos_id = eos_id, bos_id  # overrides of the SentencePiece model's ids
        for name, i in (("end", eos_id), ("start", bos_id)):
            if i is not None and not (isinstance(i, int) and 0 <= i < self.sp.vocab_size()):
                raise StoryGPTError(f"{name}-of-story token id {i!r} is not in the vocabulary")
        if self.eos_id < 0:
            raise StoryGPTError("tokenizer has no end-of-story token")
        self.type = type
        self.model_proto = model_proto
        self.checksum = hashlib.sha256(model_proto).hexdigest()

    # --- basic interface -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def eos_id(self) -> int:
        """The token that ends a story."""
        return self.sp.eos_id() if self._eos_id is None else self._eos_id

    @property
    def bos_id(self) -> int:
        """The token that starts a story (storygpt's own tokenizers: the end-of-story token)."""
        return self.eos_id if self._bos_id is None else self._bos_id

    def encode(self, text: str, eos: bool = False) -> list[int]:
        """Token ids of `text`. `<|endoftext|>` inside the text becomes `eos_id`; `eos=True` appends one."""
        parts = text.split(EOS_TEXT)
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i:
                ids.append(self.eos_id)
                part = part.lstrip("\n")
            if part:
                ids.extend(self.sp.encode(part))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many separate texts (no separator handling) in one C++ call, on `num_threads`
        threads (-1: SentencePiece's default, all cores)."""
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the start- and end-of-story tokens decode to nothing."""
        drop = {self.eos_id, self.bos_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in drop])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # --- files -----------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / MODEL_FILE).write_bytes(self.model_proto)
        meta = {"type": self.type, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "sha256": self.checksum}
        if self.bos_id != self.eos_id:
            meta["bos_id"] = self.bos_id
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a tokenizer directory (or a model/run directory containing one)."""
        path = Path(path)
        for cand in (path, path / "tokenizer"):
            if (cand / MODEL_FILE).is_file():
                path = cand
                break
        else:
            raise StoryGPTError(f"{path}: not a tokenizer directory (no {MODEL_FILE})")
        meta = {}
        if (path / META_FILE).is_file():
            try:
                meta = json.loads((path / META_FILE).read_text())
            except json.JSONDecodeError:
                raise StoryGPTError(f"{path / META_FILE}: not valid JSON") from None
        tok = cls((path / MODEL_FILE).read_bytes(), type=meta.get("type", "unigram"),
                  eos_id=meta.get("eos_id"), bos_id=meta.get("bos_id"))
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer(type={self.type!r}, vocab_size={self.vocab_size})"


def train_tokenizer(stories: Iterable[str], vocab_size: int, type: str = "unigram",
                    max_stories: int = 2_000_000, seed: int = 0) -> Tokenizer:
    """Train a SentencePiece tokenizer on an iterable of story texts.

    `vocab_size` counts everything: the unknown and end-of-story tokens, "\\n", and the 256 byte
    tokens of byte fallback. For `char`, it is an upper bound (the alphabet decides the size).
    """
    if type not in TYPES:
        raise StoryGPTError(f"tokenizer type must be one of {', '.join(TYPES)}, got {type!r}")
    specials = 3 + 256  # unk, eos, "\n", bytes
    if vocab_size <= specials:
        raise StoryGPTError(f"vocab size must be > {specials} (specials + 256 byte tokens), got {vocab_size}")
    if vocab_size > 1 << 20:
        raise StoryGPTError(f"vocab size {vocab_size} is absurd (max {1 << 20})")
    counted = _Counted(stories)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(counted),
            model_writer=model,
            model_type=type,
            vocab_size=vocab_size,
            hard_vocab_limit=(type != "char"),
            byte_fallback=True,
            character_coverage=0.9995 if type != "char" else 1.0,
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 16,
            input_sentence_size=max_stories,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000,
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
            unk_surface="\u2047",
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if counted.n == 0:
            raise StoryGPTError("no text to train the tokenizer on (input is empty)") from None
        msg = str(e).strip().splitlines()[-1]
        raise StoryGPTError(f"tokenizer training failed: {msg}") from None
    if counted.n == 0:
        raise StoryGPTError("no text to train the tokenizer on (input is empty)")
    return Tokenizer(model.getvalue(), type=type)


class _Counted:
    """Iterate once over stories, counting them and skipping empty ones."""

    def __init__(self, stories: Iterable[str]):
        self.stories = stories
        self.n = 0

    def __iter__(self) -> Iterator[str]:
        for s in self.stories:
            if s:
                self.n += 1
                yield s
