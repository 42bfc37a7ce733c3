"""What the command groups' parsers share: the parser class that turns argparse's errors into one line and exit
code 2, and the suite's sampling options."""

from __future__ import annotations

import argparse

from storygpt.errors import StoryGPTError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        raise StoryGPTError(f"{self.prog}: {message}")


def suite_sampling(parser) -> None:
    """--temperature, --top-p, --max-new-tokens with the story-quality suite's defaults (the paper's sampling):
    `eval --suite` and `data sample`, which samples as the suite does."""
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
