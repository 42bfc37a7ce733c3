"""Grammar minimal pairs in TinyStories' vocabulary, to grade small story models offline.

Like BLiMP, but in words a 3-4 year old knows. Each pair is a grammatical sentence and an
ungrammatical one that differ in exactly one word:

    good: "The dogs near the tree are happy."     bad: "The dogs near the tree is happy."

A model gets a pair right when it gives the good sentence a higher log-likelihood than the bad one.
Six phenomena (PHENOMENA), each built from at least four templates filled from the word lists below:
subject-verb agreement, a/an, pronoun case, irregular past tense, determiner-noun number and
reflexive-antecedent agreement. Every template's candidates are enumerated in a fixed order, shuffled
with random.Random(seed) and taken round-robin over the templates, so the output is deterministic for
(per_phenomenon, seed) and no single construction dominates. Pure Python, no dependencies.

Words are chosen so the rules are unambiguous: no vowel letter with a consonant sound (unicorn, one),
no silent h (hour), no nouns alike in both numbers (sheep, fish), no singular nouns ending in "s", and
no regularised past that is a real word (seed, singed, flied, hided).
"""

from __future__ import annotations

import random

PHENOMENA = ("agreement", "a_an", "pronoun_case", "irregular_past", "determiner_noun", "reflexive")

