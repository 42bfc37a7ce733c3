"""Continuous batching: per-row decoding (model.py), the Batcher (batching.py) and the server's Engine
(storygpt.serve.engine), alone and through the HTTP server."""

from __future__ import annotations

import pytest
import torch

import storygpt
from storygpt.batching import Batcher, Done, Finish, Piece, Story
from storygpt.generate import StoryModel
from storygpt.model import KVCache, ModelConfig, RowsCache, Transformer
from storygpt.sampling import SamplingOptions


# --------------------------------------------------------------------------------------------
# Transformer.decode_rows: each row at its own position
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "n_kv_heads"), [("llama", None), ("llama", 2), ("gpt2", None)])
def test_decode_rows_equals_each_sequence_alone(arch, n_kv_heads):
    """Sequences of different lengths in scattered cache rows: one batched step gives each the logits of a full
    forward pass over that sequence alone; gathered rows (a tensor) and rows in place (a slice) agree exactly."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=32)
    net = Transformer(cfg).eval()
    seqs = [torch.randint(0, 50, (1, length)) for length in (5, 12, 2)]
    idx = torch.stack([s[0, -1] for s in seqs])[:, None]
    pos = torch.tensor([s.size(1) - 1 for s in seqs])
    with torch.inference_mode():
        scattered, together = KVCache(cfg, 5, max_len=32), KVCache(cfg, 3, max_len=32)
        for slot, s in zip([3, 0, 4], seqs):  # prefill all but the last token, each into its own row
            net(s[:, :-1], cache=scattered.rows(slice(slot, slot + 1), 0))
        for slot, s in enumerate(seqs):
            net(s[:, :-1], cache=together.rows(slice(slot, slot + 1), 0))
        got, _ = net(idx, cache=RowsCache(scattered, torch.tensor([3, 0, 4]), pos, int(pos.max()) + 1))
        in_place = net.decode_rows(idx, slice(0, 3), pos, together)  # the whole cache, masked
        for b, s in enumerate(seqs):
            torch.testing.assert_close(got[b], net(s)[0][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(in_place, got)
        # the keys and values went to each row's own position, nowhere else
        assert scattered.k[0][1].abs().sum() == 0 and scattered.k[0][2].abs().sum() == 0
        assert scattered.k[0][3, :, 5:].abs().sum() == 0 and scattered.k[0][3, :, 4].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# The Batcher
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_run):
    return storygpt.load(tiny_run, dtype="fp32")


class Run:
    """A story in a Batcher, with what it emitted."""

    def __init__(self, model: StoryModel, prompt: str, n: int = 1, **options):
        self.texts, self.reasons, self.stats = [""] * n, [None] * n, None
        self.story = Story(model, prompt, n, SamplingOptions(**options), self.emit)

    def emit(self, event) -> None:
        if isinstance(event, Piece):
            self.texts[event.index] += event.text
        elif isinstance(event, Finish):
            self.reasons[event.index] = event.reason
        else:
            assert isinstance(event, Done)
            self.stats = event.stats


def alone(model: StoryModel, prompt: str, n: int = 1, prefill_chunk: int = 64, **options) -> list[str]:
    run = Run(model, prompt, n, **options)
    batcher = Batcher(model, n, prefill_chunk)
    batcher.add(run.story)
    while batcher.stories:
        batcher.step()
    return run.texts


LONG = "Once upon a time, there was a little dog named Tom. Tom liked to play in the park with a red ball."


def test_joining_and_leaving_mid_batch_gives_the_stories_alone(tiny):
    """Stories join at different steps (one with a prompt prefilled in several chunks, one with 3 samples), one is
    cancelled and others end early: every greedy story equals the same story decoded alone."""
    greedy = {"temperature": 0, "ignore_eos": True}
    plan = {  # step it joins: (prompt, samples, options)
        0: ("Tom", 1, {**greedy, "max_new_tokens": 40}),
        3: ("Lily had a", 1, {**greedy, "max_new_tokens": 6}),  # ends at step ~9, freeing its slot
        5: (LONG, 1, {**greedy, "max_new_tokens": 25}),         # 3 prefill chunks of 8 tokens or fewer
        7: ("Ben", 3, {**greedy, "max_new_tokens": 20}),
        8: ("Mia", 1, {**greedy, "max_new_tokens": 30}),        # cancelled at step 15
        12: ("Sam and", 1, {"temperature": 0, "max_new_tokens": 30}),  # may end at an end-of-story token
    }
    batcher = Batcher(tiny, slots=7, prefill_chunk=8)
    runs = {}
    step = 0
    while step < 13 or batcher.stories:
        if step in plan:
            prompt, n, options = plan[step]
            runs[step] = Run(tiny, prompt, n, **options)
            batcher.add(runs[step].story)
        if step == 15:
            batcher.cancel(runs[8].story)
        batcher.step()
        assert batcher.free_slots + sum(s is not None for st in batcher.stories for s in st.slots) == 7
        step += 1
    assert batcher.free_slots == 7
    for start, run in runs.items():
        prompt, n, options = plan[start]
        if start == 8:
            assert run.stats is None and run.texts[0]  # cancelled mid-story: no end
            assert alone(tiny, prompt, n, 8, **options)[0].startswith(run.texts[0])
            continue
        assert run.texts == alone(tiny, prompt, n, 8, **options), prompt
    assert runs[3].stats["tokens_per_sample"] == [6] and runs[7].stats["tokens_per_sample"] == [20] * 3


def test_seeds_and_options_per_story_in_one_batch(tiny):
    """Each story samples with its own seed and options (temperature, top_k, top_p, repetition penalty, stop
    strings, max_tokens) in a shared batch, and writes what it writes alone."""
    prompt = "Once upon a time"
    full = alone(tiny, prompt, temperature=0, max_new_tokens=30)[0]
    stop = full.split()[4]
    stories = [dict(seed=1, temperature=1.0, max_new_tokens=30), dict(seed=2, temperature=1.0, max_new_tokens=30),
               dict(seed=1, temperature=0.5, top_k=5, max_new_tokens=20),
               dict(seed=3, temperature=1.3, top_p=0.8, repetition_penalty=1.3, max_new_tokens=25),
               dict(temperature=0, max_new_tokens=30, stop=[stop]), dict(seed=4, n=2, max_new_tokens=15)]
    batcher = Batcher(tiny, slots=8)
    runs = []
    for options in stories:
        options = dict(options)
        runs.append(Run(tiny, prompt, options.pop("n", 1), **options))
        batcher.add(runs[-1].story)
    while batcher.stories:
        batcher.step()
    for options, run in zip(stories, runs):
        options = dict(options)
        assert run.texts == alone(tiny, prompt, options.pop("n", 1), **options), options
    assert runs[0].texts != runs[1].texts and runs[0].texts != runs[2].texts  # the seeds and options mattered
    assert runs[4].texts == [full[:full.index(stop)]] and runs[4].reasons == ["stop"]


def test_alone_in_the_batcher_is_the_python_api(tiny):
    """`StoryModel.generate` is one story alone in a Batcher: the same seed gives the same text either way."""
    options = dict(seed=11, temperature=1.0, top_k=40, max_new_tokens=30)
    assert tiny.generate("Tom", **options) == "Tom" + alone(tiny, "Tom", **options)[0]
    assert tiny.generate("Tom", num_samples=3, **options) == ["Tom" + t for t in alone(tiny, "Tom", 3, **options)]


def test_sliding_stories_in_a_batch(tiny):
    """Stories longer than the context slide (each refills its own cache rows) while others decode."""
    short = StoryModel(tiny.model, tiny.tokenizer, tiny.info)
    short.context = 24
    options = {"temperature": 0, "ignore_eos": True}
    batcher = Batcher(short, slots=3, prefill_chunk=8)
    runs = [Run(short, "Tom", 1, max_new_tokens=60, **options), Run(short, LONG, 1, max_new_tokens=50, **options),
            Run(short, "Lily", 1, max_new_tokens=10, **options)]
    for i, run in enumerate(runs):
        batcher.add(run.story)
        for _ in range(i * 5):
            batcher.step()
    while batcher.stories:
        batcher.step()
    for run, (prompt, tokens) in zip(runs, [("Tom", 60), (LONG, 50), ("Lily", 10)]):
        assert run.stats["tokens_per_sample"] == [tokens]
        assert run.texts == alone(short, prompt, max_new_tokens=tokens, prefill_chunk=8, **options)


def test_a_batcher_refuses_stories_it_has_no_room_for(tiny):
    batcher = Batcher(tiny, slots=2)
    batcher.add(Run(tiny, "Tom", 2, max_new_tokens=4).story)
    with pytest.raises(storygpt.StoryGPTError, match="free slots"):
        batcher.add(Run(tiny, "Tom", 1, max_new_tokens=4).story)
