"""Reading stories: TinyStories .txt files (stories separated by `<|endoftext|>` lines) and JSON/JSONL
files (one object per story, the story in a field), streamed one story at a time; and writing them back
as TinyStories .txt (`write_stories`, for the commands that turn stories into other stories).

With `instruct=True`, a JSON record of the TinyStories release that carries an `instruction` field
(`words`, `features`, and a `summary`) is read as a TinyStories-Instruct record (instruct.json_record);
.txt files in the Instruct text format need no option: a record is plain text either way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from storygpt.errors import StoryGPTError

from .instruct import json_record
from .tokenizer import EOS_TEXT

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".json", ".jsonl")
FIELDS = ("story", "text")


# --------------------------------------------------------------------------------------------
def expand_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus the .txt/.json/.jsonl files found (recursively) in folders."""
    if not paths:
        raise StoryGPTError("no input given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
            if not found:
                raise StoryGPTError(f"{p}: folder has no .txt, .json or .jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise StoryGPTError(f"{p}: no such file or folder")
    for f in files:
        if f.stat().st_size == 0:
            raise StoryGPTError(f"{f}: file is empty")
    return files


def check_inputs(files: list[Path], field: str | None = None) -> None:
    """Fail fast, before any work, on a text file without separators or a JSON file without the field."""
    for f in files:
        if f.suffix in JSON_SUFFIXES:
            next(iter_stories([f], field), None)
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                if not any(line.rstrip("\r\n") == EOS_TEXT for line in fh):
                    raise StoryGPTError(
                        f"{f}: no '{EOS_TEXT}' separator line found (TinyStories .txt format expected)")


def iter_stories(files: list[Path], field: str | None = None, instruct: bool = False) -> Iterator[str]:
    """Yield story texts from TinyStories .txt files and JSON/JSONL files, one at a time (instruct: JSON
    records with an `instruction` field as TinyStories-Instruct records)."""
    for f in files:
        if f.suffix in JSON_SUFFIXES:
            yield from _json_stories(f, field, instruct)
        else:
            yield from _text_stories(f)


def write_stories(path: str | os.PathLike, stories: Iterable[str]) -> None:
    """Write `stories` to `path` in TinyStories .txt format (each followed by an `<|endoftext|>` line),
    atomically: a failure part-way leaves `path` as it was."""
    from storygpt.files import atomic_write  # torch comes with it: reading stories does not need it

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for story in stories:
                fh.write(f"{story}\n{EOS_TEXT}\n")

    atomic_write(path, write)


def _text_stories(path: Path) -> Iterator[str]:
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.rstrip("\r\n") == EOS_TEXT:
                    story = "".join(lines).strip()
                    lines.clear()
                    if story:
                        yield story
                else:
                    lines.append(line)
    except UnicodeDecodeError as e:
        raise StoryGPTError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    story = "".join(lines).strip()
    if story:
        yield story


def _json_records(path: Path) -> Iterator[object]:
    """Records of a JSONL file, or of a JSON file holding one array, parsed incrementally."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as fh:
        buf, pos, eof, in_array = "", 0, False, None
        while True:
            # skip whitespace and array punctuation
            while pos < len(buf) and buf[pos] in " \t\r\n,]":
                pos += 1
            if in_array is None and pos < len(buf):
                in_array = buf[pos] == "["
                if in_array:
                    pos += 1
                continue
            if pos >= len(buf) or (not eof and len(buf) - pos < 1 << 16):
                if eof:
                    return
                chunk = fh.read(1 << 20)
                eof = not chunk
                buf = buf[pos:] + chunk
                pos = 0
                continue
            try:
                record, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof:  # an object may be split across reads: read more and retry
                    chunk = fh.read(1 << 20)
                    eof = not chunk
                    buf = buf[pos:] + chunk
                    pos = 0
                    continue
                raise StoryGPTError(f"{path}: invalid JSON ({e.msg})") from None
            yield record


def _json_stories(path: Path, field: str | None, instruct: bool = False) -> Iterator[str]:
    try:
        for n, record in enumerate(_json_records(path)):
            if not isinstance(record, dict):
                raise StoryGPTError(f"{path}: record {n + 1} is not a JSON object")
            key = field or next((k for k in FIELDS if k in record), None)
            if key is None or key not in record:
                wanted = repr(field) if field else " or ".join(map(repr, FIELDS))
                have = ", ".join(sorted(map(str, record))) or "none"
                raise StoryGPTError(f"{path}: record {n + 1} has no field {wanted} (fields: {have}); use --field")
            text = record[key]
            if not isinstance(text, str):
                raise StoryGPTError(f"{path}: record {n + 1} field {key!r} is not a string")
            text = text.strip()
            if text and instruct:
                text = json_record(record, text) or text
            if text:
                yield text
    except UnicodeDecodeError as e:
        raise StoryGPTError(f"{path}: not UTF-8 text ({e.reason})") from None
