"""storygpt: train, evaluate and serve small story-telling language models."""

from .checkpoint import load_model
from .config import RunConfig, TrainConfig
from .errors import StoryGPTError
from .generate import StoryModel, load
from .model import PRESETS, ModelConfig, Transformer
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "RunConfig", "StoryGPTError", "Tokenizer", "TrainConfig", "Transformer",
           "StoryModel", "load", "load_model"]
