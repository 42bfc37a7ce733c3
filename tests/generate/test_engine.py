"""Continuous batching: per-row decoding (model.py), the Batcher (batching.py) and the server's Engine
(storygpt.serve.engine), alone and through the HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
import torch
from conftest import running, wait_until

import storygpt
from storygpt.generate.batching import Batcher, Done, Finish, Piece, Story
from storygpt.generate.sampling import SamplingOptions
from storygpt.generate.story_model import StoryModel
from storygpt.model.cache import KVCache, RowsCache
from storygpt.model.config import ModelConfig
from storygpt.model.transformer import Transformer
from storygpt.serve import Engine, QueueFull, TooManyStories, create_app


# --------------------------------------------------------------------------------------------
# Transformer.decode_rows: each row at its own position
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "n_kv_heads"), [("llama", None), ("llama", 2), ("gpt2", None)])
def test_decode_rows_equals_each_sequence_alone(arch, n_kv_heads):
    """Sequences of different lengths in scattered cache rows: one batched step gives each the logits of a full
    forward pass over that sequence alone; gathered rows (a tensor) and rows in place (a slice) agree to the last
    bits (the slice attends over the whole masked cache, a longer reduction: AVX-512 kernels may round it
    differently, by 3e-8 here)."""
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
        torch.testing.assert_close(in_place, got, atol=1e-6, rtol=0)
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


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_prompts_that_arrive_together_are_prefilled_together(tiny, monkeypatch, options):
    """Stories that join at the same step with prompts of one length, in consecutive slots, are prefilled in one
    forward pass (a prompt of another length, or one of several chunks, in its own); each story, greedy or
    seeded, still equals the story alone (its first token comes from its own row of the pass), and a shared
    prompt's samples all get its cache."""
    greedy = {**options, "ignore_eos": True, "max_new_tokens": 12}
    by_length: dict[int, list[str]] = {}
    for name in ("Tom", "Lily", "Ben", "Sam", "Mia", "Sue", "Max", "Tim", "Ann", "Dan", "Bob", "Kim"):
        for rest in ("had a", "saw the", "went to"):
            by_length.setdefault(tiny.count_tokens(f"{name} {rest}"), []).append(f"{name} {rest}")
    length = max(by_length, key=lambda n: len(by_length[n]))
    # four different prompts of one length, sorted by their last word, so that the third (two samples) does not
    # end as the first two do (a tiny model's next token depends on little more than the last word)
    same = sorted(by_length[length], key=lambda text: text.split()[-1])[:4]
    other = next(group[0] for n, group in by_length.items() if n != length)
    prompts = [(same[0], 1), (same[1], 1), (same[2], 2), (other, 1), (same[3], 1), (LONG, 1)]  # slots 0, 1, 2-3, ...
    lengths = [tiny.count_tokens(p) for p, _ in prompts]
    batcher = Batcher(tiny, slots=7, prefill_chunk=64)
    calls = []
    forward = tiny.model.forward
    monkeypatch.setattr(tiny.model, "forward", lambda idx, *a, **k: calls.append(tuple(idx.shape)) or
                        forward(idx, *a, **k))
    last_logits = {}  # per story, the logits its first token is drawn from
    prefilled = Batcher._prefilled

    def record(self, story, T, logits, ready):
        last_logits[story] = logits[:, -1].clone()
        prefilled(self, story, T, logits, ready)
    monkeypatch.setattr(Batcher, "_prefilled", record)
    runs = [Run(tiny, prompt, n, **greedy) for prompt, n in prompts]
    for run in runs:
        batcher.add(run.story)
    batcher.step()
    T = lengths[0] + 1  # and the start-of-story token
    assert calls[:3] == [(3, T), (1, lengths[3] + 1), (1, T)], calls  # `other` splits the run of equal lengths
    for run in runs[:5]:  # each story's own row of the pass: the logits of its prompt alone
        with torch.inference_mode():
            want = tiny.model(torch.tensor([run.story.prompt_ids]))[0][:, -1]
        torch.testing.assert_close(last_logits[run.story], want, rtol=1e-4, atol=1e-4)
    while batcher.stories:
        batcher.step()
    monkeypatch.undo()
    for run, (prompt, n) in zip(runs, prompts):
        assert run.texts == alone(tiny, prompt, n, **greedy), prompt


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


