"""Story generation: the `StoryModel` Python API (`storygpt.load()`) that the CLI, the web app and the
HTTP API share. Decoding runs in a `Batcher` (batching.py: KV-cached, batched, streaming text); the
sampling filters and options are in sampling.py.

Context: a story starts after an end-of-story token, then the prompt. When prompt + story outgrow
the model's context, decoding slides: the cache is refilled with the most recent half-context of
tokens and the story goes on (a prompt longer than the context keeps its last tokens). The text
returned is the full prompt plus everything generated.

Instruction-tuned models (TinyStories-Instruct, see instruct.py) also take requirements: `words`,
`sentence`, `features`, `summary`, or a plain-language `request`. The model then reads the instruction
prompt (`Words: ...` lines ending with `Story:`) and what is returned is the story alone, without the
instruction: the `prompt`, when given, is the story's beginning (written after `Story:`), else the story
starts with the model's first word.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import torch

from storygpt.errors import StoryGPTError
from storygpt.model.device import DTYPES, maybe_compile, pick_device, pick_dtype, supports_dtype
from storygpt.model.load import load_model, shipped_or, trained_context
from storygpt.model.transformer import Transformer
from storygpt.text.instruct import header_prompt, is_instruct, request_prompt, require_instruct
from storygpt.text.tokenizer import Tokenizer

from .batching import Batcher, Done, Piece, Story
from .sampling import SamplingOptions

MAX_SAMPLES = 64
AUTOTUNE_ROWS = 4  # a compiled step of up to this many rows times its matrix products' kernels (`_frozen`)
CPU_AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}  # inductor's options for that
INSTRUCTIONS = ("words", "sentence", "features", "summary", "character", "request")  # generate()'s instruction keywords


def instruction_header(words=None, sentence: str | None = None, features=None, summary: str | None = None,
                       request: str | None = None, character: str | None = None) -> str | None:
    """The instruction part of an instruct model's prompt, ending with `Story:` (None when nothing is asked):
    `request_prompt(request)`, or `header_prompt(words, sentence, features, summary, character=...)`. Raises
    StoryGPTError for unknown features, an empty word list, empty text, or a request together with the other
    fields."""
    fields = {"words": words, "sentence": sentence, "features": features, "summary": summary, "character": character}
    if request is None and all(v is None for v in fields.values()):
        return None
    if request is not None:
        if any(v is not None for v in fields.values()):
            raise StoryGPTError("a request replaces words, sentence, features, summary and character: "
                                "give one or the other")
        return request_prompt(request)
    return header_prompt(**fields)


class StoryStart:
    """Drops the whitespace each sample's story starts with (the space after `Story:`), across its pieces."""

    def __init__(self):
        self.started: set[int] = set()

    def __call__(self, index: int, text: str) -> str:
        if index not in self.started:
            text = text.lstrip()
            if text:
                self.started.add(index)
        return text


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
            dequantizing = any(getattr(m, "packed", True) is False for m in model.modules())  # int8 w/o bf16
            self.decode_step = _frozen(maybe_compile(greedy_step(model, tokenizer.eos_id), self.device, dynamic=False),
                                       self.device, freezing=not dequantizing)

    # --- public API ------------------------------------------------------------------------
    def generate(self, prompt: str = "", num_samples: int | None = None, *, words=None, sentence: str | None = None,
                 features=None, summary: str | None = None, request: str | None = None,
                 character: str | None = None, **options) -> str | list[str]:
        """The prompt followed by a generated story (a list of `num_samples` of them if given).

        Options: max_new_tokens=256, temperature=0.8 (0 = greedy), top_k=0 (off), top_p=0.95,
        repetition_penalty=1.0, seed=None, stop=[] (strings that end the story, not included),
        ignore_eos=False (True: never end early, always max_new_tokens tokens; for benchmarks).

        Instruction-tuned models (`is_instruct`) also take what the story must have: `words` (a list or
        "dog,ball,happy"), `sentence` (to appear in it), `features` (of instruct.FEATURES: "Dialogue",
        "BadEnding", ...), `summary`, `character` (the main character: "a cat named Pip"), or instead a
        plain-language `request` ("Write a story about ...").
        Then the model reads that instruction (`instruct_prompt`) and the story alone is returned, without
        the instruction: it starts with `prompt` when one is given (the story's beginning), else with the
        model's first word. A model that is not instruction-tuned refuses them (StoryGPTError).
        """
        model_prompt, start, fix = self._story(prompt, words, sentence, features, summary, request, character)
        n = 1 if num_samples is None else num_samples
        texts = [start] * n
        for i, piece in self._run(model_prompt, n, SamplingOptions(**options)):
            texts[i] += fix(i, piece) if fix else piece
        return texts[0] if num_samples is None else texts

    def request(self, text: str, num_samples: int | None = None, **options) -> str | list[str]:
        """A story for a plain-language request ("Write a story about a dog who finds a ball"): the story
        alone (instruction-tuned models only; `generate(request=text)`)."""
        return self.generate("", num_samples, request=text, **options)

    def stream(self, prompt: str = "", *, words=None, sentence: str | None = None, features=None,
               summary: str | None = None, request: str | None = None, character: str | None = None,
               **options) -> Iterator[str]:
        """Yield the prompt, then the story piece by piece as it is generated (same options and instructions
        as `generate`; with an instruction, the first piece is the story's beginning, "" without one)."""
        model_prompt, start, fix = self._story(prompt, words, sentence, features, summary, request, character)
        yield start
        for i, piece in self._run(model_prompt, 1, SamplingOptions(**options)):
            piece = fix(i, piece) if fix else piece
            if piece or not fix:
                yield piece

    def stream_samples(self, prompt: str = "", num_samples: int = 1, stats: dict | None = None, *, words=None,
                       sentence: str | None = None, features=None, summary: str | None = None,
                       request: str | None = None, character: str | None = None,
                       **options) -> Iterator[tuple[int, str]]:
        """Yield (sample index, new text) for `num_samples` stories decoded in one batch, without the
        prompt. `stats` (a dict), if given, receives this call's speed figures when it ends: the
        thread-safe alternative to `last_stats` for servers running several calls at once. Instructions as
        for `generate` (the text is then the story's, without the instruction and the story's beginning)."""
        model_prompt, _, fix = self._story(prompt, words, sentence, features, summary, request, character)
        pieces = self._run(model_prompt, num_samples, SamplingOptions(**options), stats)
        if fix is None:
            return pieces
        return ((i, text) for i, piece in pieces if (text := fix(i, piece)))

    @property
    def is_instruct(self) -> bool:
        """Whether the model is instruction-tuned (TinyStories-Instruct): config.json's `storygpt.instruct`."""
        return is_instruct(self.info)

    def instruct_prompt(self, prompt: str = "", words=None, sentence: str | None = None, features=None,
                        summary: str | None = None, request: str | None = None,
                        character: str | None = None) -> str | None:
        """The text an instruction-tuned model reads for a story with these requirements: the instruction
        (instruct.header_prompt or request_prompt, ending with `Story:`), then " " and the story's beginning
        `prompt` if there is one. None when nothing is asked (`prompt` is then a plain story beginning).
        StoryGPTError when this model is not instruction-tuned, or for bad requirements."""
        if all(v is None for v in (words, sentence, features, summary, request, character)):
            return None
        return self._story(prompt, words, sentence, features, summary, request, character)[0]

    def _story(self, prompt, words, sentence, features, summary, request,
               character=None) -> tuple[str, str, StoryStart | None]:
        """(the text the model reads, what the returned story starts with, a StoryStart when the story's first
        whitespace is to be dropped, else None)."""
        if not isinstance(prompt, str):
            raise StoryGPTError("prompt must be text")
        if all(v is None for v in (words, sentence, features, summary, request, character)):
            return prompt, prompt, None
        require_instruct(self.info, self.path or "this model")
        head = instruction_header(words, sentence, features, summary, request, character)
        start = prompt.lstrip()
        return head + (" " + start if start else ""), start, None if start else StoryStart()

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