NAMES = {"Lily": "f", "Tom": "m", "Mia": "f", "Ben": "m", "Sue": "f", "Max": "m", "Anna": "f", "Tim": "m", "Lucy": "f", "Sam": "m"}
ANIMALS = [("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("frog", "frogs"), ("bunny", "bunnies"),
           ("duck", "ducks"), ("puppy", "puppies"), ("mouse", "mice"), ("bear", "bears")]
KIDS = [("boy", "boys"), ("girl", "girls"), ("child", "children")]
TOYS = [("ball", "balls"), ("kite", "kites"), ("box", "boxes"), ("hat", "hats"), ("book", "books"), ("doll", "dolls"),
        ("block", "blocks")]
FOODS = [("cookie", "cookies"), ("apple", "apples"), ("cake", "cakes"), ("carrot", "carrots"), ("banana", "bananas")]
PLACES = ["park", "garden", "forest", "beach", "farm", "pond", "zoo", "store"]  # after "to the"
PLAY_PLACES = ["in the park", "in the garden", "in the yard", "at the beach", "at the farm", "at the zoo", "by the pond", "in the snow"]
FEELINGS = ["happy", "sad", "hungry", "tired", "sleepy", "scared"]
COLORS = ["red", "blue", "green", "yellow", "pink"]
EVENTS = ["party", "long walk", "big storm", "game"]
DISLIKES = ["carrots", "peas", "baths", "the rain", "the dark"]
NEAR = ["near the tree", "by the pond", "under the big trees", "next to the boxes", "in the garden"]
PRONOUNS = [("I", "me"), ("he", "him"), ("she", "her"), ("we", "us"), ("they", "them")]  # (subject, object)
TIMES = ["Yesterday", "Last week", "One day"]
# Irregular past -> its regularised form, none of which is an English word.
IRREGULAR = {"ran": "runned", "went": "goed", "came": "comed", "rode": "rided", "ate": "eated", "drank": "drinked",
             "made": "maked", "bought": "buyed", "found": "finded", "threw": "throwed", "caught": "catched",
             "broke": "breaked", "drew": "drawed", "wrote": "writed", "won": "winned", "took": "taked", "held": "holded",
             "swam": "swimmed", "slept": "sleeped", "sat": "sitted", "fell": "falled", "flew": "flyed"}
PAST_OBJECTS = {"ate": ["an apple", "a cookie", "the cake", "some soup"], "drank": ["some milk", "the juice", "a glass of water"],
                "made": ["a cake", "a sandwich", "a sandcastle", "a card"], "bought": ["a new ball", "some candy", "a red hat"],
                "found": ["a shiny rock", "a big shell", "the lost kite"], "threw": ["the ball", "a stick"],
                "caught": ["the ball", "a big fish"], "broke": ["the cup", "a plate", "the toy car"],
                "drew": ["a picture", "a big sun", "a cat"], "wrote": ["a letter", "a card"], "won": ["the race", "a prize"],
                "took": ["a nap", "a bath"], "held": ["the puppy", "the kitten"]}
PAST_PLACES = {"swam": ["in the pond", "in the lake", "in the sea"], "slept": ["in the tent", "on the couch"],
               "sat": ["on the bench", "on the grass"], "fell": ["in the mud", "off the swing"]}
ANIMAL_PAST = [("bird", "flew", ["to the tree", "over the house"]), ("duck", "swam", ["in the pond", "to the other side"]),
               ("dog", "ran", ["to the park", "after the ball"]), ("cat", "slept", ["on the bed", "in the sun"]),
               ("frog", "sat", ["on a rock", "on a big leaf"]), ("bunny", "ate", ["a carrot", "the grass"]),
               ("mouse", "ate", ["the cheese", "a cookie"]), ("bear", "found", ["some honey", "a big fish"])]
WHEN_PAST = [("fell", "off the swing", ["cried", "felt sad"]), ("broke", "the cup", ["cried", "said sorry"]),
             ("won", "the race", ["smiled", "jumped up and down"]), ("found", "the lost kite", ["smiled", "felt happy"]),
             ("caught", "the ball", ["laughed", "felt proud"]), ("drew", "a picture", ["showed it to Mom"])]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _swap(template: str, good: str, bad: str) -> tuple[str, str]:
    """Fill the "_" slot of a template with the good word and with the bad one."""
    return template.replace("_", good), template.replace("_", bad)


def _article(template: str) -> tuple[str, str]:
    """(good, bad) for a template whose "_" is an article: "an" exactly before a vowel letter."""
    vowel = template.split("_ ", 1)[1][0] in "aeiou"
    return _swap(template, "an", "a") if vowel else _swap(template, "a", "an")


def _he(name: str) -> str:
    return "he" if NAMES[name] == "m" else "she"


def _his(name: str) -> str:
    return "his" if NAMES[name] == "m" else "her"


def _subjects() -> list[tuple[str, bool]]:
    """(subject, is_plural): names, "the little dog", "the dogs", "Tom and Lily"."""
    names = list(NAMES)
    nouns = ANIMALS + KIDS
    return ([(n, False) for n in names] + [(f"the little {sg}", False) for sg, _ in nouns]
            + [(f"{a} and {b}", True) for a, b in zip(names, names[1:] + names[:1])] + [(f"the {pl}", True) for _, pl in nouns])


def _agreement() -> dict[str, list[tuple[str, str]]]:
    def agree(t: str, sg: str, pl: str, plural: bool) -> tuple[str, str]:
        return _swap(t, pl, sg) if plural else _swap(t, sg, pl)
    subj = _subjects()
    verbs = [(sg, pl, [f"to the {p}" for p in PLACES]) for sg, pl in (("runs", "run"), ("walks", "walk"), ("goes", "go"))]
    verbs.append(("plays", "play", PLAY_PLACES))
    heads = [(w, i == 1) for pair in ANIMALS + KIDS for i, w in enumerate(pair)]
    return {
        "present": [agree(f"{s} _ {where}.", sg, pl, n) for s, n in subj for sg, pl, wheres in verbs for where in wheres],
        "is_are": [agree(f"{s} _ {f}.", "is", "are", n) for s, n in subj for f in FEELINGS],
        "was_were": [agree(f"{s} _ {f} after the {e}.", "was", "were", n) for s, n in subj for f in FEELINGS for e in EVENTS],
        "has_have": [agree(f"{s} _ a {c} {t}.", "has", "have", n) for s, n in subj for c in COLORS for t, _ in TOYS],
        "does_do": [agree(f"{s} _ not like {x}.", "does", "do", n) for s, n in subj for x in DISLIKES],
        "attractor": [agree(f"the {w} {pp} _ {f}.", sg, pl, n) for w, n in heads for pp in NEAR
                      for sg, pl in (("is", "are"), ("was", "were")) for f in FEELINGS],
    }


def _a_an() -> dict[str, list[tuple[str, str]]]:
    foods = ["apple", "egg", "orange", "banana", "cookie", "pear", "carrot", "cupcake"]
    animals = ["owl", "ant", "eagle", "elephant", "dog", "cat", "bird", "frog", "duck", "bunny", "bear", "puppy"]
    things = ["ball", "box", "hat", "kite", "shell", "rock", "egg"]
    adjs = ["old", "orange", "big", "little", "shiny", "red", "small"]
    gifts = ["puppy", "kitten", "bike", "drum", "red kite", "big cake", "airplane", "orange ball", "elephant toy", "owl"]
    names = list(NAMES)
    return {
        "food": [_article(f"{n} {v} _ {f}.") for n in names for v in ("ate", "wanted", "picked up", "found") for f in foods],
        "animal": [_article(f"{n} saw _ {a} {loc}.") for n in names for a in animals
                   for loc in ("in the forest", "near the river", "on the hill", "by the lake")],
        "adjective": [_article(f"{n} found _ {a} {t}.") for n in names for a in adjs for t in things
                      if (a, t) not in (("old", "egg"), ("orange", "egg"))],
        "named": [_article(f"there was _ {a} {an} named {n}.") for n in names for an in animals
                  for a in ("old", "angry", "little", "big", "happy", "kind")],
        "birthday": [_article(f"{n} wanted _ {g} for {_his(n)} birthday.") for n in names for g in gifts],
    }


def _pronoun_case() -> dict[str, list[tuple[str, str]]]:
    names = list(NAMES)
    gifts = ["a hug", "a cookie", "a flower", "a big smile", "a toy"]
    with_ = ["played with _", "sat next to _", "waved to _"]
    return {
        "indirect_object": [_swap(f"{n} gave _ {g}.", o, s) for n in names for s, o in PRONOUNS for g in gifts],
        "subject": [_swap(f"_ {v}.", s, o) for s, o in PRONOUNS
                    for v in [f"{w} to the {p}" for w in ("went", "ran") for p in PLACES] + [f"played {p}" for p in PLAY_PLACES]],
        "preposition": [_swap(f"{n} {w} {p}.", o, s) for n in names for s, o in PRONOUNS for w in with_ for p in PLAY_PLACES[:5]],
        "object": [_swap(f"{n} {v} _ {loc}.", o, s) for n in names for s, o in PRONOUNS for v in ("saw", "met", "found")
                   for loc in ("at the park", "in the garden", "at the beach", "near the pond")],
        "embedded_subject": [_swap(f"{n} {v} when _ {what}.", _he(n), "him" if _he(n) == "he" else "her") for n in names
                             for v in ("smiled", "laughed", "clapped") for what in
                             ["saw the " + a for a, _ in ANIMALS] + ["found the " + t for t, _ in TOYS]],
    }


def _irregular_past() -> dict[str, list[tuple[str, str]]]:
    names = list(NAMES)
    return {
        "motion": [_swap(f"{t}, {n} _ to the {p}.", v, IRREGULAR[v]) for t in TIMES for n in names
                   for v in ("ran", "went", "came", "rode") for p in PLACES],
        "object": [_swap(f"{t}, {n} _ {o}.", v, IRREGULAR[v]) for t in TIMES for n in names
                   for v, objs in PAST_OBJECTS.items() for o in objs],
        "place": [_swap(f"{n} _ {loc} yesterday.", v, IRREGULAR[v]) for n in names for v, locs in PAST_PLACES.items() for loc in locs],
        "animal": [_swap(f"{t}, the {adj} {a} _ {x}.", v, IRREGULAR[v]) for t in TIMES for adj in ("little", "big", "happy")
                   for a, v, xs in ANIMAL_PAST for x in xs],
        "when": [_swap(f"when {n} _ {x}, {_he(n)} {r}.", v, IRREGULAR[v]) for n in names for v, x, rs in WHEN_PAST for r in rs],
    }


def _determiner_noun() -> dict[str, list[tuple[str, str]]]:
    names = list(NAMES)
    pets = [a for a in ANIMALS if a[0] != "bear"]
    owned = {"has": TOYS + pets, "saw": ANIMALS + KIDS, "ate": FOODS, "found": TOYS}
    adjs = [(TOYS, COLORS + ["big", "new"]), (ANIMALS, ["hungry", "sleepy", "small", "cute"]), (FOODS, ["yummy", "sweet", "big"])]
    there = [(("duck", "ducks"), ["pond", "park"]), (("frog", "frogs"), ["pond"]), (("bird", "birds"), ["tree", "sky"]),
             (("flower", "flowers"), ["garden", "park"]), (("child", "children"), ["park"]), (("cookie", "cookies"), ["jar", "box"]),
             (("toy", "toys"), ["box", "room"]), (("mouse", "mice"), ["house", "barn"]), (("apple", "apples"), ["tree", "basket"])]
    out: dict[str, list[tuple[str, str]]] = {"numeral": [], "demonstrative_subject": [], "demonstrative_object": [], "there": []}
    for n in names:
        for v, nouns in owned.items():
            for sg, pl in nouns:
                out["numeral"] += [_swap(f"{n} {v} {'an' if sg[0] in 'aeiou' else 'a'} _.", sg, pl), _swap(f"{n} {v} one _.", sg, pl)]
                out["numeral"] += [_swap(f"{n} {v} {d} _.", pl, sg) for d in ("two", "three", "many")]
        for frame in ("wants to play with", "likes", "is looking at"):
            for sg, pl in TOYS + ANIMALS:
                out["demonstrative_object"] += [p for d, ds in (("this", "these"), ("that", "those"))
                                                for p in (_swap(f"{n} {frame} _ {sg}.", d, ds), _swap(f"{n} {frame} _ {pl}.", ds, d))]
    for nouns, words in adjs:
        for sg, pl in nouns:
            for d, ds in (("this", "these"), ("that", "those")):
                out["demonstrative_subject"] += [p for a in words
                                                 for p in (_swap(f"{d} _ is {a}.", sg, pl), _swap(f"{ds} _ are {a}.", pl, sg))]
    for (sg, pl), places in there:
        for p in places:
            art = "an" if sg[0] in "aeiou" else "a"
            out["there"] += [_swap(f"there is {d} _ in the {p}.", sg, pl) for d in (art, "one")]
            out["there"] += [_swap(f"there are {d} _ in the {p}.", pl, sg) for d in ("two", "three", "many", "some")]
    return out


def _reflexive() -> dict[str, list[tuple[str, str]]]:
    names = list(NAMES)
    own = {"m": "himself", "f": "herself"}
    wrong = {"m": ["herself", "itself", "myself"], "f": ["himself", "itself", "myself"]}
    groups = [f"the {pl}" for _, pl in KIDS] + ["the twins"] + [f"{a} and {b}" for a, b in zip(names, names[1:] + names[:1])]
    plural_bad = ["himself", "herself", "itself", "myself"]
    frames = ("taught _ to swim", "hurt _ on the slide", "looked at _ in the mirror", "wrapped _ in a blanket")
    return {
        "saw": [_swap(f"{n} saw _ in the {x}.", own[g], b) for n, g in NAMES.items()
                for x in ("mirror", "water", "pond", "window", "puddle") for b in wrong[g]],
        "made": [_swap(f"{n} made _ a {x}.", own[g], b) for n, g in NAMES.items() for x in ("sandwich", "snack", "paper hat", "crown")
                 for b in wrong[g]],
        "group": [_swap(f"{s} {v}.", "themselves", b) for s in groups for v in ("washed _ in the bath", "dried _ in the sun") + frames
                  for b in plural_bad],
        "animal": [p for sg, pl in ANIMALS for v in ("licked _ clean", "hid _ behind the tree", "dried _ in the sun")
                   for p in [_swap(f"the {sg} {v}.", "itself", b) for b in ("themselves", "myself", "ourselves")]
                   + [_swap(f"the {pl} {v}.", "themselves", b) for b in plural_bad]],
        "frames": [_swap(f"{n} {v}.", own[g], b) for n, g in NAMES.items() for v in frames for b in wrong[g]],
    }


_BUILDERS = {"agreement": _agreement, "a_an": _a_an, "pronoun_case": _pronoun_case, "irregular_past": _irregular_past,
             "determiner_noun": _determiner_noun, "reflexive": _reflexive}


def grammar_pairs(per_phenomenon: int = 100, seed: int = 0) -> list[dict]:
    """[{"good": str, "bad": str, "phenomenon": str}, ...] — deterministic for (per_phenomenon, seed).

    per_phenomenon pairs for each of PHENOMENA, in that order, all distinct; within a phenomenon the
    templates take turns (in a seeded order), so they are used as evenly as their sizes allow.
    Raises ValueError if per_phenomenon is negative or more than the templates can give.
    """
    if per_phenomenon < 0:
        raise ValueError(f"per_phenomenon must be >= 0, got {per_phenomenon}")
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[tuple[str, str]] = set()  # membership only: never iterated, so hash order cannot leak into the output
    for phenomenon in PHENOMENA:
        groups = []
        for candidates in _BUILDERS[phenomenon]().values():
            group = list(dict.fromkeys((_cap(g), _cap(b)) for g, b in candidates))
            rng.shuffle(group)
            groups.append(group)
        rng.shuffle(groups)
        picked: list[tuple[str, str]] = []
        while len(picked) < per_phenomenon and any(groups):
            for group in groups:
                while group and len(picked) < per_phenomenon:
                    pair = group.pop()
                    if pair not in seen:
                        seen.add(pair)
                        picked.append(pair)
                        break
        if len(picked) < per_phenomenon:
            raise ValueError(f"{phenomenon}: the templates give only {len(picked)} distinct pairs, asked for {per_phenomenon}")
        rng.shuffle(picked)
        out += [{"good": g, "bad": b, "phenomenon": phenomenon} for g, b in picked]
    return out
