"""Measures of generated stories that need no model: repetition, loops, diversity, spelling and names.

Each takes plain text (a completion, without its prompt) and returns a number; the suite averages them
over the completions of the paper's 44 story beginnings. Words are lowercased runs of letters, digits
and apostrophes (`words`).
"""

from __future__ import annotations

import re
from functools import lru_cache

WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repetition(text: str, n: int = 4) -> float | None:
    """Share of the text's word n-grams that repeat an earlier one of the same text (None: no n-gram).
    "a b c d a b c d" has five 4-grams, of which one ("a b c d" again) is a repeat: 0.2."""
    grams = ngrams(words(text), n)
    if not grams:
        return None
    return (len(grams) - len(set(grams))) / len(grams)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def loops(text: str, min_words: int = 4) -> bool:
    """True when a sentence of at least `min_words` words occurs twice (compared by its words, so case
    and punctuation do not matter): the model went round in a circle."""
    seen = set()
    for s in sentences(text):
        key = tuple(words(s))
        if len(key) < min_words:
            continue
        if key in seen:
            return True
        seen.add(key)
    return False


def distinct(texts: list[str], n: int = 2) -> float | None:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all n-grams of the texts together."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def self_bleu(texts: list[str]) -> float | None:
    """Mean sentence BLEU (sacrebleu, 0-100) of each text against the others as references: high when
    the completions of one prompt are alike."""
    from sacrebleu.metrics import BLEU

    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        return None
    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1:]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores)


@lru_cache(maxsize=1)
def _dictionary():
    from spellchecker import SpellChecker

    return SpellChecker(language="en")


def known_word(word: str) -> bool:
    """Whether a lower-case word is in the English dictionary (pyspellchecker's)."""
    return word in _dictionary()


def misspelled(text: str) -> tuple[int, int]:
    """(words not in the English dictionary (pyspellchecker's), words): numbers and a possessive 's are
    not counted against a word."""
    checked = [w.removesuffix("'s") for w in words(text) if not w.isdigit()]
    if not checked:
        return 0, 0
    unknown = _dictionary().unknown(checked)
    return sum(w in unknown for w in checked), len(checked)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
# Capitalised words that are not a character's name: roles, titles, days, and the closed-class words
# (pronouns, determiners, conjunctions, common sentence openers) that start sentences.
NOT_NAMES = set("""
i mom mommy mum mummy mama momma dad daddy papa dada grandma grandpa granny grandmother grandfather nana
mr mrs ms miss sir madam god santa claus king queen prince princess teacher doctor captain officer
monday tuesday wednesday thursday friday saturday sunday january february march april may june july august
september october november december christmas easter halloween english ok okay oh wow yes no hi hello bye
please thank thanks sorry yay hooray ouch uh um hey look end little big old young
the a an this that these those there here it its he she they we you his her their our your my me him them us
and but or so then when while if because after before as once one two three four five six seven eight nine ten
every each all some many much more most other another no none nothing everyone everybody someone somebody
anyone nobody everything something anything what who where why how which whose
in on at to of for with from by up down out over under into onto through around near inside outside
suddenly finally soon later now today tomorrow yesterday tonight sometimes always never again also just
let lets let's can could will would should do does did don't didn't can't won't is was are were be have has had
""".split())
INTRO = re.compile(r"\b(?:named|called|name is|name was|name's)\s*$", re.IGNORECASE)
NAME_VERB = re.compile(r"^(?:'s\b|\s+(?:said|asked|replied|shouted|cried|smiled|laughed|nodded|felt|was|is|had|has|and)\b)")
CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")
OPENING = re.compile(r"(?:^|[.!?:;\n]|[.!?,:]?[\"'])\s*$")


def names(text: str) -> list[str]:
    """Characters' names in the text, in order of first use: capitalised words that are not
    NOT_NAMES and stand inside a sentence, or open a sentence and are used inside one elsewhere in
    the text, or open a sentence followed by 'said', 'was', ''s', ... ("Timmy was sad.")."""
    found: dict[str, None] = {}
    opening: list[tuple[str, int]] = []
    for m in CAPITALISED.finditer(text):
        word = m.group()
        if word.lower() in NOT_NAMES:
            continue
        if OPENING.search(text[:m.start()]):
            opening.append((word, m.end()))
        else:
            found[word] = None
    for word, end in opening:
        if word in found or NAME_VERB.match(text[end:]):
            found[word] = None
    order = {w: text.find(w) for w in found}
    return sorted(found, key=order.get)


def new_names(prompt: str, completion: str) -> list[str]:
    """Names the completion brings in that no prompt character has and that it does not introduce
    ("a girl named Sue", "his name was Max"): each one means the story renamed someone (Bruno becomes Ted)."""
    text = prompt + completion
    found = []
    for name in names(text):
        if re.search(rf"\b{name}\b", prompt):  # one of the prompt's characters
            continue
        first = text.find(name, len(prompt))
        while first >= 0 and (first > 0 and text[first - 1].isalpha()):
            first = text.find(name, first + 1)
        if first >= 0 and not INTRO.search(text[:first]):
            found.append(name)
    return found


def keeps_names(prompt: str, completion: str) -> bool:
    """True unless the completion brings in a name that no prompt character has and that it does not
    introduce (see new_names)."""
    return not new_names(prompt, completion)


def reuses_names(prompt: str, completion: str) -> bool | None:
    """Whether the completion names one of the prompt's characters again (None when the prompt names none):
    a story can keep its names (keeps_names) by never using them; this measures the other half."""
    given = names(prompt)
    if not given:
        return None
    return any(re.search(rf"\b{re.escape(name)}\b", completion) for name in given)
