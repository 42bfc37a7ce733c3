"""The web page's tokenizer (resources/web/tokenizer.js) encodes and decodes exactly as storygpt's Python `Tokenizer`
(sentencepiece itself) does, for the shipped tokenizer, freshly trained unigram, BPE and char tokenizers, tokenizers
with SentencePiece's other settings (no byte fallback, no dummy prefix, extra-whitespace removal, whitespace as
suffix, control and user-defined symbols, unused pieces) and, where it is here, llama2.c's stories260K tokenizer.

Node runs tests/web/tokenizer_driver.mjs on a JSON file of cases; without Node the tests skip (fail under CI=true).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import make_stories
from sentencepiece import sentencepiece_model_pb2 as pb

from storygpt.convert.web_tokenizer import tokenizer_data, write_tokenizer_json
from storygpt.errors import StoryGPTError
from storygpt.text.tokenizer import EOS_TEXT, Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("tokenizer_driver.mjs")
DEFAULT_TOKENIZER = ROOT / "src" / "storygpt" / "default_model"
STORIES260K_ENV = "STORYGPT_STORIES260K"
SHARED_STORIES260K = ROOT.parent / "shared" / "models" / "stories260K"

EDGE_TEXTS = [
    "", " ", "  ", "   a  b   ", "a ", " a", "\t", "\ttab\tand  spaces\t", "\n", "\n\n", "a\n\nb\n", " \n \n ",
    "2026 12", "0123456789", "3.14 + 2,000", "!!!???...,,,;;--", "\"Hi!\" she said.", "...", "a...b",
    "\U0001F600 \U0001F984 \U0001F1EB\U0001F1F7 \U0001F468\u200D\U0001F469\u200D\U0001F467", "\U0010FFFF\U00020000",
    "日本語のテキスト、中文文本。", "한국어", "e\u0301 a\u0300 n\u0303 \u00e9", "Zo\u00eb na\u00efve caf\u00e9",
    "\u2581", "\u2581\u2581 x\u2581y", " \u2581 ", "\u2047", "\ufffd", "\x00\x01\x7f", "\u200b\u2028\u2029\ufeff",
    "Ω≈ç√∫˜µ≤≥÷", "ß ẞ ǅ ﬁ", "\U0001d54f\U0001d552\U0001d55f",
    EOS_TEXT, EOS_TEXT + "Once upon a time", "The end." + EOS_TEXT, "a" + EOS_TEXT + "\n\nb" + EOS_TEXT + "\n",
    EOS_TEXT + EOS_TEXT + "\n" + EOS_TEXT, "x\n" + EOS_TEXT + "\n \nOnce", "<|endoftext|", "<|end" + EOS_TEXT + "oftext|>",
    "rrr rrrr ssss eeee llll oooo aaaa", "lll sss ttt", "Lily Lily  Lily\n\nLily",
]

ALPHABET = (list("abcdefghijklmnopqrstuvwxyzLTO .,!?\"'") + [" ", "  ", "\n", "\t", "\u2581", "0", "7", "\U0001F600", "日",
            "é", "e\u0301", "Ω", "\u2047", "\ufffd", EOS_TEXT, "<|x|>", "\x00", "Lily", "ab", "\U0010FFFF", "ß"])


def texts() -> list[str]:
    """Synthetic stories, the edge cases above, a 5,000-character text, and seeded random strings (some built to
    make near-ties between segmentations, e.g. "rrr" as "r"+"rr" or "rr"+"r")."""
    rng = random.Random(0)
    stories = make_stories(300, seed=1)
    out = stories + EDGE_TEXTS + [("\n\n".join(stories))[:5000]]
    out += ["".join(rng.choice(ALPHABET) for _ in range(rng.choice([1, 3, 10, 40]))) for _ in range(1200)]
    out += ["".join(rng.choice("rsetlaon ") for _ in range(rng.choice([3, 6, 20]))) for _ in range(1200)]
    out += ["".join(rng.choice("yvk ") for _ in range(rng.choice([3, 6, 20]))) for _ in range(200)]
    out += [s[: rng.randrange(len(s))] for s in make_stories(100, seed=3)]
    return out


def id_lists(tok: Tokenizer, encoded: list[list[int]]) -> list[list[int]]:
    """The ids of the texts, hand-made byte sequences (valid, truncated and invalid UTF-8, a literal U+2581 as bytes)
    around other pieces, and random sequences weighted towards byte pieces, control pieces and the unknown piece."""
    rng = random.Random(1)
    n = tok.vocab_size
    byte = {b: tok.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    byte_ids = [i for i in byte.values() if tok.sp.is_byte(i)]
    special = [i for i in range(n) if tok.sp.is_control(i) or tok.sp.is_unknown(i)]
    words = [i for i in range(n) if tok.id_to_piece(i).startswith("\u2581") and not tok.sp.is_byte(i)][:20]
    out = list(encoded)
    if len(byte_ids) == 256:
        sequences = [[0xE2], [0xE2, 0x82], [0xE2, 0x82, 0xAC], [0x80], [0xC0, 0x80], [0xC3, 0xA9, 0x80], [0xED, 0xA0, 0x80],
                     [0xF0, 0x9F, 0x98], [0xF0, 0x9F, 0x98, 0x80], [0xEF, 0xBF, 0xBD], [0xF4, 0x90, 0x80, 0x80],
                     [0xE2, 0x96, 0x81], [0xF8, 0x88, 0x80], [0xFF, 0x41], [0xE6, 0x97, 0xA5, 0xE6, 0x97], [0x20, 0x41]]
        for seq in sequences:
            ids = [byte[b] for b in seq]
            for w in words[:3]:
                out += [ids, ids + [w], [w] + ids, ids + [w] + ids + ids, [*special[:1], *ids, w]]
    for _ in range(600):
        ids = []
        for _ in range(rng.choice([1, 2, 3, 5, 12, 40])):
            r = rng.random()
            pool = byte_ids if r < 0.45 and byte_ids else special if r < 0.55 else words if r < 0.7 and words else range(n)
            ids.append(rng.choice(pool))
        out.append(ids)
    return out


@pytest.fixture(scope="session")
def node() -> str:
    """Node.js: skipped with a reason where it is missing, except under CI=true, where that is a failure."""
    found = shutil.which("node")
    if found is None:
        message = "Node.js is not installed (the web tokenizer's tests run tokenizer.js under `node`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_js(node: str, tmp_path: Path, data: dict, texts: list[str], ids: list[list[int]], bench: dict | None = None,
           steps: list[list[int]] | None = None) -> dict:
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"data": data, "texts": texts, "idLists": ids, "bench": bench, "stepLists": steps}),
                     encoding="utf-8")
    done = subprocess.run([node, str(DRIVER), str(cases)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def spm_train(type: str, **options) -> bytes:
    """A SentencePiece model trained with settings storygpt's train_tokenizer does not use."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_stories(400)), model_writer=model, model_type=type,
                                   vocab_size=330, hard_vocab_limit=False, normalization_rule_name="identity",
                                   unk_surface="\u2047", minloglevel=2, **options)
    return model.getvalue()


