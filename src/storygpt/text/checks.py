"""Checks of whether a story honours an instruction: a word (in any of its forms), a sentence, dialogue, a main
character. The data builder (storygpt.data.instruct), guided decoding and the instruction-following benchmark
share them.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .measures import names as story_names

POS = ("NOUN", "VERB", "ADJ")
# words too plain to be a requirement (the release's words are content words of a children's vocabulary)
PLAIN = set("""be have do say go get make can will would could should may might must let see know want look come
take give think tell feel like put keep try need thing way lot time day one bit kind sure next other many much
mom dad mommy daddy mum mother father friend end yes no okay ok oh""".split())
# function words that lemminflect's lexicon lists as nouns (pronouns, determiners, wh-words)
PLAIN |= set("""i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it
its itself we us our ours ourselves they them their theirs themselves this that these those all both each every
some any none few more most another such who whom whose what which where when why how something anything nothing
everything someone anyone everyone nobody somebody anybody everybody there here""".split())
QUOTE = r"[\"\u201c\u201d]"
_SENTENCE = re.compile(r"[^.!?]+[.!?]+[\"\u201d]?")
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


# --------------------------------------------------------------------------------------------
# What a story contains
# --------------------------------------------------------------------------------------------
def has_dialogue(story: str) -> bool:
    """Quoted speech: a pair of quotation marks around at least two words."""
    return re.search(QUOTE + r"[^\"\u201c\u201d]*\w+\W+\w+[^\"\u201c\u201d]*" + QUOTE, story) is not None


def sentences(story: str) -> list[str]:
    """The story's sentences (ending with . ! or ?, a closing quote kept with its sentence)."""
    return [s.strip() for s in _SENTENCE.findall(story) if s.strip()]


def content_words(story: str) -> dict[str, list[str]]:
    """{part of speech: lemmas} of the story's words whose part of speech lemminflect can tell
    (one of NOUN, VERB, ADJ and no other), without names and plain words; in order of appearance."""
    from lemminflect import getAllLemmas  # imported when used: `import storygpt` stays light

    names = {n.lower() for n in story_names(story)}  # the suite's detector of characters' names
    out: dict[str, list[str]] = {p: [] for p in POS}
    seen = set()
    words = [w.lower() for w in _WORD.findall(story)]
    for i, w in enumerate(words):
        if w in seen or w in names or len(w) < 3:
            continue
        lemmas = getAllLemmas(w)
        pos = _tell_pos(lemmas, words[i - 1] if i else "")
        if pos is None:
            continue
        seen.add(w)
        lemma = lemmas[pos][0]
        if lemma not in PLAIN and lemma.isalpha() and all(lemma not in v for v in out.values()):
            out[pos].append(lemma)
    return out


NOUN_BEFORE = set("a an the my your his her its our their this that some every each one two three".split())
VERB_BEFORE = set("i you he she we they to".split())


def _tell_pos(lemmas: dict, before: str) -> str | None:
    """The part of speech when it is clear: the only reading the lexicon has, or for a word that is
    both a noun and a verb (ball, jump), noun after a determiner and verb after a subject pronoun or "to"."""
    readings = [p for p in lemmas if p in POS]
    if len(lemmas) == 1 and readings:
        return readings[0]
    if set(lemmas) == {"NOUN", "VERB"}:
        if before in NOUN_BEFORE:
            return "NOUN"
        if before in VERB_BEFORE:
            return "VERB"
    return None


@lru_cache(maxsize=4096)
def inflections(word: str) -> frozenset[str]:
    """The word and its regular and irregular forms (jump: jumps, jumped, jumping), lower case."""
    from lemminflect import getAllInflections, getAllLemmas

    w = word.lower()
    forms = {w}
    for lemma_forms in getAllLemmas(w).values():
        for lemma in lemma_forms:
            forms.add(lemma.lower())
            for infl in getAllInflections(lemma).values():
                forms.update(f.lower() for f in infl)
    for infl in getAllInflections(w).values():
        forms.update(f.lower() for f in infl)
    return frozenset(forms)


