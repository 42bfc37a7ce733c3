"""What the command groups' parsers share: the parser class that turns argparse's errors into one line and exit
code 2, and the options that recur."""

from __future__ import annotations

import argparse

from storygpt.errors import StoryGPTError

DECODE_DTYPES = ["auto", "fp32", "bf16", "fp16", "int8"]  # --dtype of the commands that decode (int8: CPU only)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        raise StoryGPTError(f"{self.prog}: {message}")


def suite_sampling(parser) -> None:
    """--temperature, --top-p, --max-new-tokens with the story-quality suite's defaults (the paper's sampling):
    `eval --suite` and `data sample`, which samples as the suite does."""
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)


def stories_in_out(parser, out_help: str) -> None:
    """--input, --field and --out of the commands that turn stories into other stories (`data rename`,
    `data instruct`)."""
    parser.add_argument("--input", nargs="+", required=True, help="TinyStories .txt, .json/.jsonl files or folders")
    parser.add_argument("--field", default=None, help="JSON field holding the story (default: story, then text)")
    parser.add_argument("--out", required=True, help=out_help)


def listen_options(parser, port: int, port_help: str | None = None) -> None:
    """--host (this machine only by default) and --port of the commands that listen (`serve`, `app`)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=port, help=port_help)
