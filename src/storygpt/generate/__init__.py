"""Generation: sampling, continuous batching, guided decoding, the `StoryModel` API and the decoding engine.

- story_model.py: `load` and `StoryModel` (generate, stream, score); sampling.py: `SamplingOptions` and the filters;
- batching.py: stories decoded together in the slots of one KV cache; guide.py: decoding toward an instruction;
- engine.py: `Engine`, one decoding thread per model that the server and the app share.
"""

from .engine import Engine, QueueFull
from .sampling import MAX_NEW_TOKENS, SamplingOptions
from .story_model import StoryModel, StoryStart, instruction_header, load

__all__ = ["Engine", "MAX_NEW_TOKENS", "QueueFull", "SamplingOptions", "StoryModel", "StoryStart",
           "instruction_header", "load"]
