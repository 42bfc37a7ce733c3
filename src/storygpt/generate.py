"""Story generation: the `StoryModel` Python API (`storygpt.load()`) that the CLI, the web app and the
HTTP API share. Decoding runs in a `Batcher` (batching.py: KV-cached, batched, streaming text); the
sampling filters and options are in sampling.py.

Context: a story starts after an end-of-story token, then the prompt. When prompt + story outgrow
the model's context, decoding slides: the cache is refilled with the most recent half-context of
tokens and the story goes on (a prompt longer than the context keeps its last tokens). The text
returned is always the full prompt plus everything generated.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import torch

from .checkpoint import default_model_path, load_model, trained_context
from .device import DTYPES, maybe_compile, pick_device, pick_dtype, supports_dtype
from .errors import StoryGPTError
from .batching import Batcher, Done, Piece, Story
from .model import Transformer
from .sampling import MAX_NEW_TOKENS, SamplingOptions  # noqa: F401 - also storygpt.generate's API
from .sampling import apply_repetition_penalty, sample_next, top_k_filter, top_p_filter  # noqa: F401
from .tokenizer import Tokenizer

MAX_SAMPLES = 64


# --------------------------------------------------------------------------------------------
# The model users talk to
# --------------------------------------------------------------------------------------------
class StoryModel:
    """A loaded model + tokenizer that writes stories. Create it with `storygpt.load()`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, info: dict | None = None, path: str = "",
                 compile: bool = False):
        self.model, self.tokenizer, self.info, self.path = model.eval(), tokenizer, info or {}, path
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # activations, cache
        self.weights = getattr(model, "quantized", None) or str(self.dtype).removeprefix("torch.")  # e.g. int8
        self.context = trained_context(model.cfg, self.info)
        self.last_stats: dict = {}
        # one compiled graph per token (Transformer.decode_rows over the whole cache, see batching.py); compiles
        # on first use, per batch size (powers of two)
        self.decode_step = None
        if compile:
            self.decode_step = _frozen(maybe_compile(model.decode_rows, self.device, dynamic=False), self.device,
                                       freezing=self.weights != "int8")

    # --- public API ------------------------------------------------------------------------
    def generate(self, prompt: str = "", num_samples: int | None = None, **options) -> str | list[str]:
        """The prompt followed by a generated story (a list of `num_samples` of them if given).

        Options: max_new_tokens=256, temperature=0.8 (0 = greedy), top_k=0 (off), top_p=0.95,
        repetition_penalty=1.0, seed=None, stop=[] (strings that end the story, not included),
        ignore_eos=False (True: never end early, always max_new_tokens tokens; for benchmarks).
        """
        n = 1 if num_samples is None else num_samples
        texts = [prompt] * n
        for i, piece in self._run(prompt, n, SamplingOptions(**options)):
            texts[i] += piece
        return texts[0] if num_samples is None else texts

    def stream(self, prompt: str = "", **options) -> Iterator[str]:
        """Yield the prompt, then the story piece by piece as it is generated (same options)."""
        yield prompt
        for _, piece in self._run(prompt, 1, SamplingOptions(**options)):
            yield piece

    def stream_samples(self, prompt: str = "", num_samples: int = 1, stats: dict | None = None,
                       **options) -> Iterator[tuple[int, str]]:
        """Yield (sample index, new text) for `num_samples` stories decoded in one batch, without the
        prompt. `stats` (a dict), if given, receives this call's speed figures when it ends: the
        thread-safe alternative to `last_stats` for servers running several calls at once."""
        return self._run(prompt, num_samples, SamplingOptions(**options), stats)

    def warm_up(self) -> None:
        """Decode two tokens, so that a compiled model (compile=True) compiles now, for one story at a
        time, rather than in its first user's story."""
        self.generate("", temperature=0, max_new_tokens=2, ignore_eos=True)

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes as a prompt (without the start-of-story token)."""
        return len(self.encode_prompt(text)) - 1

    def facts(self) -> dict:
        return {"path": self.path, "params": self.model.num_params(), "context": self.context,
                "device": str(self.device), "dtype": self.weights,
                "vocab_size": self.tokenizer.vocab_size, **{k: v for k, v in self.info.items() if k != "train"}}

    # --- decoding --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise StoryGPTError("prompt must be text")
        return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)

    @torch.inference_mode()
    def _run(self, prompt: str, n: int, opts: SamplingOptions,
             stats: dict | None = None) -> Iterator[tuple[int, str]]:
        """Yield (sample index, new text) as tokens are decoded, for n samples in one batch: one story in a
        `Batcher` of its own (the engine the HTTP server and the web app share, see batching.py)."""
        if not 1 <= n <= MAX_SAMPLES:
            raise StoryGPTError(f"num_samples must be in [1, {MAX_SAMPLES}], got {n}")
        events: list = []
        story = Story(self, prompt, n, opts, events.append)
        batcher = Batcher(self, slots=n)
        batcher.add(story)
        figures: dict = {}
        while batcher.stories:
            batcher.step()
            for event in events:
                if isinstance(event, Piece):
                    yield event
                elif isinstance(event, Done):
                    figures = event.stats
            events.clear()
        self.last_stats = figures
        if stats is not None:
            stats.update(figures)


def _frozen(step, device: torch.device, freezing: bool = True):
    """The compiled `step`, compiled with inductor's freezing on: the weights become constants of the
    graph, prepacked for oneDNN on CPU (1.2x the tokens/s at batch 1 here); on CPU also with a C++
    wrapper around the graph's kernels instead of Python (another 1.15x). The options are set only
    around the first call for each batch size (the call that compiles), under a lock, never globally:
    a model compiled for training elsewhere in the process is not frozen, and threads decoding with
    already compiled shapes never wait. Decoding never changes the weights. int8 weights are compiled
    without freezing: it would fold their dequantization into fp32 copies (int8's memory saving lost)."""
    options = {"freezing": freezing, "cpp_wrapper": device.type == "cpu"}
    compiled_shapes: set = set()
    lock = threading.Lock()

    def call(idx: torch.Tensor, *args) -> torch.Tensor:
        if idx.shape in compiled_shapes:
            return step(idx, *args)
        with lock, torch._inductor.config.patch(options):
            logits = step(idx, *args)
            compiled_shapes.add(idx.shape)
            return logits
    return call


def load(path: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto",
         compile: bool = False) -> StoryModel:
    """Load a model directory or run directory (default: the model shipped with storygpt).

    compile=True decodes each token with one torch.compile'd graph: faster per token once compiled
    (the first story per batch size pays the compile, seconds to a minute): for servers and benchmarks.

    dtype: "auto" (default) keeps the weights in bf16 where the hardware computes bf16 natively (a
    decoded token reads every weight once, so half the bytes is up to twice the speed; held-out loss
    moves in the 6th digit) and fp32 elsewhere; or fp32, bf16, fp16 where the device supports them.
    "int8" (CPU): weight-only int8 matrices (storygpt.quantize), fp32 activations: 1/4 of the weights'
    bytes for a small loss in held-out bits/byte; slower than fp32 on AVX2-only CPUs (see the README).
    """
    if path is None:
        path = default_model_path()
    dev = pick_device(device)
    if dtype == "auto":
        dtype = pick_dtype(dev, "auto")
    if dtype == "int8":
        from .quantize import quantize_int8

        if dev.type != "cpu":
            raise StoryGPTError(f"int8 weights are for decoding on CPU; on {dev.type} use --dtype fp16 or bf16")
        model, tokenizer, info = load_model(path, device=dev, dtype=torch.float32)
        return StoryModel(quantize_int8(model), tokenizer, info, str(path), compile=compile)
    if dtype not in DTYPES:
        raise StoryGPTError(f"dtype must be auto, fp32, bf16, fp16 or int8, got {dtype!r}")
    if not supports_dtype(dev, dtype) and not (dev.type == "cpu" and dtype == "bf16"):
        raise StoryGPTError(f"{dtype} is not supported on {dev.type}")
    model, tokenizer, info = load_model(path, device=dev, dtype=DTYPES[dtype])
    return StoryModel(model, tokenizer, info, str(path), compile=compile)
