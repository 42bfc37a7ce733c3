import pytest

from storygpt.errors import StoryGPTError
from storygpt.text.tokenizer import EOS_TEXT, Tokenizer, train_tokenizer

TRICKY = [
    "Once upon a time, Lily saw  two   spaces.",
    "Line one.\nLine two.\n\nA new paragraph.",
    "Unicode: café, naïve, 你好, ☃, 🐉 and the end.",
    " leading space and trailing space ",
    "",
]


@pytest.mark.parametrize("kind,size", [("unigram", 320), ("bpe", 320), ("char", 320)])
def test_train_round_trip_and_interface(stories, tmp_path, kind, size):
    tok = train_tokenizer(stories, vocab_size=size, type=kind)
    if kind == "char":
        assert tok.vocab_size <= size
    else:
        assert tok.vocab_size == size
    for text in stories[:20] + TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # byte fallback: unseen characters never map to the unknown token
    assert 0 not in tok.encode("🐉 ☃ 你好")
    # save / load gives the same tokenizer
    tok.save(tmp_path / "t")
    again = Tokenizer.load(tmp_path / "t")
    assert again.checksum == tok.checksum and again.type == kind
    assert again.encode(stories[0]) == tok.encode(stories[0])


def test_char_tokenizer_is_char_level(stories):
    tok = train_tokenizer(stories, vocab_size=320, type="char")
    text = "Lily had a red ball."
    # one token per character, plus SentencePiece's word-boundary marker at the start
    assert len(tok.encode(text)) == len(text) + 1


def test_eos_separator(stories):
    tok = train_tokenizer(stories, vocab_size=320)
    a, b = stories[0], stories[1]
    ids = tok.encode(f"{a}\n{EOS_TEXT}\n{b}")
    assert ids == tok.encode(a + "\n") + [tok.eos_id] + tok.encode(b)
    assert tok.encode(a, eos=True)[-1] == tok.eos_id
    assert tok.decode(tok.encode(a, eos=True)) == a
    assert tok.id_to_piece(tok.encode("\n")[-1]) == "\n"


def test_bad_tokenizer_inputs(tmp_path, stories):
    with pytest.raises(StoryGPTError, match="not a tokenizer directory"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(StoryGPTError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path)
    with pytest.raises(StoryGPTError, match="vocab size must be"):
        train_tokenizer(stories, vocab_size=100)
    with pytest.raises(StoryGPTError, match="type must be"):
        train_tokenizer(stories, vocab_size=320, type="wordpiece")
    with pytest.raises(StoryGPTError, match="empty"):
        train_tokenizer([], vocab_size=320)
