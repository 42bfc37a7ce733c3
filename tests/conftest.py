"""Shared fixtures (a seeded generator of simple stories, a tokenizer and prepared data made from it, a tiny run)
and helpers (`run_cli`, `running`: an app served on a loopback port, `wait_until`).

Tests never train on ../shared: everything they train on is generated here (only tests/convert/test_import.py looks
there, for llama2.c's stories260K, and skips without it).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from storygpt.cli.main import main
from storygpt.data.prepare import prepare
from storygpt.serve import listen
from storygpt.text.tokenizer import EOS_TEXT, train_tokenizer

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Tim", "Lucy", "Sam"]
ANIMALS = ["dog", "cat", "bird", "frog", "bunny", "bear", "duck", "fish"]
PLACES = ["park", "garden", "forest", "house", "beach", "farm", "river", "hill"]
THINGS = ["ball", "kite", "box", "hat", "cake", "toy", "flower", "book"]
FEELINGS = ["happy", "sad", "excited", "scared", "tired", "proud"]


def make_story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, place, thing, feeling = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(THINGS), rng.choice(FEELINGS)
    lines = [
        f"Once upon a time, there was a little {animal} named {name}.",
        f"{name} liked to play in the {place} with a red {thing}.",
        f"One day, {name} met {friend}. {friend} said, \"Can I play with your {thing}?\"",
    ]
    if rng.random() < 0.5:
        lines.append(f"{name} was {feeling}, but {name} shared the {thing} with {friend}.")
    else:
        lines.append(f"{name} said, \"Yes! Let's play together in the {place}.\"")
    lines.append(f"They played all day and became best friends. {name} was very {feeling}.")
    text = " ".join(lines)
    if rng.random() < 0.3:
        text += f"\nThe end of the day came, and {friend} went home."
    return text


def make_stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_story(rng) for _ in range(n)]


def write_tinystories(path: Path, stories: list[str]) -> Path:
    path.write_text("".join(f"{s}\n{EOS_TEXT}\n" for s in stories), encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `storygpt ARGV` in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def stories() -> list[str]:
    return make_stories(400, seed=0)


@pytest.fixture(scope="session")
def story_file(tmp_path_factory, stories) -> Path:
    return write_tinystories(tmp_path_factory.mktemp("text") / "stories.txt", stories)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, stories) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(stories, vocab_size=320, type="unigram").save(out)
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, story_file, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare([story_file], tokenizer_dir, out, val_fraction=0.1, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir) -> Path:
    """A tiny model trained for a few seconds on the generated stories."""
    from storygpt.train.pretrain import train

    run = tmp_path_factory.mktemp("tinyrun") / "run"
    train(data_dir, run, preset="tiny", max_steps=150, progress=False, overrides=["eval_interval=50", "eval_iters=2"])
    return run


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
