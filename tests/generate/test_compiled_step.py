"""The compiled decoding step (story_model.greedy_step in Batcher.forward): one graph per batch size and cache
length, its own greedy token, and the same stories as eager decoding; a story's text extended token by token."""

from __future__ import annotations

import random

import pytest
import torch

import storygpt
from storygpt.generate import batching
from storygpt.generate.batching import Batcher, length_bucket, length_buckets
from storygpt.generate.story_text import extended_text
from storygpt.generate.story_model import greedy_step
from storygpt.model.cache import KVCache
from storygpt.model.config import ModelConfig
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer


def test_length_buckets():
    assert length_buckets(512) == [64, 128, 256, 512]
    assert length_buckets(256) == [64, 128, 256]
    assert length_buckets(2048) == [256, 512, 1024, 2048]  # at most four graphs per batch size
    assert length_buckets(100) == [100] and length_buckets(32) == [32]
    assert [length_bucket(n, 512) for n in (1, 64, 65, 128, 129, 300, 512)] == [64, 64, 128, 128, 256, 512, 512]


def test_greedy_step_picks_the_top_logit():
    """Eagerly (what torch.compile compiles): the logits of decode_rows over `length` positions, their argmax,
    and their argmax with the end-of-story token barred."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, max_seq_len=32)
    net = Transformer(cfg).eval()
    cache = KVCache(cfg, 3, max_len=32)
    step = greedy_step(net, eos_id=0)
    idx, slots, pos = torch.tensor([[3], [5]]), torch.tensor([0, 2]), torch.tensor([0, 0])
    with torch.inference_mode():
        want = net.decode_rows(idx, slots, pos, cache, 16)[:, -1]
        # the top token is made the end-of-story token in row 0, to see the barred argmax differ
        net.output.weight[0] = net.output.weight[want[0].argmax()] * 2
        want = net.decode_rows(idx, slots, pos, cache, 16)[:, -1]
        logits, top, barred = step(idx, slots, pos, cache, 16)
    torch.testing.assert_close(logits, want)
    assert top.tolist() == want.argmax(-1).tolist() and top[0] == 0
    assert barred[0] != 0 and barred[0] == want[0, 1:].argmax() + 1
    assert barred[1] == want[1].argmax() or want[1].argmax() == 0


@pytest.fixture(scope="module")
def models(tiny_run):
    """The tiny model eager and compiled, with cache lengths of 16, 32 and 64 (its context) to cross."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batching, "MIN_LENGTH", 16)
        eager, compiled = storygpt.load(tiny_run, dtype="fp32"), storygpt.load(tiny_run, dtype="fp32", compile=True)
        assert length_buckets(compiled.context) == [16, 32, 64]
        yield eager, compiled


def test_compiled_greedy_equals_eager_across_lengths(models):
    """A greedy story long enough to cross every cache length and to slide past the context: token for token
    the eager story, with the end-of-story token barred or allowed, with a repetition penalty (which takes
    the logits, not the compiled argmax), and for two samples."""
    eager, compiled = models
    n = compiled.context + 24
    for options in ({"ignore_eos": True}, {}, {"repetition_penalty": 1.3, "ignore_eos": True}):
        options = {"temperature": 0, "max_new_tokens": n, **options}
        assert compiled.generate("Once upon a time", **options) == eager.generate("Once upon a time", **options)
    options = {"temperature": 0, "max_new_tokens": 70, "ignore_eos": True}
    assert compiled.generate("Tom", num_samples=2, **options) == eager.generate("Tom", num_samples=2, **options)


def test_compiled_sampling_same_seed_same_story(models):
    eager, compiled = models
    options = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "max_new_tokens": 90, "seed": 11}
    first = compiled.generate("Once", num_samples=2, **options)
    assert compiled.generate("Once", num_samples=2, **options) == first
    assert first[0] != first[1]
    assert eager.generate("Once", num_samples=2, **options) == eager.generate("Once", num_samples=2, **options)


def test_forward_compiled_matches_eager(models):
    """Batcher.forward: the compiled step's logits are the eager step's, rows at different positions, gathered
    from scattered slots and padded to a power of two, at every cache length."""
    eager, compiled = models
    batchers = [Batcher(m, slots=4) for m in (eager, compiled)]
    torch.manual_seed(0)
    with torch.inference_mode():
        for p in range(compiled.context):  # rows 0, 1, 3 filled with the same random tokens in both caches
            tokens = torch.randint(0, 100, (3,)).tolist()
            outs = [b.forward([0, 1, 3], tokens, [p, max(p - 10, 0), p // 2]) for b in batchers]
            torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-4, rtol=1e-4)
            assert outs[1][1].tolist() == outs[0][0].argmax(-1).tolist()
            assert outs[0][1] is None


@pytest.mark.parametrize("which", ["shipped", "test"])
def test_extended_text_is_the_decoded_text(which, tokenizer_dir):
    """Random rows of plain, byte (about 1 in 5: broken and whole UTF-8 sequences), start- and end-of-story tokens:
    the text extended token by token is the row's decoded text at every step."""
    tok = storygpt.load().tokenizer if which == "shipped" else Tokenizer.load(tokenizer_dir)
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    assert byte_ids
    rows = [[rng.choice(byte_ids) if r < 0.2 else tok.eos_id if r < 0.22 else rng.randrange(tok.vocab_size)
             for r in (rng.random() for _ in range(40))] for _ in range(150)]
    rows += [tok.encode(" Él dijo: «café» 😀, naïve — 東京.\n\nThe end. ") * 2]  # whole UTF-8 characters of bytes
    for i, tokens in enumerate(rows):
        row = [tok.bos_id] if i % 5 else []
        text = tok.decode(row)
        for token in tokens:
            text = extended_text(tok, row, text, token)
            row.append(token)
            assert text == tok.decode(row)
