"""Grammar minimal pairs: counts, determinism, one-word minimality, and each phenomenon's rule checked
independently of the generator (word shapes, not its tables)."""

from collections import Counter

import pytest

from storygpt.eval import minimal_pairs
from storygpt.eval.minimal_pairs import PHENOMENA, grammar_pairs

GENDER = {"Lily": "f", "Tom": "m", "Mia": "f", "Ben": "m", "Sue": "f", "Max": "m", "Anna": "f", "Tim": "m", "Lucy": "f", "Sam": "m"}
IRREGULAR_PLURALS = {"mice", "children", "twins"}
SUBJECT_FORMS = {"i": "me", "he": "him", "she": "her", "we": "us", "they": "them"}
REAL_WORDS = {"seed", "singed", "ringed", "flied", "hided", "digged", "builded", "laid", "lied", "fined", "wound"}


@pytest.fixture(scope="module")
def pairs():
    return grammar_pairs()


def by(pairs, phenomenon):
    return [p for p in pairs if p["phenomenon"] == phenomenon]


def words(sentence):
    return sentence[:-1].replace(",", "").split()


def diff(pair):
    """(index, good word, bad word) of the one position where the two sentences differ."""
    g, b = words(pair["good"]), words(pair["bad"])
    (i,) = [i for i in range(len(g)) if g[i] != b[i]]
    return i, g[i], b[i]


def is_plural(noun):
    return noun in IRREGULAR_PLURALS or noun.endswith("s")


def test_counts_and_distinct(pairs):
    assert len(pairs) == 600
    assert Counter(p["phenomenon"] for p in pairs) == {ph: 100 for ph in PHENOMENA}
    assert all(set(p) == {"good", "bad", "phenomenon"} for p in pairs)
    assert len({(p["good"], p["bad"]) for p in pairs}) == 600
    assert all(p["good"] != p["bad"] for p in pairs)
    assert all(s[0].isupper() and s.endswith(".") and s.count(".") == 1 for p in pairs for s in (p["good"], p["bad"]))


def test_other_sizes():
    assert Counter(p["phenomenon"] for p in grammar_pairs(37, seed=3)) == {ph: 37 for ph in PHENOMENA}
    assert grammar_pairs(0) == []
    with pytest.raises(ValueError):
        grammar_pairs(100_000)
    with pytest.raises(ValueError):
        grammar_pairs(-1)


def test_templates_are_varied(pairs):
    """At least four templates per phenomenon, and the 100 pairs are spread evenly over them."""
    for ph in PHENOMENA:
        templates = minimal_pairs._BUILDERS[ph]()
        assert len(templates) >= 4, ph
        template_of = {}
        for name, candidates in templates.items():
            assert all(g != b for g, b in candidates), (ph, name)
            template_of.update({(g[0].upper() + g[1:], b[0].upper() + b[1:]): name for g, b in candidates})
        used = Counter(template_of[p["good"], p["bad"]] for p in by(pairs, ph))
        assert set(used) == set(templates), (ph, used)
        assert max(used.values()) <= 100 // len(templates) + 1, (ph, used)


def test_deterministic(pairs):
    assert grammar_pairs() == pairs
    assert grammar_pairs(100, seed=0) == pairs
    assert grammar_pairs(seed=1) != pairs
    assert grammar_pairs(seed=1) == grammar_pairs(seed=1)


def test_exactly_one_word_differs(pairs):
    for p in pairs:
        assert len(words(p["good"])) == len(words(p["bad"])), p
        diff(p)  # raises unless exactly one position differs


def test_articles_in_every_good_sentence(pairs):
    """Across all phenomena, a good sentence uses "an" exactly before a vowel letter."""
    for p in pairs:
        w = [x.lower() for x in words(p["good"])]
        for art, nxt in zip(w, w[1:]):
            if art in ("a", "an"):
                assert (art == "an") == (nxt[0] in "aeiou"), p


