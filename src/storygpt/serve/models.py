"""The models a server has: loaded from `[NAME=]DIR` specs, named after their folders or NAME ("default" and
"instruct" are the shipped models, storygpt-default and storygpt-instruct)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from storygpt.errors import StoryGPTError
from storygpt.generate.story_model import StoryModel, load
from storygpt.model.load import instruct_model_installed

DEFAULT_MODEL_NAME = "storygpt-default"
INSTRUCT_MODEL_NAME = "storygpt-instruct"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def model_name(path: str | os.PathLike | None) -> str:
    if path is None or str(path) == "default":
        return DEFAULT_MODEL_NAME
    return INSTRUCT_MODEL_NAME if str(path) == "instruct" else Path(path).resolve().name


def load_models(specs: Sequence[str | os.PathLike | None] | None, device: str = "auto",
                dtype: str = "auto", compile: bool = False) -> dict[str, StoryModel]:
    """Load `[NAME=]DIR` model specs, named by NAME or the folder's name. None or no specs: the shipped model,
    and the shipped instruct model after it when it is installed."""
    models: dict[str, StoryModel] = {}
    if not specs:
        specs = [None] + (["instruct"] if instruct_model_installed() else [])
    for spec in specs:
        name, path = None, spec
        if isinstance(spec, str) and "=" in spec and NAME_RE.fullmatch(spec.split("=", 1)[0]):
            name, path = spec.split("=", 1)
        name = name or model_name(path)
        if name in models:
            raise StoryGPTError(f"two models are named {name!r}; name them with NAME=DIR")
        models[name] = load(path, device=device, dtype=dtype, compile=compile)
    return models


def check_names(models: Mapping[str, StoryModel]) -> None:
    if not models:
        raise StoryGPTError("serve needs at least one model")
    for name in models:
        if not NAME_RE.fullmatch(name) or ".." in name:
            raise StoryGPTError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (at most 64); "
                                f"name it with NAME=DIR")