def contains_word(story: str, word: str) -> bool:
    """Whether the story uses the word, in any of its inflections."""
    words = {w.lower() for w in _WORD.findall(story)}
    return not words.isdisjoint(inflections(word))


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower().replace("\u2019", "'")).split())


def contains_sentence(story: str, sentence: str) -> bool:
    """Whether the story holds the sentence, ignoring case, punctuation and spacing."""
    return f" {_norm(sentence)} " in f" {_norm(story)} "


CHARACTER = re.compile(r"\b(?:[Aa]n?|[Oo]ne)\s+((?:[a-z]+\s+){0,2}?[a-z]+)\s+(?:named|called)\s+([A-Z][a-z]+)\b")
KINDS = set("""girl boy cat dog bird bunny rabbit bear mouse fish frog duck lion monkey elephant puppy kitten fox owl
squirrel turtle pig cow horse sheep butterfly bee bug ant dragon princess prince king queen man woman lady baby kid
child toddler robot car truck train boat plane doll toy teddy giraffe tiger zebra penguin deer wolf hen chicken goat
snake spider ladybug worm snail crab whale dolphin shark seal parrot kangaroo koala panda unicorn fairy monster
giant witch wizard pirate farmer teacher doctor chef dinosaur cub lamb pony donkey goose swan bat beetle""".split())
NOT_KIND = set("a an the one was is were time who that which and there upon very".split())
INTRODUCED = re.compile(r"\b([A-Z][a-z]+)\s+(?:was|is)\s+(?:a|an)\s+((?:[a-z]+\s+){0,2}?([a-z]+))\b")
NAMED_AFTER = re.compile(r"\b(?:a|an)\s+((?:[a-z]+\s+){0,2}?([a-z]+))[.,]?\s+(?:[Hh]is|[Hh]er|[Ii]ts|[Tt]heir)\s+"
                         r"name\s+was\s+([A-Z][a-z]+)\b")


def name_counts(story: str) -> dict[str, int]:
    """{name: times it occurs} of the characters' names in the story (measures.names)."""
    return {n: len(re.findall(rf"\b{n}\b", story)) for n in story_names(story)}


def main_character(story: str) -> str | None:
    """The story's main character as "a cat named Pip" (its kind as the story introduces it, and its name),
    for the story's most used name: "a cat named/called Pip", "Pip was a cat" (the word after the article one of KINDS), or
    "a little cat. Her name was Pip". None when the story introduces none of its names so."""
    counts = name_counts(story)
    if not counts:
        return None
    top = max(counts.values())
    found = [(m.start(), m.group(1), m.group(2)) for m in CHARACTER.finditer(story)]
    found += [(m.start(), m.group(2), m.group(1)) for m in INTRODUCED.finditer(story) if m.group(3) in KINDS]
    found += [(m.start(), m.group(1), m.group(3)) for m in NAMED_AFTER.finditer(story) if m.group(2) in KINDS]
    for _, kind, name in sorted(found):
        if counts.get(name) == top and NOT_KIND.isdisjoint(kind.split()):
            kind = " ".join(kind.split())
            article = "an" if kind[0] in "aeiou" else "a"
            return f"{article} {kind} named {name}"
    return None


def character_parts(character: str) -> tuple[str, str] | None:
    """(kind noun, name) of "a little cat named Pip" -> ("cat", "Pip"); None when it is not in that form."""
    m = re.fullmatch(r"(?:an?|one)\s+((?:[a-z]+\s+)*?)([a-z]+)\s+(?:named|called)\s+([A-Z][a-z]+)", character.strip())
    return (m.group(2), m.group(3)) if m else None


def is_main_character(story: str, character: str) -> bool:
    """Whether the story is about the requested character: its name is the story's most used name and its
    kind (any inflection) is in the story."""
    parts = character_parts(character)
    if parts is None:
        return False
    kind, name = parts
    counts = name_counts(story)
    if name not in counts or counts[name] < max(counts.values()):
        return False
    return contains_word(story, kind)