def test_a_an(pairs):
    ps = by(pairs, "a_an")
    for p in ps:
        i, good, bad = diff(p)
        assert {good.lower(), bad.lower()} == {"a", "an"}, p
        nxt = words(p["good"])[i + 1]
        assert (good.lower() == "an") == (nxt[0] in "aeiou"), p
    goods = [diff(p)[1].lower() for p in ps]
    assert 20 <= goods.count("an") <= 80
    # an adjective between the article and the noun, both ways round: "an old bear", "a big egg"
    assert any(" an old " in p["good"] for p in ps)
    assert any(f" a {adj} " in p["good"] for p in ps for adj in ("big", "little", "small", "shiny", "red", "happy", "kind"))


def test_agreement(pairs):
    ps = by(pairs, "agreement")
    verbs, with_pp = Counter(), 0
    for p in ps:
        i, good, bad = diff(p)
        subject = words(p["good"])[:i]
        for prep in ("near", "by", "under", "next", "in"):
            if prep in subject:
                subject = subject[:subject.index(prep)]
        plural = "and" in subject or is_plural(subject[-1])
        # the singular form of every verb used ends in -s: is, was, has, does, runs, goes...
        assert good.endswith("s") != plural, p
        assert bad.endswith("s") == plural, p
        verbs[good] += 1
        with_pp += len(subject) < i
    for v in ("is", "are", "was", "were", "has", "have", "does", "do"):
        assert verbs[v] > 0, verbs
    assert sum(n for v, n in verbs.items() if v not in ("is", "are", "was", "were", "has", "have", "does", "do")) > 0
    assert with_pp >= 10  # "The dogs near the tree are happy."


def test_pronoun_case(pairs):
    for p in by(pairs, "pronoun_case"):
        i, good, bad = diff(p)
        w = words(p["good"])
        subject_position = i == 0 or w[i - 1] == "when"
        if subject_position:
            assert SUBJECT_FORMS.get(good.lower()) == bad.lower(), p
        else:
            assert SUBJECT_FORMS.get(bad.lower()) == good.lower(), p
        if w[i - 1] == "when":  # "Lily smiled when she saw the dog": the pronoun is the name's
            assert good == {"m": "he", "f": "she"}[GENDER[w[0]]], p
    positions = Counter(diff(p)[0] == 0 for p in by(pairs, "pronoun_case"))
    assert positions[True] >= 10 and positions[False] >= 10


def test_irregular_past(pairs):
    for p in by(pairs, "irregular_past"):
        _, good, bad = diff(p)
        assert bad.endswith("ed") and not good.endswith("ed"), p
        assert bad not in REAL_WORDS, p
        s = p["good"]
        assert s.startswith(("Yesterday, ", "Last week, ", "One day, ", "When ")) or s.endswith(" yesterday."), p
    known = {("ran", "runned"), ("ate", "eated"), ("went", "goed"), ("swam", "swimmed"), ("drank", "drinked")}
    seen = {diff(p)[1:] for p in grammar_pairs(300) if p["phenomenon"] == "irregular_past"}
    assert known <= seen


def test_determiner_noun(pairs):
    singular_dets = {"a", "an", "one", "this", "that"}
    plural_dets = {"two", "three", "many", "some", "these", "those"}
    for p in by(pairs, "determiner_noun"):
        i, good, bad = diff(p)
        w = [x.lower() for x in words(p["good"])]
        if good.lower() in singular_dets | plural_dets:  # the determiner was swapped: "this balls"
            det, noun = good.lower(), w[i + 1]
            assert bad.lower() in singular_dets | plural_dets, p
        else:  # the noun was swapped: "two cat"
            det, noun = w[i - 1], good
            assert is_plural(noun) != is_plural(bad), p
        assert det in singular_dets | plural_dets, p
        assert is_plural(noun) == (det in plural_dets), p
    assert any(" mice" in p["good"] or " children" in p["good"]
               for p in grammar_pairs(300) if p["phenomenon"] == "determiner_noun")


def test_reflexive(pairs):
    for p in by(pairs, "reflexive"):
        i, good, bad = diff(p)
        w = words(p["good"])
        assert good.endswith(("self", "selves")) and bad.endswith(("self", "selves")), p
        if "and" in w[:i] or w[0] == "The" and is_plural(w[1]):
            assert good == "themselves", p
        elif w[0] in GENDER:
            assert good == {"m": "himself", "f": "herself"}[GENDER[w[0]]], p
        else:  # "The cat licked itself clean."
            assert w[0] == "The" and good == "itself", p