def with_unused(tok: Tokenizer) -> Tokenizer:
    """`tok` with some pieces marked unused (a third of the longer ones, and "y", "k", "v")."""
    proto = pb.ModelProto.FromString(tok.model_proto)
    rng = random.Random(5)
    for p in proto.pieces:
        if p.type == pb.ModelProto.SentencePiece.NORMAL and (len(p.piece) > 1 and rng.random() < 0.3 or p.piece in ("y", "k", "v")):
            p.type = pb.ModelProto.SentencePiece.UNUSED
    return Tokenizer(proto.SerializeToString(), type=tok.type)


def make_tokenizer(name: str) -> Tokenizer:
    if name == "shipped":
        return Tokenizer.load(DEFAULT_TOKENIZER)
    type, _, variant = name.partition("-")
    if variant == "":
        return train_tokenizer(make_stories(400), vocab_size=340 if type != "char" else 400, type=type)
    if variant == "unused":
        return with_unused(make_tokenizer(type))
    if variant == "suffix":  # whitespace as suffix, extra whitespace removed, user-defined and control symbols
        return Tokenizer(spm_train(type, treat_whitespace_as_suffix=True, remove_extra_whitespaces=True, byte_fallback=True,
                                   user_defined_symbols=["\n", "<|x|>", "  ", "Lily"], control_symbols=["<c1>", "<c2>"],
                                   eos_id=1, bos_id=2), type=type)
    assert variant == "plain"  # no byte fallback, no dummy prefix, " " a user-defined symbol
    return Tokenizer(spm_train(type, add_dummy_prefix=False, remove_extra_whitespaces=False, byte_fallback=False,
                               user_defined_symbols=[" ", "ab"], control_symbols=["<c1>"]), type=type)


