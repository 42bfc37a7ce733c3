"""The `storygpt` command: the top parser and `main`.

Each command group is a module with its parsers and what they do, a thin layer over the Python API:
data.py (tokenizer, data), train.py (train, finetune, average, presets), eval.py, generate.py,
serve.py (serve, app), convert.py (export, import) and web.py (web). Every user error (StoryGPTError) becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from storygpt.errors import StoryGPTError

from .options import Parser

GROUPS = ("data", "train", "eval", "generate", "serve", "convert", "web")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="storygpt", description="Train, evaluate and talk to small story-telling language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:
        import_module(f"storygpt.cli.{group}").add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except StoryGPTError as e:
        print(f"storygpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("storygpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`storygpt generate | head -1`): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush of stdout fails no more
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