# --------------------------------------------------------------------------------------------
# The Engine: a decoding thread, a bounded queue, requests from other threads
# --------------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Wraps a model: the end-of-story token is forbidden, each call takes `delay` seconds, and every call is
    recorded as (engine step, "decode" or "prefill", rows)."""

    def __init__(self, model, eos_id, delay=0.01):
        super().__init__()
        self.inner, self.cfg, self.eos_id, self.delay = model, model.cfg, eos_id, delay
        self.engine, self.calls = None, []

    def forward(self, idx, targets=None, cache=None):
        logits, loss = self.inner(idx, targets, cache)
        logits = logits.clone()
        logits[..., self.eos_id] = float("-inf")
        self.calls.append((self.engine.steps, "decode" if isinstance(cache, RowsCache) else "prefill", idx.size(0)))
        time.sleep(self.delay)
        return logits, loss


@pytest.fixture
def recorded(tiny):
    net = Recorder(tiny.model, tiny.tokenizer.eos_id)
    return StoryModel(net, tiny.tokenizer, tiny.info, tiny.path)


def test_engine_queue_limits_and_slots(recorded):
    engine = Engine(recorded, slots=2, max_queue=1)
    recorded.model.engine = engine
    try:
        with pytest.raises(TooManyStories):
            engine.submit(["Tom"], 3, {"max_new_tokens": 5}, lambda items: None)
        first = engine.submit(["Tom"], 2, {"max_new_tokens": 4096}, lambda items: None)  # takes both slots
        second = engine.submit(["Tom"], 1, {"max_new_tokens": 4096}, lambda items: None)
        assert (engine.running, engine.waiting) == (1, 1)
        with pytest.raises(QueueFull, match="busy"):
            engine.submit(["Tom"], 1, {"max_new_tokens": 5}, lambda items: None)
        second.close()  # a waiting request leaves the queue at once
        assert (engine.running, engine.waiting) == (1, 0)
        third = engine.submit(["Tom"], 1, {"max_new_tokens": 5}, lambda items: None)
        assert engine.waiting == 1
        first.close()  # a running one leaves at the next step; the waiting one takes a slot then
        wait_until(lambda: engine.running == 1 and engine.waiting == 0)
        third.close()
        wait_until(lambda: engine.running == 0 and engine.batcher.free_slots == 2)
    finally:
        engine.close()


def test_engine_events_for_threads(tiny):
    """The web app's way in: a blocking iterator of events; the stories are those of the Python API."""
    engine = Engine(tiny, slots=4)
    try:
        options = dict(seed=5, temperature=1.0, top_p=0.9, max_new_tokens=24)
        texts, done = ["", ""], []
        for event in engine.events("Lily", 2, **options):
            if isinstance(event, Piece):
                texts[event.index] += event.text
            elif isinstance(event, Done):
                done.append(event.stats)
        assert ["Lily" + t for t in texts] == tiny.generate("Lily", num_samples=2, **options)
        assert len(done) == 1 and done[0]["new_tokens"] == sum(done[0]["tokens_per_sample"])
        # leaving early closes the request: its slots are free again at the next step
        events = engine.events("Lily", 2, max_new_tokens=4096)
        next(events)
        events.close()
        wait_until(lambda: engine.running == 0 and engine.batcher.free_slots == 4)
    finally:
        engine.close()


