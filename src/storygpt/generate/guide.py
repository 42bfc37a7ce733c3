"""Guided decoding: an instruction-tuned model's story holds what its instruction asks for.

A model of a few million weights reads its instruction, but it forgets most of it while it writes: the
shipped one fits all three requested words into 9-14% of its stories on its own (docs/results/instruct.md).
Guidance steers the sampling of an instruct model toward the request, token by token, and leaves the writing
to the model:

- words: until the story has a requested word (in any inflection: jump, jumps, jumped), the tokens
  that start a form of it get a logit bonus that grows with the story's length (`WORD_RATE` a token, at
  most `WORD_MAX`); a word of several tokens is finished once its first token is written (its other
  tokens are forced), unless that token is a word on its own ("me" of "merry") that the model was more
  likely than not to write without the bonus;
- sentence: at each sentence boundary outside quoted speech the sentence's first token gets a bonus of
  `SENTENCE_RATE` times the boundaries passed; once the model writes it there, the rest of the sentence
  is forced token by token; at the `SENTENCE_FORCE_AT`th boundary it is forced outright;
- dialogue: at sentence boundaries an opening quotation mark gets a bonus until the story has quoted
  speech (a nudge only: what the characters say is the model's);
- the end: the end-of-story token is barred while a word or the sentence is missing; when the tokens left
  (max_new_tokens) are just enough for what is missing, it is forced.

The requirements are read from the very text the model reads (`requirements_of`: the `Words:`,
`Random sentence:` and `Features:` lines, or the templates of a `Request:`), so the Python API, the
command line, the web app and the server's chat endpoint are guided alike. `SamplingOptions(guide=False)`
(`--no-guide`, `"guide": false`) leaves an instruct model to itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from storygpt.text.checks import contains_sentence, contains_word, has_dialogue, inflections
from storygpt.text.instruct import REQUEST, WORD, split_record
from storygpt.text.tokenizer import Tokenizer

WORD_RATE, WORD_MAX = 0.08, 8.0        # logit bonus of a missing word's first token: per token written, cap
SENTENCE_RATE, SENTENCE_FORCE_AT = 0.6, 8  # bonus per sentence boundary passed; the boundary that forces it
DIALOGUE_RATE, DIALOGUE_MAX = 0.5, 5.0  # bonus of an opening quotation mark per boundary, cap
_QUOTES = "\"\u201c\u201d"
_BOUNDARY = re.compile(r"[.!?][\"\u201d]?$")
# a listed word that is one of these verbs, followed by one of those words, starts the request's next part
# ("... dog and ball and has some dialogue"); the verbs stay requirable words ("the words use, girl and sad")
_CLAUSE_VERBS = {"has", "have", "contains", "contain", "includes", "include", "uses", "use", "is", "should", "must"}
_CLAUSE_NEXT = {"the", "some", "a", "an", "characters", "dialogue", "conversation", "it", "to", "be", "have", "use",
                "include", "contain"}


# --------------------------------------------------------------------------------------------
# What an instruction asks for
# --------------------------------------------------------------------------------------------
@dataclass
class Requirements:
    words: list[str] = field(default_factory=list)
    sentence: str | None = None
    dialogue: bool = False

    def __bool__(self) -> bool:
        return bool(self.words or self.sentence or self.dialogue)


def requirements_of(prompt: str) -> Requirements | None:
    """What an instruct prompt (`Field: value` lines or a `Request:` line, then `Story:`) asks for that
    can be checked in the story: its words, its sentence, dialogue. None for a plain story prompt."""
    record = split_record(prompt)
    if record is None:
        return None
    req = Requirements()
    for line in record[0].splitlines()[:-1]:
        name, _, value = line.partition(":")
        value = value.strip()
        if name == "Words":
            req.words = [w.strip() for w in value.split(",") if re.fullmatch(WORD, w.strip())]
        elif name == "Random sentence":
            req.sentence = value or None
        elif name == "Features":
            req.dialogue = "dialogue" in value.lower()
        elif name + ":" == REQUEST:
            req = parse_request(value)
    return req


def parse_request(text: str) -> Requirements:
    """The words, sentence and dialogue a plain-language request asks for, as storygpt's request
    templates phrase them (`instruct_data.request_text`): "... uses the words ball, dog and happy",
    "... includes the sentence "..."", "... has some dialogue"."""
    req = Requirements()
    quoted = re.search(r"\bsentence:?\s*[\"\u201c](.+?)[\"\u201d]", text, re.IGNORECASE)
    if quoted:
        req.sentence = quoted.group(1).strip() or None
        text = text[:quoted.start()] + text[quoted.end():]
    listed = re.search(r"\bwords?:?\s+(.*)", text, re.IGNORECASE)
    if listed:
        req.words = _word_list(listed.group(1))
    req.dialogue = re.search(r"dialogue|talking to each other|conversation", text, re.IGNORECASE) is not None
    return req


def _word_list(text: str) -> list[str]:
    """The words listed at the start of `text` ("ball, dog and happy and has ..." -> ball, dog, happy)."""
    words, end = [], 0
    for m in re.finditer(rf"(^|,\s*(?:and\s+)?|\s+and\s+)({WORD})", text):
        after = re.match(r"\s+([A-Za-z]+)", text[m.end():])
        if m.start() != end or (m.group(2).lower() in _CLAUSE_VERBS and after and after.group(1).lower() in _CLAUSE_NEXT):
            break
        words.append(m.group(2))
        end = m.end()
    return words


# --------------------------------------------------------------------------------------------
# Steering the samples of one story
# --------------------------------------------------------------------------------------------
@dataclass
class _Word:
    word: str
    starts: list[int]                 # tokens that start a form of it (the bonus goes to them)
    finish: dict[int, list[int]]      # first token -> the rest of the form, for forms finished once started
    shortest: list[int]               # the tokens of its shortest form (forced when time runs out)
    loose: set[int] = field(default_factory=set)  # first tokens that are words themselves ("me" of "merry")


@dataclass
class _Sample:
    text: str                         # the story so far: its beginning and what the sample wrote
    words: list[_Word]
    sentence: bool
    dialogue: bool
    generated: int = 0
    boundaries: int = 0
    at_boundary: bool = False
    offered: bool = False             # the sentence's first token was offered at this step
    finished: list[_Word] = field(default_factory=list)  # words the latest token finished
    caused: dict[int, float] = field(default_factory=dict)  # loose token -> share of its probability from the bonus
    force: list[int] = field(default_factory=list)


class Guide:
    """Steers the n samples of one story toward `req` (see the module's text). `Story` calls `adjust`
    on each step's logits and `observe` with each token drawn and the text the sample has written."""

    def __init__(self, tokenizer: Tokenizer, req: Requirements, n: int, beginning: str, max_new_tokens: int):
        self.eos, self.max_new = tokenizer.eos_id, max_new_tokens
        self.sentence = tokenizer.encode(req.sentence) if req.sentence else []
        self.sentence_text = req.sentence
        self.quote = tokenizer.encode('"x')[0]  # an opening quotation mark after a space
        self.glue = _glue(tokenizer)
        self.words = [_word(tokenizer, w) for w in req.words]
        self.dialogue = req.dialogue
        self.beginning = tokenizer.decode(tokenizer.encode(beginning)) if beginning.strip() else ""
        self.samples = [_Sample(self.beginning, [], bool(self.sentence), req.dialogue) for _ in range(n)]
        for s in self.samples:
            self._update(s)

    def adjust(self, logits: torch.Tensor, live: list[int]) -> torch.Tensor:
        """The (n, vocab) logits with each live sample's bonuses, bars and forced tokens."""
        for i in live:
            s, row = self.samples[i], logits[i]
            s.offered = False
            if s.finished and not s.force:
                row[self._unglued(s)] = float("-inf")
            if s.force or s.words or s.sentence:
                row[self.eos] = float("-inf")
            if not s.force:
                s.force = self._due(s)
            if s.force:
                row.fill_(float("-inf"))
                row[s.force[0]] = 0.0
            else:
                self._bonuses(s, row)
        return logits

    def _due(self, s: _Sample) -> list[int]:
        """The tokens to write now: what is missing once the tokens left are just enough for it, or the
        sentence at the boundary that places it outright; else none."""
        need = (len(self.sentence) if s.sentence else 0) + sum(len(w.shortest) for w in s.words)
        if (s.words or s.sentence) and self.max_new - s.generated <= need + 1:
            return list(self.sentence) if s.sentence else list(s.words[0].shortest)
        if s.sentence and s.at_boundary and s.boundaries >= SENTENCE_FORCE_AT:
            return list(self.sentence)
        return []

    def _bonuses(self, s: _Sample, row: torch.Tensor) -> None:
        bonus = min(WORD_MAX, WORD_RATE * (s.generated + 1))
        loose = sorted({t for w in s.words for t in w.loose})
        before = row.log_softmax(-1)[loose] if loose else None
        for w in s.words:
            row[w.starts] += bonus
        if loose:  # how much of a loose token's probability the bonus made: 1 - p(alone) / p(with the bonus)
            share = 1 - (before - row.log_softmax(-1)[loose]).exp()
            s.caused = dict(zip(loose, share.tolist()))
        if s.at_boundary and s.sentence:
            row[self.sentence[0]] += SENTENCE_RATE * s.boundaries
            s.offered = True
        if s.at_boundary and s.dialogue:
            row[self.quote] += min(DIALOGUE_MAX, DIALOGUE_RATE * s.boundaries)

    def observe(self, i: int, token: int, written: str) -> None:
        """Sample i wrote `token`; `written` is all it wrote after the beginning, as decoded after it (the
        text the caller shows, so the story is decoded once a token)."""
        s = self.samples[i]
        s.generated += 1
        if s.force:
            if token == s.force[0]:
                s.force.pop(0)
            else:
                s.force.clear()
        elif s.offered and token == self.sentence[0]:
            s.force = list(self.sentence[1:])
        else:
            for w in s.words:
                if token in w.finish and (token not in w.loose or s.caused.get(token, 0.0) > 0.5):
                    s.force = list(w.finish[token])
                    break
        s.caused = {}
        s.text = self.beginning + written
        self._update(s)

    def _unglued(self, s: _Sample) -> list[int]:
        """The tokens that would turn a word just finished into another word ("ball" + "oon"), which a
        form of it does not start with ("jump" + "ed" stays allowed)."""
        tail = re.search(r"[A-Za-z']*$", s.text).group().lower()
        forms = [f for w in s.finished for f in inflections(w.word)]
        return [i for i, p in self.glue.items() if not any(f.startswith(tail + p) for f in forms)]

    def _update(self, s: _Sample) -> None:
        # from the whole text each time: a word's next token may still turn it into another ("sing" + "le")
        words = [w for w in self.words if not contains_word(s.text, w.word)]
        s.finished = [w for w in s.words if w not in words]
        s.words = words
        s.sentence = bool(self.sentence) and not contains_sentence(s.text, self.sentence_text)
        s.dialogue = self.dialogue and not has_dialogue(s.text)
        end = s.text.rstrip()
        boundary = (not end or _BOUNDARY.search(end) is not None) and sum(end.count(q) for q in _QUOTES) % 2 == 0
        if boundary and not s.at_boundary:
            s.boundaries += 1
        s.at_boundary = boundary


def guide_for(tokenizer: Tokenizer, prompt: str, n: int, max_new_tokens: int) -> Guide | None:
    """The guide of a story whose model prompt is `prompt`, or None when it asks for nothing checkable."""
    req = requirements_of(prompt)
    if not req:
        return None
    return Guide(tokenizer, req, n, split_record(prompt)[1], max_new_tokens)


def _word(tokenizer: Tokenizer, word: str) -> _Word:
    forms = sorted(inflections(word), key=lambda f: (len(f), f))
    lower = [tokenizer.encode(f) for f in forms]
    capital = [tokenizer.encode(f.capitalize()) for f in forms]
    starts = sorted({ids[0] for ids in lower + capital if len(ids) == 1})
    finish: dict[int, list[int]] = {}
    for ids in lower:
        if len(ids) > 1 and ids[0] not in starts:
            finish.setdefault(ids[0], ids[1:])
    loose = {t for t in finish if _is_word(tokenizer.id_to_piece(t))}
    return _Word(word, starts + sorted(finish), finish, min(lower, key=len), loose)


@lru_cache(maxsize=16)
def _glue(tokenizer: Tokenizer) -> dict[int, str]:
    """The tokens that go on the word before them ("ball" + "oon"), with their text (once per tokenizer)."""
    pieces = [_piece_text(tokenizer.id_to_piece(i)) for i in range(tokenizer.vocab_size)]
    return {i: p.lower() for i, p in enumerate(pieces) if p[:1].isalpha() or p[:1] == "'"}


def _piece_text(piece: str) -> str:
    """A token's text as it joins the text before it ('▁' = a space); a byte token's ASCII character."""
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    return chr(int(byte.group(1), 16)) if byte and int(byte.group(1), 16) < 128 else piece


@lru_cache(maxsize=4096)
def _is_word(piece: str) -> bool:
    """Whether a token's text ('▁car') is a word on its own, which a story may mean as itself."""
    from storygpt.text.measures import known_word

    text = piece.lstrip("\u2581").lower()
    return text in ("a", "i") or (len(text) > 1 and text.isalpha() and known_word(text))
