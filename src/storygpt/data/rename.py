"""Character renaming: stories whose characters' names are replaced, consistently within each story.

TinyStories reuses a few names (Lily, Tim, Tom, Sue, ...) in a large share of its stories, so a small
model learns a strong prior for them and, when sampling, sometimes writes "Lily" in the middle of a
story about Lucy. Renaming the characters of a share of the training stories with names drawn from
thousands (same gender, the same new name for every use in a story) makes the prior for any one name
weak: the only way to predict a character's name after its first use is to copy it from the context.

Gender comes from Faker's English first-name lists (all `en_*` locales); a name found in neither or both
lists (Spot, Billy) is left as it is, so pronouns still agree. `storygpt data rename` writes the result in
TinyStories .txt format, for `storygpt data prepare`.
"""
from __future__ import annotations

import importlib
import pkgutil
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from storygpt.errors import StoryGPTError
from storygpt.text.measures import known_word, names
from storygpt.text.stories import check_inputs, expand_inputs, iter_stories, write_stories

SIMPLE_NAME = re.compile(r"[A-Z][a-z]{1,11}")


@dataclass(frozen=True)
class NamePool:
    """First names by gender: `female`/`male` say a name's gender, `female_new`/`male_new` are the
    replacements (sorted, so draws depend only on the seed)."""
    female: frozenset[str]
    male: frozenset[str]
    female_new: tuple[str, ...]
    male_new: tuple[str, ...]

    def gender(self, name: str) -> str | None:
        f, m = name in self.female, name in self.male
        return "female" if f and not m else "male" if m and not f else None

    def replacements(self, gender: str) -> tuple[str, ...]:
        return self.female_new if gender == "female" else self.male_new


@lru_cache(maxsize=1)
def name_pool() -> NamePool:
    """Faker's English first names; replacements are single simple words that are not English words
    (no "Will", "Hope" or "May") and have one gender."""
    try:
        import faker.providers.person as person
    except ImportError:  # pragma: no cover - faker is a dependency
        raise StoryGPTError("renaming needs the faker package: pip install faker") from None
    female: set[str] = set()
    male: set[str] = set()
    for module in pkgutil.iter_modules(person.__path__):
        if module.name.startswith("en"):
            provider = importlib.import_module(f"{person.__name__}.{module.name}").Provider
            female |= set(getattr(provider, "first_names_female", ()))
            male |= set(getattr(provider, "first_names_male", ()))

    def new(own: set[str], other: set[str]) -> tuple[str, ...]:
        return tuple(sorted(n for n in own - other if SIMPLE_NAME.fullmatch(n) and not known_word(n.lower())))

    return NamePool(frozenset(female), frozenset(male), new(female, male), new(male, female))


def rename_characters(story: str, rng: random.Random, pool: NamePool | None = None) -> str:
    """The story with each character whose gender the pool knows renamed (the same new name for every
    use, possessives included); new names are distinct and not already in the story."""
    pool = pool or name_pool()
    mapping: dict[str, str] = {}
    for name in names(story):
        gender = pool.gender(name)
        if gender is None:
            continue
        choices = pool.replacements(gender)
        for _ in range(100):
            new = rng.choice(choices)
            if new not in mapping.values() and not re.search(rf"\b{new}\b", story):
                mapping[name] = new
                break
    if not mapping:
        return story
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    return pattern.sub(lambda m: mapping[m.group()], story)


def renamed_stories(stories: Iterator[str], share: float, seed: int, counts: dict) -> Iterator[str]:
    """Each story, renamed with probability `share` (story i's draws depend only on seed and i)."""
    pool = name_pool()
    for i, story in enumerate(stories):
        rng = random.Random(f"{seed}:{i}")
        counts["stories"] += 1
        if rng.random() < share:
            new = rename_characters(story, rng, pool)
            counts["renamed"] += new != story
            story = new
        yield story


def build(inputs: list[str], out: str, share: float = 0.5, seed: int = 0, field: str | None = None) -> dict:
    """Write OUT (TinyStories .txt format): every story of `inputs`, a `share` of them with their
    characters renamed. Returns counts (stories, renamed)."""
    if not 0.0 <= share <= 1.0:
        raise StoryGPTError(f"--share must be in [0, 1], got {share}")
    files = expand_inputs(inputs)
    check_inputs(files, field)
    counts = {"stories": 0, "renamed": 0}

    write_stories(out, renamed_stories(iter_stories(files, field), share, seed, counts))
    return counts
