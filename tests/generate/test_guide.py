"""Guided decoding (guide.py): the requirements read back from the prompts and requests storygpt writes,
and stories that hold every requested word, the sentence and dialogue, whatever the model's logits,
ending only once they do. Plain prompts and plain models are untouched."""

from __future__ import annotations

import random

import pytest
import torch

from storygpt.data.instruct import request_text
from storygpt.generate.guide import Guide, Requirements, parse_request, requirements_of
from storygpt.text.checks import contains_sentence, contains_word
from storygpt.text.instruct import header_prompt, request_prompt
from storygpt.text.tokenizer import Tokenizer

WORDS = ["dog", "ball", "happy"]
SENTENCE = "The dog ran to the park."
VOCAB = ["dog", "ball", "happy", "jump", "tree", "shiny", "sing", "glad", "umbrella", "whisper", "sparkly", "cat",
         "use", "have", "include"]  # the last: the verbs that also start a request's next part


def test_requests_parse_back_to_their_requirements():
    for seed in range(300):
        rng = random.Random(seed)
        req = {}
        if rng.random() < 0.8:
            req["words"] = rng.sample(VOCAB, rng.randint(1, 4))
        if rng.random() < 0.6:
            req["sentence"] = rng.choice([SENTENCE, "Lily and Tom sang a song, and it was fun!", "Why is it red?"])
        if rng.random() < 0.5 or not req:
            req["features"] = ["Dialogue"]
        text = request_text(req, rng)
        got = parse_request(text)
        assert got == Requirements(req.get("words", []), req.get("sentence"), "features" in req), text
        assert requirements_of(request_prompt(text)) == got


def test_requirements_of_instruction_headers():
    head = header_prompt(words=WORDS, sentence=SENTENCE, features="dialogue,twist", order=["Words", "Features",
                                                                                          "Random sentence"])
    assert requirements_of(head + " Once upon a time") == Requirements(WORDS, SENTENCE, True)
    assert requirements_of(header_prompt(summary="A dog finds a ball.")) == Requirements()
    assert not requirements_of(header_prompt(summary="A dog finds a ball."))  # nothing to check: no guide
    assert requirements_of("Once upon a time, Tom had a dog.") is None
    assert parse_request("Write a story about a dog.") == Requirements()


def _drive(tok: Tokenizer, req: Requirements, make_logits, max_new: int = 150, beginning: str = "") -> tuple[str, bool]:
    """Decode one sample with a Guide over the logits `make_logits(step)` (greedy); (story, ended by itself)."""
    guide = Guide(tok, req, 1, beginning, max_new)
    ids = tok.encode(beginning) if beginning else []
    for step in range(max_new):
        logits = make_logits(step)[None].clone()
        token = int(guide.adjust(logits, [0])[0].argmax())
        if token == tok.eos_id:
            return tok.decode(ids), True
        ids.append(token)
        _observe(tok, guide, beginning, ids)
    return tok.decode(ids), False


def _observe(tok: Tokenizer, guide: Guide, beginning: str, ids: list[int]) -> None:
    """Tell the guide of its one sample the last of `ids` (the beginning's tokens and those written)."""
    start = len(tok.decode(tok.encode(beginning))) if beginning else 0
    guide.observe(0, ids[-1], tok.decode(ids)[start:] if start else " " + tok.decode(ids))


@pytest.mark.parametrize("seed", range(6))
def test_any_logits_give_a_story_with_what_was_asked(tokenizer_dir, seed):
    """Random logits over the tokens that start a word or are punctuation (a model that writes words, at
    random), favouring the end of the story: the words (some of several tokens in this small vocabulary)
    and the sentence are all there, and the story ends only then."""
    tok = Tokenizer.load(tokenizer_dir)
    gen = torch.Generator().manual_seed(seed)
    words = random.Random(seed).sample(VOCAB, 3)
    assert any(len(tok.encode(w)) > 1 for w in VOCAB)
    glued = torch.tensor([not (p.startswith("\u2581") or p in ".,!?") for p in map(tok.id_to_piece, range(tok.vocab_size))])

    def logits(step):
        row = (torch.randn(tok.vocab_size, generator=gen) * 3).masked_fill(glued, -30.0)
        row[tok.eos_id] = 10.0 if step > 5 else -10.0
        return row
    req = Requirements(words, SENTENCE, dialogue=True)
    story, ended = _drive(tok, req, logits)
    assert ended
    assert all(contains_word(story, w) for w in words), (words, story)
    assert contains_sentence(story, SENTENCE), story
    unguided = tok.decode([int(logits(0).argmax())])
    assert not contains_sentence(unguided, SENTENCE)


def test_a_written_first_token_finishes_its_word(tokenizer_dir):
    """A word of several tokens whose first token is no word by itself is finished once that token is
    written, and the words already in the story's beginning are not asked for again."""
    tok = Tokenizer.load(tokenizer_dir)
    word = next(w for w in ("umbrella", "whisper", "sparkly") if len(tok.encode(w)) > 1)
    ids = tok.encode(word)
    req = Requirements([word, "dog"], None, False)
    guide = Guide(tok, req, 1, "The dog", 50)
    assert [w.word for w in guide.samples[0].words] == [word]
    written = tok.encode("The dog") + ids[:1]
    _observe(tok, guide, "The dog", written)
    rest = []
    for _ in range(len(ids) - 1):
        row = torch.zeros(1, tok.vocab_size)
        rest.append(int(guide.adjust(row, [0])[0].argmax()))
        assert torch.isinf(row[0]).sum() == tok.vocab_size - 1  # forced: one token left
        written.append(rest[-1])
        _observe(tok, guide, "The dog", written)
    assert rest == ids[1:] and guide.samples[0].words == []


def test_a_first_token_that_is_a_word_finishes_only_what_the_bonus_made(tokenizer_dir):
    """"tomato" starts with the token of "to": written where the model wanted "to" anyway, it stays "to";
    written because of the bonus, it becomes "tomato"."""
    tok = Tokenizer.load(tokenizer_dir)
    ids = tok.encode("tomato")
    assert len(ids) > 1 and tok.id_to_piece(ids[0]) == "\u2581to"
    for own_logit, finished in ((12.0, False), (-4.0, True)):
        guide = Guide(tok, Requirements(["tomato"]), 1, "", 500)
        guide.samples[0].generated = 200  # the bonus is at its cap
        row = torch.zeros(1, tok.vocab_size)
        row[0, ids[0]] = own_logit
        assert int(guide.adjust(row, [0])[0].argmax()) == ids[0]
        _observe(tok, guide, "", ids[:1])
        assert guide.samples[0].force == (ids[1:] if finished else []), own_logit
