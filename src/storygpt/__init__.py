"""storygpt: train, evaluate and serve small story-telling language models.

The package is in layers, each a subpackage whose `__init__` is its API; a layer imports only lower ones:
text -> model -> data -> train -> generate -> eval -> convert -> serve -> app -> cli.
The names below are loaded on first use, so that `import storygpt` stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {  # name -> the module it comes from
    "Tokenizer": "storygpt.text", "ModelConfig": "storygpt.model", "PRESETS": "storygpt.model",
    "Transformer": "storygpt.model", "load_model": "storygpt.model", "RunConfig": "storygpt.train",
    "TrainConfig": "storygpt.train", "StoryModel": "storygpt.generate", "load": "storygpt.generate",
    "StoryGPTError": "storygpt.errors",
}
__all__ = sorted(_API)
_LAYERS = ("text", "model", "data", "train", "generate", "eval", "convert", "serve", "app", "cli")


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    if name in _LAYERS:
        return import_module(f"storygpt.{name}")
    raise AttributeError(f"module 'storygpt' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, *_LAYERS])
