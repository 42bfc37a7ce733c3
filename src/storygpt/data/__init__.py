"""Data: stories to training tokens, and the data sets built from stories.

- prepare.py: `prepare` (stories -> shuffled train/val token shards); shards.py: `TokenData`, reading them back;
- epochs.py: batches that walk whole stories epoch by epoch;
- download.py: TinyStories from the Hugging Face Hub; rename.py: stories with their characters renamed;
- instruct.py: TinyStories-Instruct records from plain stories.
"""

from .download import download_tinystories
from .epochs import StoryEpochs
from .prepare import prepare
from .shards import TokenData, read_meta

__all__ = ["StoryEpochs", "TokenData", "download_tinystories", "prepare", "read_meta"]
