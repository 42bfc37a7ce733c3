"""Text: stories, tokenizers and the instruct format, with the checks of a story that need no model (no torch).

- tokenizer.py: `Tokenizer` (SentencePiece unigram/BPE, or characters) and `train_tokenizer`;
- stories.py: reading and writing TinyStories .txt and JSON/JSONL files;
- instruct.py: the TinyStories-Instruct record and prompt format;
- checks.py: whether a story holds a word, a sentence, dialogue, a main character;
- measures.py: measures of generated text (repetition, loops, diversity, spelling, names).
"""

from .checks import contains_sentence, contains_word, has_dialogue, is_main_character, main_character
from .instruct import FEATURES, FIELDS, header_prompt, is_instruct, request_prompt, split_record
from .stories import check_inputs, expand_inputs, iter_stories, write_stories
from .tokenizer import EOS_TEXT, Tokenizer, train_tokenizer

__all__ = ["EOS_TEXT", "FEATURES", "FIELDS", "Tokenizer", "check_inputs", "contains_sentence", "contains_word",
           "expand_inputs", "has_dialogue", "header_prompt", "is_instruct", "is_main_character", "iter_stories",
           "main_character", "request_prompt", "split_record", "train_tokenizer", "write_stories"]
