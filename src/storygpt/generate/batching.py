"""Continuous batching: stories decoded together, each in its own slot of one KV cache.

A `Batcher` owns a KV cache of `slots` rows (the batch dimension) for one model. Each row holds one story
at its own length. `step()` advances every story by one token with one batched forward pass
(`Transformer.decode_rows`: each row at its own position, RoPE at that position, the rest of its cache
row masked). A story joins between two steps when enough slots are free: its prompt is prefilled into
one slot in chunks of at most `prefill_chunk` tokens (a chunk's bounds depend only on the prompt), and a
step prefills chunks, first come first served, until `prefill_chunk` tokens are reached (the chunk that
crosses it runs whole, so less than two chunks' worth on top of the decoding, or the n chunks of one
sliding story's n samples); then the prompt's cache is copied to the slots of its other samples. A story leaves at once:
a row that ends (end-of-story, a stop string, `max_new_tokens`) frees its slot, and so does
`cancel()`.

A `Story` is one prompt with its n samples and its own `SamplingOptions` and seeded `torch.Generator`;
its n rows are sampled together, as one (n, vocab) draw per step whether or not some have ended, so a
story's draws never depend on the other stories in the batch. A story longer than the context slides:
its rows' cache is refilled with the latest half context of their own tokens (as a prefill) and they go on.

What holds (tests/generate/test_engine.py): a story is a function of its prompt, options and seed when it runs
alone; in a batch its greedy text equals its text alone, and its sampled text equals it up to the
rounding of batched kernels (a matrix product over B rows may round a row's logits differently from
one over a single row, which can flip a sampled token in rare cases).

`StoryModel.generate` runs one story in a Batcher of its own; the HTTP server (`storygpt.generate.engine`)
and the web app run every request in one shared Batcher per model on a decoding thread.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from storygpt.errors import StoryGPTError
from storygpt.model.cache import KVCache, RowsCache

from .guide import guide_for
from .sampling import SamplingOptions, apply_repetition_penalty, sampling_probs

PREFILL_CHUNK = 64  # prompt tokens prefilled per step (the chunk that crosses it runs whole)


class Piece(NamedTuple):
    """New text of sample `index` (the story's first index + its sample number)."""
    index: int
    text: str


class Finish(NamedTuple):
    index: int
    reason: str  # "stop": end-of-story token or a stop string; "length": max_new_tokens


class Done(NamedTuple):
    """A story ended (all its samples): its speed figures and token counts (as `StoryModel.last_stats`)."""
    stats: dict


Event = Piece | Finish | Done


class Story:
    """One prompt, its n samples and their options; `emit` receives its events (on the decoding thread)."""

    def __init__(self, model, prompt: str, n: int, opts: SamplingOptions, emit: Callable[[Event], None],
                 first_index: int = 0):
        opts.validate()
        if n < 1:
            raise StoryGPTError(f"a story needs at least one sample, got {n}")
        self.model, self.n, self.opts, self.emit, self.first = model, n, opts, emit, first_index
        self.prompt_ids = model.encode_prompt(prompt)
        self.base_text = model.tokenizer.decode(self.prompt_ids)
        self.slots: list[int | None] = []
        self.started = False
        # an instruct model's story is steered toward what its instruction asks for (guide.py)
        self.guide = guide_for(model.tokenizer, prompt, n, opts.max_new_tokens) if opts.guide and model.is_instruct \
            else None

    def start(self, slots: list[int], ctx: int) -> None:
        """Take `slots` (one per sample) and queue the prompt for prefilling; called by `Batcher.add`."""
        device, opts, P = self.model.device, self.opts, len(self.prompt_ids)
        self.slots, self.started, self.t0, self.first_token_s = list(slots), True, time.perf_counter(), None
        self.generator = None
        if opts.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(opts.seed)
        self.ids = torch.empty(self.n, P + opts.max_new_tokens, dtype=torch.long, device=device)  # every token
        self.ids[:, :P] = torch.tensor(self.prompt_ids, device=device)
        self.length = P  # filled columns of ids
        self.rows = [list(self.prompt_ids) for _ in range(self.n)]  # the same tokens as lists, for the text
        self.emitted, self.done, self.reasons = [""] * self.n, [False] * self.n, ["length"] * self.n
        self.generated = 0
        self.hold = max((len(x) for x in opts.stop), default=1) - 1  # a stop string may still be forming
        # to feed into the cache before the next token: the prompt (one row for all samples; a prompt longer
        # than the context keeps its last tokens), later a slide's window (one row per live sample)
        self.pending: torch.Tensor | None = self.ids[:1, max(0, P - (ctx - 1)):P]
        self.shared, self.offset, self.cached = True, 0, 0
        self.next: list[int] | None = None  # tokens sampled but not yet in the cache, one per live sample

    @property
    def live(self) -> list[int]:
        return [i for i in range(self.n) if not self.done[i]]

    @property
    def sampling(self) -> tuple:
        """Stories with equal settings are filtered together (`sampling_probs`)."""
        return self.opts.temperature, self.opts.top_k, self.opts.top_p

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The (n, vocab) logits to sample from, from the logits of the live samples: the ended samples still
        take part in the draw (with zero logits), so that the generator's draws are those of the story alone."""
        live, n = self.live, self.n
        logits = logits.float()
        if len(live) < n:
            full = logits.new_zeros(n, logits.size(-1))
            full[live] = logits
            logits = full
        logits = apply_repetition_penalty(logits, self.ids[:, 1:self.length], self.opts.repetition_penalty)
        if self.opts.ignore_eos:
            logits[:, self.model.tokenizer.eos_id] = float("-inf")
        if self.guide is not None:
            logits = self.guide.adjust(logits, live)
        return logits

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """The next token of each of the n rows of `probs` (from `sampling_probs`), with this story's generator."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def advance(self, nxt: torch.Tensor, ctx: int) -> list[int]:
        """Take the next token of every sample (n,), send the new text, and return the slots of the samples that
        ended."""
        tok, opts, n = self.model.tokenizer, self.opts, self.n
        live = self.live
        if len(live) < n:  # ended rows are filled with end-of-story tokens
            nxt = nxt.masked_fill(torch.tensor(self.done, device=nxt.device), tok.eos_id)
        self.ids[:, self.length] = nxt
        self.length += 1
        picked = nxt.tolist()
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.t0
        final = self.generated == opts.max_new_tokens - 1
        self.generated += 1
        ended = []
        for i in live:
            self.rows[i].append(picked[i])
            text = tok.decode(self.rows[i])[len(self.base_text):]
            if self.guide is not None:
                self.guide.observe(i, picked[i], text)
            cut = _first_stop(text, opts.stop)
            if cut is not None:
                text = text[:cut]
            finished = final or cut is not None or picked[i] == tok.eos_id
            if not finished:
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence of byte tokens: wait for the rest
                text = text[:len(text) - self.hold]
            if len(text) > len(self.emitted[i]):
                self.emit(Piece(self.first + i, text[len(self.emitted[i]):]))
                self.emitted[i] = text
            if finished:
                self.done[i] = True
                if cut is not None or picked[i] == tok.eos_id:
                    self.reasons[i] = "stop"
                self.emit(Finish(self.first + i, self.reasons[i]))
                ended.append(self.slots[i])
                self.slots[i] = None
        live = self.live
        if not live:
            self.emit(Done(self.stats()))
        elif self.cached >= ctx:  # slide: refill each live row's cache with its latest half context
            self.pending = self.ids[live, self.length - ctx // 2:self.length]
            self.shared, self.offset, self.cached, self.next = False, 0, 0, None
        else:
            self.next = [picked[i] for i in live]
        return ended

    def stats(self) -> dict:
        elapsed = time.perf_counter() - self.t0
        counts = [len(r) - len(self.prompt_ids) for r in self.rows]  # tokens made per sample
        new_tokens = sum(counts)
        return {"new_tokens": new_tokens, "seconds": elapsed,
                "tokens_per_s": new_tokens / elapsed if elapsed > 0 else 0.0,
                "time_to_first_token_s": self.first_token_s or 0.0, "prompt_tokens": len(self.prompt_ids) - 1,
                "finish_reasons": list(self.reasons), "tokens_per_sample": counts}


class Batcher:
    """Stories decoded together in the rows ("slots") of one KV cache; not thread-safe: one thread calls
    `add`, `cancel` and `step`."""

    def __init__(self, model, slots: int, prefill_chunk: int = PREFILL_CHUNK):
        if slots < 1 or prefill_chunk < 1:
            raise StoryGPTError(f"slots and prefill_chunk must be >= 1, got {slots}, {prefill_chunk}")
        self.model, self.slots, self.prefill_chunk = model, slots, prefill_chunk
        self.net, self.ctx = model.model, model.context
        # one more row than slots: a compiled step pads its batch to a power of two with rows written there
        self.cache = KVCache(self.net.cfg, slots + 1, model.device, model.dtype, max_len=self.ctx)
        self.free = list(range(slots))  # a heap: the lowest free slot first, so busy slots stay together
        self.stories: list[Story] = []
        self.compiled = getattr(model, "decode_step", None)  # StoryModel(compile=True): a compiled decode_rows

    @property
    def free_slots(self) -> int:
        return len(self.free)

    def add(self, story: Story) -> None:
        if story.n > len(self.free):
            raise StoryGPTError(f"{story.n} samples need {story.n} free slots, {len(self.free)} are free")
        story.start([heapq.heappop(self.free) for _ in range(story.n)], self.ctx)
        self.stories.append(story)

    def cancel(self, story: Story) -> None:
        """Drop a story now; its slots are free for the next step."""
        if story in self.stories:
            self.stories.remove(story)
            self._release([s for s in story.slots if s is not None])
            story.slots = [None] * story.n

    def _release(self, slots: list[int]) -> None:
        for s in slots:
            heapq.heappush(self.free, s)

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every story that has its prompt in the cache; prefill for those that do not yet."""
        ready: list[tuple[Story, torch.Tensor]] = []
        budget = self.prefill_chunk  # prompt tokens for this step; the chunk that crosses it runs whole
        for story in self.stories:
            while story.pending is not None and budget > 0:
                budget -= self._prefill(story, ready)
            if budget <= 0:
                break
        decoding = [story for story in self.stories if story.next is not None]
        if decoding:
            ready += self._decode(decoding)
        groups: dict[tuple, list[tuple[Story, torch.Tensor]]] = {}
        for story, logits in ready:
            groups.setdefault(story.sampling, []).append((story, story.scores(logits)))
        for (temperature, top_k, top_p), members in groups.items():
            scores = torch.cat([s for _, s in members]) if len(members) > 1 else members[0][1]
            if temperature == 0:
                picks = scores.argmax(dim=-1).split([story.n for story, _ in members])
            else:  # the filters for all rows at once, the draws with each story's generator
                probs = sampling_probs(scores, temperature, top_k, top_p).split([story.n for story, _ in members])
                picks = [story.draw(p) for (story, _), p in zip(members, probs)]
            for (story, _), nxt in zip(members, picks):
                self._release(story.advance(nxt, self.ctx))
                if all(story.done):
                    self.stories.remove(story)

    def _prefill(self, story: Story, ready: list) -> int:
        """Feed the next chunk of a story's pending tokens into its slots; returns the tokens fed."""
        T = min(self.prefill_chunk, story.pending.size(1) - story.offset)
        chunk = story.pending[:, story.offset:story.offset + T]
        live = story.live
        rows = [story.slots[live[0]]] if story.shared else [story.slots[i] for i in live]
        logits = torch.cat([self.net(chunk[j:j + 1], cache=self.cache.rows(slice(s, s + 1), story.cached))[0]
                            for j, s in enumerate(rows)])
        story.cached += T
        story.offset += T
        if story.offset == story.pending.size(1):
            story.pending = None
            if story.shared and len(live) > 1:  # every sample starts from the same prompt: copy its cache
                first, others = rows[0], torch.tensor([story.slots[i] for i in live[1:]], device=logits.device)
                for buf in self.cache.k + self.cache.v:
                    buf[others, :, :story.cached] = buf[first, :, :story.cached]
                logits = logits.repeat(len(live), 1, 1)
            ready.append((story, logits[:, -1]))
        return T * len(rows)

    def _decode(self, stories: list[Story]) -> list[tuple[Story, torch.Tensor]]:
        """One batched forward pass: the latest token of every live sample of `stories`, each at its position."""
        rows = sorted((s.slots[i], tok, s.cached, k) for k, s in enumerate(stories) for i, tok in zip(s.live, s.next))
        device = self.model.device
        slots = [r[0] for r in rows]
        idx = torch.tensor([r[1] for r in rows], device=device)[:, None]
        pos = torch.tensor([r[2] for r in rows], device=device)
        if self.compiled is not None:  # fixed shapes: a power of two of rows, the whole cache
            pad = (1 << (len(rows) - 1).bit_length()) - len(rows)
            index = torch.tensor(slots + [self.slots] * pad, device=device)
            idx, pos = torch.cat([idx, idx.new_zeros(pad, 1)]), torch.cat([pos, pos.new_zeros(pad)])
            logits = self.compiled(idx, index, pos, self.cache)[:len(rows)]
        else:
            together = slots == list(range(slots[0], slots[0] + len(slots)))
            index = slice(slots[0], slots[0] + len(slots)) if together else torch.tensor(slots, device=device)
            logits, _ = self.net(idx, cache=RowsCache(self.cache, index, pos, max(r[2] for r in rows) + 1))
        for story in stories:
            story.cached += 1
            story.next = None
        out: dict[int, list[int]] = {}
        for j, r in enumerate(rows):
            out.setdefault(r[3], []).append(j)
        # a story's rows come back in the order of its live samples: its slots were taken in increasing order
        return [(story, logits[torch.tensor(out[k], device=device), -1]) for k, story in enumerate(stories)]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the decoding step for every batch size it can take (powers of two up to the slots) now."""
        if self.compiled is None:
            return
        size = 1
        while True:
            zeros = torch.zeros(size, dtype=torch.long, device=self.model.device)
            self.compiled(zeros[:, None], zeros + self.slots, zeros, self.cache)
            if size >= self.slots:
                break
            size *= 2


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
