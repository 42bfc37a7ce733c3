"""`storygpt data instruct`: plain stories -> TinyStories-Instruct records.

Each record takes from its own story: `Words:` three words of it (a noun, a verb and an adjective
where the part of speech is unambiguous in lemminflect's lexicon, as lemmas: "jumped" -> jump),
`Random sentence:` one of its sentences, `Features: Dialogue` when it has quoted speech (the one
feature of the paper's six that text shows reliably), `Character:` its main character when it names one.
Which fields appear, and their order, are drawn at random from a seeded generator; a share of the records
(`request_share`) states the same requirements as one natural-language request instead ("Write a story that
uses the words ...").
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

from storygpt.errors import StoryGPTError
from storygpt.text.checks import POS, QUOTE, content_words, has_dialogue, main_character, sentences
from storygpt.text.instruct import FIELDS, header_prompt, request_prompt


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
def pick_words(story: str, rng: random.Random, n: int = 3) -> list[str]:
    """n content words of the story: one per part of speech first (noun, verb, adjective, where the
    story has them), then any others; empty when the story has fewer than n."""
    by_pos = content_words(story)
    chosen = [rng.choice(by_pos[p]) for p in POS if by_pos[p]]
    rest = [w for p in POS for w in by_pos[p] if w not in chosen]
    rng.shuffle(rest)
    chosen = (chosen + rest)[:n]
    if len(chosen) < n:
        return []
    rng.shuffle(chosen)
    return chosen


def pick_sentence(story: str, rng: random.Random) -> str | None:
    """A sentence of 4 to 25 words that holds no quotation mark (a whole line the model can copy)."""
    good = [s for s in sentences(story) if 4 <= len(s.split()) <= 25 and not re.search(QUOTE, s)]
    return rng.choice(good) if good else None


def requirements(story: str, rng: random.Random) -> dict:
    """What a record built from this story may ask for: words, sentence, features, the main character (each
    may be absent)."""
    found = {"words": pick_words(story, rng), "sentence": pick_sentence(story, rng),
             "features": ["Dialogue"] if has_dialogue(story) else [], "character": main_character(story)}
    return {k: v for k, v in found.items() if v}


def _listing(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def request_text(req: dict, rng: random.Random) -> str:
    """One natural-language request for these requirements, from varied templates."""
    parts = []
    if "words" in req:
        parts.append(rng.choice(["use{s} the words {w}", "include{s} the words {w}", "use{s} the words: {w}",
                                 "contain{s} the words {w}"]).replace("{w}", _listing(req["words"])))
    if "sentence" in req:
        parts.append(rng.choice(["include{s} the sentence \"{x}\"", "contain{s} the sentence \"{x}\"",
                                 "use{s} the sentence \"{x}\"", "ha{s} the sentence \"{x}\" in it"])
                     .replace("{x}", req["sentence"]))
    if "features" in req:
        parts.append(rng.choice(["ha{s} dialogue", "ha{s} some dialogue", "ha{s} characters talking to each other"]))
    rng.shuffle(parts)
    third = [p.replace("ha{s}", "has").replace("{s}", "s") for p in parts]
    base = [p.replace("ha{s}", "have").replace("{s}", "") for p in parts]
    kind = rng.choice(["a story", "a short story", "a story for a child", "a bedtime story", "a simple story"])
    if "character" in req:
        kind += " " + rng.choice(["about", "about", "starring", "with"]) + " " + req["character"]
    if not parts:
        return rng.choice([f"Write {kind}.", f"Can you tell me {kind}?", f"Please write {kind}.",
                           f"I would like {kind}.", f"Tell me {kind}."])
    templates = [
        lambda: f"Write {kind} that {_listing(third)}.",
        lambda: f"Can you tell me {kind} that {_listing(third)}?",
        lambda: f"Please write {kind}. It should {_listing(base)}.",
        lambda: f"I would like {kind} that {_listing(third)}.",
        lambda: f"Tell me {kind} that {_listing(third)}.",
        lambda: f"Could you make up {kind}? It must {_listing(base)}.",
    ]
    return rng.choice(templates)()


def make_record(story: str, rng: random.Random, request_share: float = 0.5) -> str | None:
    """An instruct record of one story (prompt + " " + story), or None when nothing can be asked of it."""
    story = story.strip()
    req = requirements(story, rng)
    keep = {k: v for k, v in req.items() if rng.random() < 0.75}
    if not keep and req:
        k = rng.choice(sorted(req))
        keep = {k: req[k]}
    if not keep:
        return None
    if rng.random() < request_share:
        prompt = request_prompt(request_text(keep, rng))
    else:
        order = list(FIELDS)
        rng.shuffle(order)
        prompt = header_prompt(words=keep.get("words"), sentence=keep.get("sentence"),
                               features=keep.get("features"), character=keep.get("character"), order=order)
    return f"{prompt} {story}"


def build(inputs: list[str], out: str, seed: int = 0, request_share: float = 0.5, copies: int = 1,
          field: str | None = None) -> dict:
    """Write OUT: TinyStories-Instruct records (TinyStories .txt format, `<|endoftext|>` lines between
    records) for every story of `inputs`, `copies` records per story (different draws). Returns counts."""
    from storygpt.text.stories import check_inputs, expand_inputs, iter_stories, write_stories

    if not 0.0 <= request_share <= 1.0:
        raise StoryGPTError(f"--request-share must be in [0, 1], got {request_share}")
    if copies < 1:
        raise StoryGPTError(f"--copies must be >= 1, got {copies}")
    files = expand_inputs(inputs)
    check_inputs(files, field)
    counts = {"stories": 0, "records": 0, "skipped": 0}

    def records() -> Iterator[str]:
        for i, story in enumerate(iter_stories(files, field)):
            counts["stories"] += 1
            rng = random.Random(f"{seed}:{i}")
            for _ in range(copies):
                record = make_record(story, rng, request_share)
                if record is None:
                    counts["skipped"] += 1
                    continue
                counts["records"] += 1
                yield record

    write_stories(out, records())
    if counts["records"] == 0:
        Path(out).unlink()
        raise StoryGPTError("no story gave an instruction record (too short?)")
    return counts
