"""TinyStories-Instruct: the prompt format of instruction-following story models, and the checks of
what a user asks for.

A record is a few `Field: value` lines, then `Story:` and the story (the format of the paper's
TinyStories-Instruct text release):

    Features: Dialogue
    Character: a dog named Max
    Words: dog, ball, happy
    Random sentence: The dog ran to the park.
    Story: Once upon a time, ...

or one natural-language request in place of the fields:

    Request: Write a story about a dog that uses the words ball and happy.
    Story: Once upon a time, ...

The prompt is everything up to and including `Story:`; the story is what the model writes (and the
only part that carries the training loss). A model directory that was fine-tuned on such records says
so in its config.json (`storygpt.instruct`, see `INSTRUCT_INFO`).
"""

from __future__ import annotations

import re

from storygpt.errors import StoryGPTError

STORY = "Story:"
REQUEST = "Request:"
FIELDS = ("Features", "Character", "Words", "Random sentence", "Summary")  # the release's, and Character
FEATURES = ("Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")  # the paper's six
INSTRUCT_INFO = {"format": "tinystories-instruct", "version": 2, "fields": list(FIELDS), "request": REQUEST,
                 "story": STORY}
MAX_WORDS = 8
WORD = r"[A-Za-z][A-Za-z'\-]*"  # a requested word (letters, inner apostrophes and hyphens)
MAX_FIELD_CHARS = 1000

_FEATURE_KEYS = {f.lower(): f for f in FEATURES}


def normalize_features(features) -> list[str]:
    """The paper's feature names for user input: case, spaces, '-' and '_' do not matter
    ("bad ending" -> "BadEnding"). Unknown names are an error naming them and the known ones."""
    if features is None:
        return []
    if isinstance(features, str):
        features = [f for f in re.split(r"[,;]", features)]
    out = []
    for f in features:
        if not isinstance(f, str):
            raise StoryGPTError("features must be text")
        key = re.sub(r"[\s_\-]", "", f).lower()
        if not key:
            continue
        if key not in _FEATURE_KEYS:
            raise StoryGPTError(f"unknown feature {f.strip()!r}; choose from {', '.join(FEATURES)}")
        if _FEATURE_KEYS[key] not in out:
            out.append(_FEATURE_KEYS[key])
    return out


def normalize_words(words) -> list[str]:
    """Required words from a list or a comma-separated string; each one word of letters."""
    if isinstance(words, str):
        words = words.split(",")
    if not isinstance(words, (list, tuple)):
        raise StoryGPTError("words must be a list of words or a comma-separated string")
    out = [w.strip() for w in words if isinstance(w, str) and w.strip()]
    if len(out) != len(words) or not out:
        raise StoryGPTError("the word list is empty (or holds empty words): give words such as dog,ball,happy")
    if len(out) > MAX_WORDS:
        raise StoryGPTError(f"at most {MAX_WORDS} words, got {len(out)}")
    for w in out:
        if not re.fullmatch(WORD, w):
            raise StoryGPTError(f"{w!r} is not a word (letters only, one word each)")
    return out


def _one_line(text: str, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise StoryGPTError(f"the {what} is empty")
    text = " ".join(text.split())
    if len(text) > MAX_FIELD_CHARS:
        raise StoryGPTError(f"the {what} is longer than {MAX_FIELD_CHARS} characters")
    return text


def header_prompt(words=None, sentence: str | None = None, features=None, summary: str | None = None,
                  order: list[str] | None = None, character: str | None = None) -> str:
    """The prompt for a story with these requirements, in the release's field format, ending with
    `Story:`. `order` lists field names (default: FIELDS' order); at least one requirement is needed."""
    values = {}
    if features is not None:
        feats = normalize_features(features)
        if feats:
            values["Features"] = ", ".join(feats)
    if character is not None:
        values["Character"] = _one_line(character, "character")
    if words is not None:
        values["Words"] = ", ".join(normalize_words(words))
    if sentence is not None:
        values["Random sentence"] = _one_line(sentence, "sentence")
    if summary is not None:
        values["Summary"] = _one_line(summary, "summary")
    if not values:
        raise StoryGPTError("an instruction needs words, a sentence, features, a character or a summary")
    lines = [f"{name}: {values[name]}" for name in (order or FIELDS) if name in values]
    return "\n".join(lines) + "\n" + STORY


def request_prompt(request: str) -> str:
    """The prompt for a request in plain language ("Write a story about a dog ...")."""
    return f"{REQUEST} {_one_line(request, 'request')}\n{STORY}"


def split_record(text: str) -> tuple[str, str] | None:
    """(prompt, story) of an instruct record: the prompt ends with the first line-initial `Story:`,
    the story is the rest (its leading space removed). None when the text is a plain story."""
    m = re.search(r"(?m)^Story:[ \t]*\n?", text)
    if m is None:
        return None
    head = text[:m.start()]
    if head.strip() and not all(_is_field_line(line) for line in head.strip().splitlines() if line.strip()):
        return None
    prompt = "\n".join(line.strip() for line in head.strip().splitlines() if line.strip())
    prompt = (prompt + "\n" if prompt else "") + STORY
    return prompt, text[m.end():].strip()


def _is_field_line(line: str) -> bool:
    name, sep, _ = line.strip().partition(":")
    return bool(sep) and (name in FIELDS or name + ":" == REQUEST)


def json_record(obj: dict, story: str) -> str | None:
    """The record text of a TinyStories JSON release object with an `instruction` field
    ({"prompt": ..., "words": [...], "features": [...], "summary"?}); None when it has none."""
    ins = obj.get("instruction")
    if not isinstance(ins, dict):
        return None
    fields = {}
    feats = [f for f in ins.get("features") or [] if isinstance(f, str)]
    if feats:
        fields["Features"] = ", ".join(_FEATURE_KEYS.get(re.sub(r"[\s_\-]", "", f).lower(), f) for f in feats)
    words = [w for w in ins.get("words") or [] if isinstance(w, str)]
    if words:
        fields["Words"] = ", ".join(words)
    summary = obj.get("summary") or ins.get("summary")
    if isinstance(summary, str) and summary.strip():
        fields["Summary"] = " ".join(summary.split())
    if not fields:
        return None
    return "\n".join(f"{k}: {v}" for k, v in fields.items()) + f"\n{STORY} {story.strip()}"


def is_instruct(info: dict) -> bool:
    """Whether a model's recorded info (config.json's `storygpt` section) says it follows instructions."""
    return isinstance(info.get("instruct"), dict)


def require_instruct(info: dict, path: str = "this model") -> None:
    if not is_instruct(info):
        raise StoryGPTError(f"{path} is not an instruction-tuned model: words, sentence and features need one "
                            "(storygpt finetune on `storygpt data instruct` records, or --model instruct)")
