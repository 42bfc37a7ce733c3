"""The quality a model directory carries with it, as a table for people.

`storygpt eval --text FILE --record` keeps bits per byte in config.json (storygpt.evals[FILE]) and
`storygpt eval --suite stories --record` keeps the story-quality suite's measures (storygpt.suite);
`record_previous` keeps the figures of the model a new one replaces (storygpt.previous: a list, the model
it replaced first, then the ones that one had replaced), so that the web app can show them side by side.
`quality_rows` turns these records into rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from storygpt.errors import StoryGPTError
from storygpt.model.model_dir import edit_model_info, read_model_info

# (row label, how to read it from the suite's measures, which way is better)
MEASURES: tuple[tuple[str, Callable[[dict], float], str], ...] = (
    ("held-out bits/byte", lambda m: m["bits_per_byte"], "lower"),
    ("cloze (consistency items)", lambda m: m["cloze"]["accuracy"], "higher"),
    ("continuation (true ending found)", lambda m: m["continuation"]["accuracy"], "higher"),
    ("names kept", lambda m: m["names"], "higher"),
    ("prompt's names used again", lambda m: m["names_reused"], "higher"),
    ("grammar (minimal pairs)", lambda m: m["grammar"]["accuracy"], "higher"),
    ("stories that end", lambda m: m["ended"], "higher"),
    ("repeated 4-grams", lambda m: m["repetition"], "lower"),
    ("misspelt words", lambda m: m["spelling"], "lower"),
    ("distinct bigrams", lambda m: m["distinct_2"], "higher"),
)


def measures_of(info: dict) -> dict[str, float]:
    """{row label: value} of what a model's `storygpt` config section records; held-out bits per byte
    from the suite, else from a recorded `eval --text` (the first one)."""
    suite = (info.get("suite") or {}).get("measures") or {}
    out = {}
    for label, read, _ in MEASURES:
        try:
            value = read(suite)
        except (KeyError, TypeError):
            continue
        if value is not None:
            out[label] = float(value)
    evals = info.get("evals") or {}
    if "held-out bits/byte" not in out and evals:
        out["held-out bits/byte"] = float(next(iter(evals.values()))["bits_per_byte"])
    return out


def previous_models(info: dict) -> list[dict]:
    """The replaced models a model records, newest first (a single dict in older model directories)."""
    previous = info.get("previous") or []
    return [previous] if isinstance(previous, dict) else list(previous)


def quality_rows(info: dict) -> list[dict]:
    """One row per measure this model or a model it replaced records: {"measure", "this model", each
    replaced model's name: its value, "better": "lower"/"higher"}; values rounded to 3 decimals, None
    where a model lacks the measure."""
    mine = measures_of(info)
    theirs = [(p.get("name", "previous model"), measures_of(p)) for p in previous_models(info)]
    rows = []
    for label, _, better in MEASURES:
        if label not in mine and not any(label in m for _, m in theirs):
            continue
        row = {"measure": label, "this model": _round(mine.get(label))}
        for name, measures in theirs:
            row[name] = _round(measures.get(label))
        rows.append(row | {"better": better})
    return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def record_previous(model_dir: str | os.PathLike, old_dir: str | os.PathLike, name: str) -> None:
    """Keep the recorded figures (evals, suite) of `old_dir`, the model `model_dir` replaces, in
    `model_dir`'s config.json as the first of storygpt.previous, named `name`, followed by the models
    `old_dir` itself had replaced."""
    old_info = read_model_info(old_dir)
    previous = {"name": name, **{k: old_info[k] for k in ("evals", "suite") if k in old_info}}
    if len(previous) == 1:
        raise StoryGPTError(f"{old_dir}: records no figures (eval --record, eval --suite stories --record)")
    previous["suite"] = {"measures": previous.get("suite", {}).get("measures", {})}
    chain = [previous] + [p for p in previous_models(old_info) if p.get("name") != name]
    edit_model_info(model_dir, lambda info: info.update(previous=chain))