NAMES = ["shipped"] + [f"{t}{v}" for v in ("", "-unused", "-suffix", "-plain") for t in ("unigram", "bpe", "char")]


@pytest.fixture(scope="module")
def cases() -> list[str]:
    return texts()


def check_js_matches_python(node: str, tmp_path: Path, tok: Tokenizer, all_texts: list[str]) -> None:
    encoded = [tok.encode(t) for t in all_texts]
    ids = id_lists(tok, encoded)
    decoded = [tok.decode(i) for i in ids]
    got = run_js(node, tmp_path, tokenizer_data(tok), all_texts, ids)
    assert (got["vocabSize"], got["eosId"], got["bosId"]) == (tok.vocab_size, tok.eos_id, tok.bos_id)
    assert got["pieces"] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    bad = [(t, want, js) for t, want, js in zip(all_texts, encoded, got["encoded"]) if want != js]
    assert not bad, f"{len(bad)} texts encode differently, e.g. {bad[0][0]!r}: python {bad[0][1]} js {bad[0][2]}"
    bad = [(i, want, js) for i, want, js in zip(ids, decoded, got["decoded"]) if want != js]
    assert not bad, f"{len(bad)} id lists decode differently, e.g. {bad[0][0]}: python {bad[0][1]!r} js {bad[0][2]!r}"
    assert got["streamed"] == got["decoded"]  # StreamDecoder's pieces add up to decode()


@pytest.mark.parametrize("name", NAMES)
def test_js_encodes_and_decodes_as_python(name, node, tmp_path, cases):
    check_js_matches_python(node, tmp_path, make_tokenizer(name), cases)


def test_stream_decoder_holds_back_incomplete_characters(node, tmp_path):
    """Each push returns the text that is certain: a byte piece that may still complete a character gives nothing
    yet; the dummy prefix's space goes from the first word only; flush() ends a truncated character as U+FFFD."""
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    p, b = tok.sp.piece_to_id, (lambda x: tok.sp.piece_to_id(f"<0x{x:02X}>"))
    ids = [tok.eos_id, p("\u2581Once"), b(0xE2), b(0x82), b(0xAC), p("\u2581the"), b(0xF0), b(0x9F), b(0x41), p("."),
           tok.eos_id, p("\u2581The"), b(0xE2)]
    steps = run_js(node, tmp_path, tokenizer_data(tok), [], [], steps=[ids])["steps"][0]
    assert steps == ["", "Once", "", "", "\u20ac", " the", "", "", "\ufffd\ufffdA", ".", "", " The", "", "\ufffd"]
    assert "".join(steps) == tok.decode(ids)