def greedy_step(net: Transformer, eos_id: int):
    """The step a compiled model runs per token: `net.decode_rows` (one token per row, each at its position,
    over the first `length` cache positions), then each row's greedy token in the same graph, with and
    without the end-of-story token allowed: (logits (B, vocab), top (B,), top without end-of-story (B,)). A
    greedy story takes its token from these (the argmax of the same logits: the same token as eager
    decoding) and skips the sampling code between tokens."""
    def step(idx: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, cache, length: int):
        logits = net.decode_rows(idx, slots, pos, cache, length)[:, -1]
        barred = logits.clone()
        barred[:, eos_id] = float("-inf")
        return logits, logits.argmax(dim=-1), barred.argmax(dim=-1)
    return step


def _frozen(step, device: torch.device, freezing: bool = True):
    """The compiled `step`, compiled with inductor's freezing on: the weights become constants of the
    graph, prepacked for oneDNN on CPU (1.2x the tokens/s at batch 1 here); on CPU also with a C++
    wrapper around the graph's kernels instead of Python (another 1.15x). The options are set only
    around the first call for each batch size and cache length (the call that compiles), under a lock,
    never globally: a model compiled for training elsewhere in the process is not frozen, and threads
    decoding with already compiled shapes never wait. Decoding never changes the weights. int8 weights that
    are dequantized for their products (CPUs without native bf16) are compiled without freezing: it would
    fold the dequantization into fp32 copies (int8's memory saving lost); those multiplied by
    `_weight_int8pack_mm` stay int8 frozen (1.05x the tokens/s of unfrozen at batch 1). Graphs of up to
    AUTOTUNE_ROWS rows also time each matrix product as inductor's C++ GEMM template against aten's kernel and keep
    the faster (1.3x the tokens/s at batch 1 in int8, 1.9x in bf16, 3.3x in fp32; compiling takes longer). One graph
    per (batch size, length): up to 7 x 4 of them per model, and the models of a process share the step's code,
    where dynamo counts them against its recompile limit (8 by default)."""
    # realize_cpu_opcount_threshold: a pointwise result of more than 8 ops is computed once into a buffer; at the
    # default (50) the query's RoPE was fused into the attention's dot products and recomputed for every cached
    # key: 1.6 of a 64-row step's 2.5 ms per layer (bf16, here); 15 -> 10 ms a step, batch 1 unchanged or faster
    options = {"freezing": freezing, "cpp_wrapper": device.type == "cpu", "realize_cpu_opcount_threshold": 8}
    # max_autotune: each matrix product of a graph of up to AUTOTUNE_ROWS rows is timed once as inductor's own C++
    # GEMM template and as aten's kernel, and the faster is kept (here the template: batch 1 int8 1,298 -> 1,686
    # tokens/s, bf16 882 -> 1,548; 4 rows bf16 2.0 -> 1.4 ms a step); at 8 rows and more it was slower in the
    # step (8 rows bf16 2.8 -> 3.4 ms), so bigger batches keep aten's kernels without the timing's compile cost
    tuned = CPU_AUTOTUNE if device.type == "cpu" else {}
    limits = {"recompile_limit": 1024, "accumulated_recompile_limit": 4096}
    compiled_shapes: set = set()
    lock = threading.Lock()

    def call(idx: torch.Tensor, *args):
        key = (idx.shape, args[-1])
        if key in compiled_shapes:
            return step(idx, *args)
        patch = {**options, **(tuned if idx.size(0) <= AUTOTUNE_ROWS else {})}
        with lock, torch._inductor.config.patch(patch), torch._dynamo.config.patch(limits):
            out = step(idx, *args)
            compiled_shapes.add(key)
            return out
    return call


