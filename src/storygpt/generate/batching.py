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
from .sampling import SamplingOptions, apply_repetition_penalty, draw_tokens
from .story_text import extended_text, first_stop

PREFILL_CHUNK = 64  # prompt tokens prefilled per step (the chunk that crosses it runs whole)
MIN_LENGTH = 64  # the shortest cache length a compiled step attends over (see `length_buckets`)


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
        self.texts = [self.base_text] * self.n  # tokenizer.decode(rows[i]), kept up to date token by token
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
        """Stories with equal settings are drawn together (`draw_tokens`)."""
        return self.opts.temperature, self.opts.top_k, self.opts.top_p

    @property
    def greedy(self) -> bool:
        """Whether the next token is the top logit's (with the end-of-story token barred under ignore_eos), which a
        compiled step computes itself: greedy, no repetition penalty, no guide."""
        return self.opts.temperature == 0 and self.opts.repetition_penalty == 1.0 and self.guide is None

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

    def uniforms(self) -> torch.Tensor:
        """One uniform number per sample for this step's draw (`draw_tokens`), from this story's generator."""
        return torch.rand(self.n, generator=self.generator, device=self.model.device)

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
            self.texts[i] = extended_text(tok, self.rows[i], self.texts[i], picked[i])
            self.rows[i].append(picked[i])
            text = self.texts[i][len(self.base_text):]
            if self.guide is not None:
                self.guide.observe(i, picked[i], text)
            cut = first_stop(text, opts.stop)
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
        # one more row than slots: a compiled step pads its batch to a power of two with rows written there;
        # inference tensors wherever the Batcher is made (a compiled step's graphs are specialised to them)
        with torch.inference_mode():
            self.cache = KVCache(self.net.cfg, slots + 1, model.device, model.dtype, max_len=self.ctx)
        self.free = list(range(slots))  # a heap: the lowest free slot first, so busy slots stay together
        self.stories: list[Story] = []
        self.compiled = getattr(model, "decode_step", None)  # StoryModel(compile=True): `greedy_step` compiled

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
        ready: list[tuple[Story, torch.Tensor, torch.Tensor | None]] = []
        budget = self.prefill_chunk  # prompt tokens for this step; the chunk that crosses it runs whole
        together: list[Story] = []  # whole prompts of one row, of one length, in consecutive slots: one forward
        for story in self.stories:
            while story.pending is not None and budget > 0:
                T = story.pending.size(1) - story.offset
                if T <= self.prefill_chunk and (story.shared or len(story.live) == 1):  # the rest in one chunk
                    if together and not self._joins(together[-1], story, T):
                        self._prefill_together(together, ready)
                        together = []
                    together.append(story)
                    budget -= T
                    break
                budget -= self._prefill(story, ready)
            if budget <= 0:
                break
        if together:
            self._prefill_together(together, ready)
        decoding = [story for story in self.stories if story.next is not None]
        if decoding:
            ready += self._decode(decoding)
        groups: dict[tuple, list[tuple[Story, torch.Tensor]]] = {}
        for story, logits, pick in ready:
            if pick is not None and story.greedy:  # the compiled step's own argmax: the same token, no Python
                if len(pick) < story.n:  # the ended samples' rows (as `Story.advance` fills them)
                    pick = pick.new_full((story.n,), self.model.tokenizer.eos_id).index_copy_(
                        0, torch.tensor(story.live, device=pick.device), pick)
                self._finish(story, pick)
            else:
                groups.setdefault(story.sampling, []).append((story, story.scores(logits)))
        for (temperature, top_k, top_p), members in groups.items():
            scores = torch.cat([s for _, s in members]) if len(members) > 1 else members[0][1]
            if temperature == 0:
                picks = scores.argmax(dim=-1).split([story.n for story, _ in members])
            else:  # all rows at once, each story's with uniform numbers from its own generator
                uniforms = torch.cat([story.uniforms() for story, _ in members])
                picks = draw_tokens(scores, temperature, top_k, top_p, uniforms).split([story.n for story, _ in members])
            for (story, _), nxt in zip(members, picks):
                self._finish(story, nxt)

    def _finish(self, story: Story, nxt: torch.Tensor) -> None:
        self._release(story.advance(nxt, self.ctx))
        if all(story.done):
            self.stories.remove(story)

    def _prefill(self, story: Story, ready: list) -> int:
        """Feed the next chunk of a story's pending tokens into its slots; returns the tokens fed."""
        T = min(self.prefill_chunk, story.pending.size(1) - story.offset)
        chunk = story.pending[:, story.offset:story.offset + T]
        rows = self._prefill_rows(story)
        logits = torch.cat([self.net(chunk[j:j + 1], cache=self.cache.rows(slice(s, s + 1), story.cached))[0]
                            for j, s in enumerate(rows)])
        self._prefilled(story, T, logits, ready)
        return T * len(rows)

    def _prefill_together(self, stories: list[Story], ready: list) -> None:
        """Feed the pending tokens of stories that `_joins` put together (one row each, the same length and
        cached length, consecutive slots) in one forward pass over their rows of the cache."""
        head = stories[0]
        first, T = self._prefill_rows(head)[0], head.pending.size(1) - head.offset
        chunk = torch.cat([story.pending[:1, story.offset:] for story in stories])
        logits = self.net(chunk, cache=self.cache.rows(slice(first, first + len(stories)), head.cached))[0]
        for j, story in enumerate(stories):
            self._prefilled(story, T, logits[j:j + 1], ready)

    def _joins(self, last: Story, story: Story, T: int) -> bool:
        """Whether `story`'s prompt (T tokens) can be prefilled in one forward pass with `last`'s."""
        return (T == last.pending.size(1) - last.offset and story.cached == last.cached
                and self._prefill_rows(story)[0] == self._prefill_rows(last)[0] + 1)

    @staticmethod
    def _prefill_rows(story: Story) -> list[int]:
        """The slots a story's pending tokens go into: one for a prompt all samples share, else each live one's."""
        live = story.live
        return [story.slots[live[0]]] if story.shared else [story.slots[i] for i in live]

    def _prefilled(self, story: Story, T: int, logits: torch.Tensor, ready: list) -> None:
        """T more of the story's pending tokens are in the cache, with `logits` (rows, T, vocab) for them; once
        all are, the other samples get a copy of a shared prompt's cache and the story is ready to sample."""
        story.cached += T
        story.offset += T
        if story.offset == story.pending.size(1):
            story.pending = None
            live = story.live
            if story.shared and len(live) > 1:  # every sample starts from the same prompt: copy its cache
                first = story.slots[live[0]]
                others = torch.tensor([story.slots[i] for i in live[1:]], device=logits.device)
                for buf in self.cache.k + self.cache.v:
                    buf[others, :, :story.cached] = buf[first, :, :story.cached]
                logits = logits.repeat(len(live), 1, 1)
            ready.append((story, logits[:, -1], None))

    def _decode(self, stories: list[Story]) -> list[tuple[Story, torch.Tensor, torch.Tensor | None]]:
        """One batched forward pass: the latest token of every live sample of `stories`, each at its position.
        Returns (story, its rows' logits (n, vocab), their greedy tokens or None) per story."""
        rows = sorted((s.slots[i], tok, s.cached, k) for k, s in enumerate(stories) for i, tok in zip(s.live, s.next))
        logits, top, top_no_eos = self.forward([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        for story in stories:
            story.cached += 1
            story.next = None
        def greedy(story: Story) -> torch.Tensor | None:  # the compiled step's greedy tokens that fit its options
            return None if top is None else top_no_eos if story.opts.ignore_eos else top

        if len(stories) == 1:  # one story (all of StoryModel.generate): its rows in the order of its live samples
            return [(stories[0], logits, greedy(stories[0]))]
        out: dict[int, list[int]] = {}
        for j, r in enumerate(rows):
            out.setdefault(r[3], []).append(j)
        # a story's rows come back in the order of its live samples: its slots were taken in increasing order
        picked = []
        for k, story in enumerate(stories):
            index = torch.tensor(out[k], device=logits.device)
            picked.append((story, logits[index], None if top is None else greedy(story)[index]))
        return picked

    def forward(self, slots: list[int], tokens: list[int], positions: list[int]) -> tuple:
        """The logits (B, vocab) of one new token per row: `tokens[b]` at position `positions[b]` of cache row
        `slots[b]` (in increasing slot order), written into the cache; with a compiled step also each row's
        greedy token, with and without the end-of-story token allowed ((B,) each; else None, None).

        The compiled step has fixed shapes: a power of two of rows and a cache length of a power of two
        (`length_bucket`): one graph per (batch size, length), and a short story attends to the cache it has
        filled rather than to the whole context."""
        device, B = self.model.device, len(slots)
        if self.compiled is not None:
            pad = (1 << (B - 1).bit_length()) - B
            index = torch.tensor(slots + [self.slots] * pad, device=device)
            idx = torch.tensor(tokens + [0] * pad, device=device)[:, None]
            pos = torch.tensor(positions + [0] * pad, device=device)
            logits, top, top_no_eos = self.compiled(idx, index, pos, self.cache,
                                                    length_bucket(max(positions) + 1, self.ctx))
            return (logits, top, top_no_eos) if pad == 0 else (logits[:B], top[:B], top_no_eos[:B])
        idx = torch.tensor(tokens, device=device)[:, None]
        pos = torch.tensor(positions, device=device)
        together = slots == list(range(slots[0], slots[0] + B))
        index = slice(slots[0], slots[0] + B) if together else torch.tensor(slots, device=device)
        logits, _ = self.net(idx, cache=RowsCache(self.cache, index, pos, max(positions) + 1))
        return logits[:, -1], None, None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the decoding step for every batch size it can take (powers of two up to the slots) and every
        cache length (`length_bucket`) now."""
        if self.compiled is None:
            return
        for size in (1 << i for i in range((self.slots - 1).bit_length() + 1)):  # 1, 2, 4, ... up to >= slots
            zeros = torch.zeros(size, dtype=torch.long, device=self.model.device)
            for length in length_buckets(self.ctx):
                self.compiled(zeros[:, None], zeros + self.slots, zeros, self.cache, length)


def length_buckets(ctx: int) -> list[int]:
    """The cache lengths a compiled step reads: MIN_LENGTH, twice that, ... up to the context (at most 4)."""
    lengths = [ctx]
    while len(lengths) < 4 and lengths[-1] // 2 >= MIN_LENGTH:
        lengths.append(lengths[-1] // 2)
    return lengths[::-1]


def length_bucket(needed: int, ctx: int) -> int:
    """The shortest of `length_buckets(ctx)` that holds `needed` positions."""
    return next(n for n in length_buckets(ctx) if n >= needed)