@pytest.fixture(scope="module")
def tok512() -> bytes:
    """llama2.c's stories260K tokenizer (tok512.model): skipped with a reason where it is not here."""
    places = ([Path(os.environ[STORIES260K_ENV])] if os.environ.get(STORIES260K_ENV) else []) + [SHARED_STORIES260K]
    for folder in places:
        if (folder / "tok512.model").is_file():
            return (folder / "tok512.model").read_bytes()
    pytest.skip(f"llama2.c's tok512.model is not here (looked in: {'; '.join(map(str, places))}; set {STORIES260K_ENV}=DIR)")


@pytest.mark.parametrize("eos,bos", [(1, 1), (2, 2)])
def test_js_matches_python_for_stories260k(tok512, eos, bos, node, tmp_path, cases):
    """As `storygpt import` loads it (token 1 starts and ends stories), and with </s> as the end token, where <s>
    is then a control piece decode keeps (as nothing)."""
    check_js_matches_python(node, tmp_path, Tokenizer(tok512, type="bpe", eos_id=eos, bos_id=bos), cases)


def test_tokenizer_data_layout_and_file(tmp_path):
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    data = tokenizer_data(tok)
    assert data["format"] == "storygpt-sentencepiece" and data["version"] == 1 and data["model_type"] == "unigram"
    assert len(data["pieces"]) == tok.vocab_size == 4096
    assert data["pieces"][:3] == [["<unk>", 0.0, 2], ["</s>", 0.0, 3], ["\n", 0.0, 4]] and data["pieces"][3] == ["<0x00>", 0.0, 6]
    proto = pb.ModelProto.FromString(tok.model_proto)
    assert all(np.float32(row[1]) == np.float32(p.score) and row[0] == p.piece for row, p in zip(data["pieces"], proto.pieces))
    assert (data["unk_id"], data["unk_surface"], data["eos_id"], data["bos_id"], data["eos_text"]) == (0, "\u2047", 1, 1, EOS_TEXT)
    assert (data["add_dummy_prefix"], data["remove_extra_whitespaces"], data["escape_whitespaces"]) == (True, False, True)
    assert (data["treat_whitespace_as_suffix"], data["byte_fallback"]) == (False, True)
    out = tmp_path / "web" / "tokenizer.json"
    write_tokenizer_json(tok, out)
    assert json.loads(out.read_text(encoding="utf-8")) == data
    assert out.stat().st_size < 150_000  # compact: shortest float32 scores, no indentation
    overridden = tokenizer_data(Tokenizer(tok.model_proto, eos_id=1, bos_id=3))
    assert (overridden["eos_id"], overridden["bos_id"]) == (1, 3)


def test_tokenizer_data_refuses_what_the_js_cannot_reproduce():
    nfkc = Tokenizer(spm_train_nfkc(), type="unigram")
    with pytest.raises(StoryGPTError, match="normalization rule 'nfkc'"):
        tokenizer_data(nfkc)
    word = Tokenizer(spm_train("word", eos_id=1, bos_id=-1), type="unigram")
    with pytest.raises(StoryGPTError, match="not WORD"):
        tokenizer_data(word)


def spm_train_nfkc() -> bytes:
    """A model with SentencePiece's NFKC rule (a precompiled character map)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_stories(200)), model_writer=model, vocab_size=300,
                                   hard_vocab_limit=False, normalization_rule_name="nfkc", minloglevel=2)
    return model.getvalue()


def test_js_encode_speed(node, tmp_path, capsys):
    """Encoding a 2,000-character prompt takes a few milliseconds (median of 20 runs; generous bound for slow CI)."""
    text = "\n".join(make_stories(60, seed=4))[:2000]
    for name in ("shipped", "bpe"):
        got = run_js(node, tmp_path, tokenizer_data(make_tokenizer(name)), [], [], bench={"text": text, "repeat": 20})
        with capsys.disabled():
            print(f"\n{name} tokenizer.js encode of 2,000 characters: {got['benchMs']:.2f} ms")
        assert got["benchMs"] < 50