def load(path: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto",
         compile: bool = False) -> StoryModel:
    """Load a model directory or run directory (default: the model shipped with storygpt; "default" and
    "instruct" name the shipped models, the second when it is installed: instruct.py's prompt format).

    compile=True decodes each token with one torch.compile'd graph: faster per token once compiled
    (the first story per batch size and cache length pays the compile: about 95 s for one story at a time in
    int8 on 2 cores, 7 minutes for a 64-slot server): for servers and benchmarks.

    dtype: "auto" (default) keeps the weights in bf16 where the hardware computes bf16 natively (a
    decoded token reads every weight once, so half the bytes is up to twice the speed; held-out loss
    moves in the 6th digit) and fp32 elsewhere; or fp32, bf16, fp16 where the device supports them.
    "int8" (CPU): weight-only int8 matrices (storygpt.quantize), fp32 activations: 1/4 of the weights'
    bytes, held-out bits/byte within 1e-4 of fp32; on CPUs with native bf16 the fastest way to decode
    (its products run in bf16 straight from the int8 weights), slower than fp32 on AVX2-only CPUs
    (docs/results/benchmarks.md).
    """
    path = shipped_or(path)
    dev = pick_device(device)
    if dtype == "auto":
        dtype = pick_dtype(dev, "auto")
    if dtype == "int8":
        from storygpt.model.quantize import quantize_int8

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