# --------------------------------------------------------------------------------------------
# Through the HTTP server
# --------------------------------------------------------------------------------------------
def test_disconnect_frees_the_slot_at_the_next_step(recorded):
    """Two endless streams fill both slots and a third request waits; when the first client disconnects, its
    story leaves the batch and the waiting request is prefilled into its slot at the next step."""
    app = create_app({"rec": recorded}, max_concurrency=2, max_queue=4)
    engine = app.state.engines["rec"]
    recorded.model.engine = engine
    closed_at = []
    cancel = engine.cancel

    def recording_cancel(ticket):
        closed_at.append(engine.steps)
        cancel(ticket)

    engine.cancel = recording_cancel
    body = {"prompt": "Tom", "max_tokens": 4096, "stream": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http, \
            httpx.Client(base_url=url, timeout=30) as other, contextlib.ExitStack() as streams:
        streams.enter_context(http.stream("POST", "/v1/completions", json=body))
        first = http.stream("POST", "/v1/completions", json=body)
        first_lines = first.__enter__().iter_lines()  # kept: a dropped line iterator closes the connection
        assert next(first_lines).startswith("data: {")
        wait_until(lambda: engine.running == 2)
        third = streams.enter_context(other.stream("POST", "/v1/completions", json={**body, "prompt": "Lily"}))
        wait_until(lambda: engine.waiting == 1)
        assert not closed_at
        first.__exit__(None, None, None)  # the first client disconnects
        lines = (line for line in third.iter_lines() if line)
        for _ in range(4):
            assert next(lines).startswith("data: {")
        step = closed_at[0]
        prefills = [s for s, kind, _ in recorded.model.calls if kind == "prefill" and s >= step]
        assert prefills and prefills[0] <= step + 1  # joined at the next step (or at the one then running)
        after = [rows for s, kind, rows in recorded.model.calls if kind == "decode" and s >= prefills[0] + 1]
        assert after and set(after) == {2}  # then decoded with the second request
        streams.close()
        wait_until(lambda: http.get("/health").json()["running"] == 0)
        assert engine.batcher.free_slots == 2


def test_concurrent_requests_with_their_own_seeds_and_options(tiny):
    """Requests sent at once decode in one batch, each with its seed and options, and each gets the story the
    Python API writes alone (text without the prompt)."""
    app = create_app({"tiny": tiny}, max_concurrency=8)
    requests = [dict(seed=1, temperature=1.0), dict(seed=2, temperature=1.0),
                dict(seed=1, temperature=0.7, top_k=10, repetition_penalty=1.2), dict(temperature=0),
                dict(seed=9, top_p=0.5, n=2), dict(seed=3, temperature=1.2, stop=["."])]

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={"prompt": "Ben", "max_tokens": 30, **r})
                                          for r in requests))

    with running(app) as url:
        replies = [r.json() for r in asyncio.run(main(url))]
    assert app.state.engines["tiny"].steps < sum(30 * (r.get("n", 1)) for r in requests)  # decoded together
    for options, reply in zip(requests, replies):
        options = dict(options)
        n = options.pop("n", 1)
        want = tiny.generate("Ben", num_samples=n, max_new_tokens=30, **options)
        assert [c["text"] for c in reply["choices"]] == [w[len("Ben"):] for w in want], options


def test_queue_full_is_503_and_long_prompts_are_400(recorded, tiny):
    app = create_app({"rec": recorded}, max_concurrency=1, max_queue=0)
    recorded.model.engine = app.state.engines["rec"]
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        long = http.post("/v1/completions", json={"prompt": "Tom had a red ball. " * 20})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        too_many = http.post("/v1/completions", json={"prompt": "Tom", "n": 2})
        assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_choices"
        with http.stream("POST", "/v1/completions", json={"prompt": "Tom", "max_tokens": 4096, "stream": True}):
            wait_until(lambda: http.get("/health").json()["running"] == 1)
            busy = http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 2})
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"
        wait_until(lambda: http.get("/health").json()["running"] == 0)
        assert http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 2}).status_code == 200


class Failing(torch.nn.Module):
    """Wraps a model: the decoding step raises while `fail` is set."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.cfg, self.fail = model, model.cfg, False

    def forward(self, idx, targets=None, cache=None):
        if self.fail and isinstance(cache, RowsCache):
            raise RuntimeError("out of memory")
        return self.inner(idx, targets, cache)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny):
    failing = StoryModel(Failing(tiny.model), tiny.tokenizer, tiny.info, tiny.path)
    app = create_app({"f": failing}, max_concurrency=4)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        failing.model.fail = True
        r = http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 5})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with http.stream("POST", "/v1/completions", json={"prompt": "Tom", "max_tokens": 5, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert "server_error" in lines[-2] and lines[-1] == "data: [DONE]"
        failing.model.fail = False
        assert http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 5}).status_code == 200
        assert http.get("/health").json()["running"] == 0 and app.state.engines["f"].batcher.free_slots == 4
