"""Story generation: sampling filters, KV-cached batched decoding, streaming text, and the
`StoryModel` Python API (`storygpt.load()`) that the CLI, the web app and the HTTP API share.

Context: a story starts after an end-of-story token, then the prompt. When prompt + story outgrow
the model's context, decoding slides: the cache is refilled with the most recent half-context of
tokens and the story goes on (a prompt longer than the context keeps its last tokens). The text
returned is always the full prompt plus everything generated.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .checkpoint import default_model_path, load_model, trained_context
from .device import DTYPES, maybe_compile, pick_device, pick_dtype, supports_dtype
from .errors import StoryGPTError
from .model import KVCache, Transformer
from .tokenizer import Tokenizer

MAX_NEW_TOKENS = 4096
MAX_SAMPLES = 64


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: logits of tokens already in `history` (B, T) are divided by `penalty` when
    positive and multiplied by it when negative. penalty 1.0 = off."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)
    big = torch.finfo(seen.dtype).max  # a tiny penalty must not make +inf (inf - inf is nan when sampling)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty).clamp(-big, big)
    return logits.scatter(1, history, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value kept), -inf elsewhere. k=0 = off."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p. p=1 = off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p              # already enough mass without it
    drop_sorted[..., 0] = False            # the top token always stays (a tiny p can round to 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from (B, vocab) logits; temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # shifted so that the top logit is 0: a tiny temperature then gives -inf below it, never inf (and nan);
    # a temperature below float32's smallest normal number would round to a division by 0
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class SamplingOptions:
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # never end the story early: always max_new_tokens (for benchmarks)

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise StoryGPTError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise StoryGPTError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise StoryGPTError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise StoryGPTError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty <= 10:
            raise StoryGPTError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise StoryGPTError("stop strings must be non-empty strings")


# --------------------------------------------------------------------------------------------
# The model users talk to
# --------------------------------------------------------------------------------------------
class StoryModel:
    """A loaded model + tokenizer that writes stories. Create it with `storygpt.load()`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, info: dict | None = None, path: str = "",
                 compile: bool = False):
        self.model, self.tokenizer, self.info, self.path = model.eval(), tokenizer, info or {}, path
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.context = trained_context(model.cfg, self.info)
        self.last_stats: dict = {}
        # one compiled graph per token (see Transformer.decode_step); compiles on first use, per batch size
        self.decode_step = None
        if compile:
            self.decode_step = _frozen(maybe_compile(model.decode_step, self.device, dynamic=False), self.device)

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
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "vocab_size": self.tokenizer.vocab_size, **{k: v for k, v in self.info.items() if k != "train"}}

    # --- decoding --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise StoryGPTError("prompt must be text")
        return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)

    @torch.inference_mode()
    def _run(self, prompt: str, n: int, opts: SamplingOptions,
             stats: dict | None = None) -> Iterator[tuple[int, str]]:
        """Yield (sample index, new text) as tokens are decoded, for n samples in one batch."""
        opts.validate()
        if not 1 <= n <= MAX_SAMPLES:
            raise StoryGPTError(f"num_samples must be in [1, {MAX_SAMPLES}], got {n}")
        tok, model, ctx = self.tokenizer, self.model, self.context
        prompt_ids = self.encode_prompt(prompt)
        base_text = tok.decode(prompt_ids)
        generator = None
        if opts.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        P = len(prompt_ids)
        ids = torch.empty(n, P + opts.max_new_tokens, dtype=torch.long, device=self.device)  # every token, per row
        ids[:, :P] = torch.tensor(prompt_ids, device=self.device)
        length = P  # filled columns of ids
        rows = [list(prompt_ids) for _ in range(n)]  # the same tokens as Python lists, for the text
        cache = KVCache(model.cfg, n, self.device, self.dtype, max_len=ctx)
        emitted = [""] * n
        done = [False] * n
        reasons = ["length"] * n  # "stop": the story ended (end-of-story token or a stop string)
        t0, first_token_s = time.perf_counter(), None
        window = ids[:, max(0, P - (ctx - 1)):P]  # a prompt longer than the context keeps its last tokens
        logits, _ = model(window, cache=cache)
        hold = max((len(x) for x in opts.stop), default=1) - 1  # a stop string may still be forming
        for step in range(opts.max_new_tokens):
            last = apply_repetition_penalty(logits[:, -1].float(), ids[:, 1:length], opts.repetition_penalty)
            if opts.ignore_eos:
                last[:, tok.eos_id] = float("-inf")
            nxt = sample_next(last, opts.temperature, opts.top_k, opts.top_p, generator)
            if any(done):  # finished rows are fed end-of-story tokens until the batch ends
                nxt = nxt.masked_fill(torch.tensor(done, device=self.device), tok.eos_id)
            ids[:, length] = nxt
            length += 1
            picked = nxt.tolist()
            if first_token_s is None:
                first_token_s = time.perf_counter() - t0
            final = step == opts.max_new_tokens - 1
            for i in range(n):
                if done[i]:
                    continue
                rows[i].append(picked[i])
                text = tok.decode(rows[i])[len(base_text):]
                cut = _first_stop(text, opts.stop)
                if cut is not None:
                    text = text[:cut]
                finished = final or cut is not None or picked[i] == tok.eos_id
                if not finished:
                    if text.endswith("\ufffd"):
                        continue  # an incomplete UTF-8 sequence of byte tokens: wait for the rest
                    text = text[:len(text) - hold]
                if finished:
                    done[i] = True
                    if cut is not None or picked[i] == tok.eos_id:
                        reasons[i] = "stop"
                if len(text) > len(emitted[i]):
                    yield i, text[len(emitted[i]):]
                    emitted[i] = text
            if all(done):
                break
            if cache.pos >= ctx:  # slide: refill the cache with the latest half context
                cache.reset()
                logits, _ = model(ids[:, length - ctx // 2:length], cache=cache)
            elif self.decode_step is not None:
                logits = self.decode_step(nxt[:, None], torch.tensor([cache.pos], device=self.device), cache)
                cache.pos += 1
            else:
                logits, _ = model(nxt[:, None], cache=cache)
        elapsed = time.perf_counter() - t0
        counts = [len(r) - P for r in rows]  # tokens made per sample
        new_tokens = sum(counts)
        figures = {"new_tokens": new_tokens, "seconds": elapsed,
                   "tokens_per_s": new_tokens / elapsed if elapsed > 0 else 0.0,
                   "time_to_first_token_s": first_token_s or 0.0, "prompt_tokens": len(prompt_ids) - 1,
                   "finish_reasons": reasons, "tokens_per_sample": counts}
        self.last_stats = figures
        if stats is not None:
            stats.update(figures)


def _frozen(step, device: torch.device):
    """The compiled `step`, compiled with inductor's freezing on: the weights become constants of the
    graph, prepacked for oneDNN on CPU (1.2x the tokens/s at batch 1 here); on CPU also with a C++
    wrapper around the graph's kernels instead of Python (another 1.15x). The options are set only
    around the first call for each batch size (the call that compiles), under a lock, never globally:
    a model compiled for training elsewhere in the process is not frozen, and threads decoding with
    already compiled shapes never wait. Decoding never changes the weights."""
    options = {"freezing": True, "cpp_wrapper": device.type == "cpu"}
    compiled_shapes: set = set()
    lock = threading.Lock()

    def call(idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if idx.shape in compiled_shapes:
            return step(idx, pos, cache)
        with lock, torch._inductor.config.patch(options):
            logits = step(idx, pos, cache)
            compiled_shapes.add(idx.shape)
            return logits
    return call


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def load(path: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto",
         compile: bool = False) -> StoryModel:
    """Load a model directory or run directory (default: the model shipped with storygpt).

    compile=True decodes each token with one torch.compile'd graph: faster per token once compiled
    (the first story per batch size pays the compile, seconds to a minute): for servers and benchmarks.

    dtype: "auto" (default) keeps the weights in bf16 where the hardware computes bf16 natively (a
    decoded token reads every weight once, so half the bytes is up to twice the speed; held-out loss
    moves in the 6th digit) and fp32 elsewhere; or fp32, bf16, fp16 where the device supports them.
    """
    if path is None:
        path = default_model_path()
    dev = pick_device(device)
    if dtype == "auto":
        dtype = pick_dtype(dev, "auto")
    if dtype not in DTYPES:
        raise StoryGPTError(f"dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    if not supports_dtype(dev, dtype) and not (dev.type == "cpu" and dtype == "bf16"):
        raise StoryGPTError(f"{dtype} is not supported on {dev.type}")
    model, tokenizer, info = load_model(path, device=dev, dtype=DTYPES[dtype])
    return StoryModel(model, tokenizer, info, str(path), compile=compile)
