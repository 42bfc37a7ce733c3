"""The training-recipe levers: the WSD schedule, epochs of whole stories, the EMA of the weights, distillation
from teachers, branching a run from a checkpoint, and scripts/gpu_default_model.sh --smoke on the CPU.

Everything trains tiny models on the generated stories of conftest.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_stories, run_cli, write_tinystories
from safetensors.torch import load_file

from storygpt.data.epochs import StoryEpochs
from storygpt.data.prepare import prepare
from storygpt.data.shards import TokenData
from storygpt.errors import StoryGPTError
from storygpt.model.checkpoint import BEST, LATEST, load_checkpoint
from storygpt.model.config import ModelConfig
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import train_tokenizer
from storygpt.train.config import TrainConfig, build_config
from storygpt.train.distill import distill_loss, kl_loss, teacher_probs
from storygpt.train.loop import lr_at
from storygpt.train.pretrain import train

ROOT = Path(__file__).resolve().parents[2]
FAST = ["train.eval_interval=10", "train.eval_iters=2", "train.log_interval=5", "model.dropout=0.1"]
RECIPE = ["train.sampling=epochs", "train.ema_decay=0.9", "train.schedule=wsd", "train.cooldown=0.3"]


def weights(run, name=LATEST):
    return load_checkpoint(run / name)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("storygpt: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tokenizer_dir) -> Path:
    """60 stories (about 150 windows of 64 tokens in the train split): a few steps of batch 8 cross an epoch."""
    root = tmp_path_factory.mktemp("small")
    text = write_tinystories(root / "s.txt", make_stories(60, seed=5))
    prepare([text], tokenizer_dir, root / "data", val_fraction=0.2, workers=1, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir) -> Path:
    """A tiny model with the data's tokenizer, briefly trained: its exported model folder."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(data_dir, run, preset="tiny", max_steps=20, progress=False, dtype="fp32",
          overrides=["eval_interval=10", "eval_iters=2"])
    return run / "model"


# --------------------------------------------------------------------------------------------
# 1. The WSD schedule
# --------------------------------------------------------------------------------------------
def test_wsd_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, schedule="wsd", cooldown=0.2)
    assert lr_at(0, 0.0, cfg) == pytest.approx(1e-4)  # the same linear warmup
    assert lr_at(4, 0.04, cfg) == pytest.approx(0.5e-3)
    for step in (9, 10, 30, 50, 79, 80):  # stable: exactly lr from the warmup's end to the cooldown's start
        assert lr_at(step, step / 100, cfg) == 1e-3, step
    # the (1 - sqrt) cooldown over the last 20%: lr at 80%, min_lr at 100%
    assert lr_at(85, 0.85, cfg) == pytest.approx(1e-4 + (1 - math.sqrt(0.25)) * 9e-4)  # = 5.5e-4
    assert lr_at(85, 0.85, cfg) == pytest.approx(5.5e-4)
    assert lr_at(90, 0.90, cfg) == pytest.approx(1e-4 + (1 - math.sqrt(0.5)) * 9e-4)
    assert lr_at(99, 0.99, cfg) == pytest.approx(1e-4 + (1 - math.sqrt(0.95)) * 9e-4)
    assert lr_at(100, 1.0, cfg) == pytest.approx(1e-4)
    assert lr_at(150, 1.5, cfg) == pytest.approx(1e-4)  # the floor holds
    cooldown = [lr_at(s, s / 100, cfg) for s in range(80, 101)]
    assert all(a > b for a, b in zip(cooldown, cooldown[1:]))  # strictly down, all the way
    # cooldown = 1: the whole run is the cooldown
    whole = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=100, schedule="wsd", cooldown=1.0)
    assert lr_at(36, 0.36, whole) == pytest.approx(1e-3 * (1 - 0.6))


def test_cosine_schedule_unchanged():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert cfg.schedule == "cosine"  # the default
    assert lr_at(0, 0.0, cfg) == pytest.approx(1e-4)
    for p in (0.1, 0.25, 0.5, 0.8, 0.95):
        assert lr_at(int(p * 100), p, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * p)) * 9e-4)
    assert lr_at(100, 1.0, cfg) == pytest.approx(1e-4)
    assert lr_at(80, 0.8, cfg) < lr_at(80, 0.8, TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd"))


def test_recipe_config_is_checked():
    cfg = build_config("tiny", overrides=RECIPE + ["train.distill_alpha=0.7", "train.distill_temperature=2"])
    tc = cfg.train
    assert (tc.sampling, tc.ema_decay, tc.schedule, tc.cooldown) == ("epochs", 0.9, "wsd", 0.3)
    assert (tc.distill_alpha, tc.distill_temperature) == (0.7, 2.0)
    for bad, needle in [("schedule=linear", "schedule"), ("cooldown=0", "cooldown"), ("cooldown=1.5", "cooldown"),
                        ("sampling=shuffle", "sampling"), ("ema_decay=1", "ema_decay"), ("distill_alpha=1.5", "alpha"),
                        ("distill_temperature=0", "temperature")]:
        with pytest.raises(StoryGPTError, match=needle):
            build_config("tiny", overrides=[bad])


# --------------------------------------------------------------------------------------------
# 2. Epochs of whole stories
# --------------------------------------------------------------------------------------------
def stories_of(data: Path) -> list[tuple]:
    """The train split's stories as token tuples (each with its EOS), read straight from the shards."""
    td = TokenData(data, "train")
    eos = td.meta["eos_id"]
    out = []
    for shard in td.shards:
        tokens = np.asarray(shard)
        for piece in np.split(tokens, np.flatnonzero(tokens == eos) + 1):
            if len(piece):
                out.append(tuple(int(t) for t in piece))
    return out


def epoch_tokens(sampler: StoryEpochs, epoch: int) -> np.ndarray:
    """The inputs of an epoch's windows end to end (windows of batch_size 1, read in order)."""
    w = sampler.windows
    xs, ys = zip(*(sampler.batch(epoch * w + k, 1) for k in range(w)))
    for k in range(w - 1):  # packed end to end: a window's last target is the next window's first input
        assert ys[k][0, -1] == xs[k + 1][0, 0], (epoch, k)
    for x, y in zip(xs, ys):
        assert torch.equal(x[0, 1:], y[0, :-1])
    return np.concatenate([x[0].numpy() for x in xs])


def split_epoch(tokens: np.ndarray, eos: int) -> tuple[tuple, list[tuple], tuple]:
    """(the head: a story's end, the whole stories after it, the tail: a story's beginning)."""
    cuts = np.flatnonzero(tokens == eos) + 1
    pieces = [tuple(int(t) for t in p) for p in np.split(tokens, cuts)]
    return pieces[0], pieces[1:-1], pieces[-1]


def test_epochs_read_every_story_once(small_data):
    seq_len = 64
    sampler = StoryEpochs(TokenData(small_data, "train"), seq_len, seed=0)
    stories = stories_of(small_data)
    eos = TokenData(small_data, "train").meta["eos_id"]
    total = sum(map(len, stories))
    assert sampler.stories == len(stories) > 40
    assert sampler.windows == (total - seq_len) // seq_len  # every window fits whatever the random offset
    orders = []
    for epoch in (0, 1, 2):
        tokens = epoch_tokens(sampler, epoch)
        assert len(tokens) == sampler.windows * seq_len > total - 2 * seq_len
        head, whole, tail = split_epoch(tokens, eos)
        # no story twice, and only stories of the data
        assert not Counter(whole) - Counter(stories), "a story read twice in one epoch, or one not in the data"
        left = Counter(stories) - Counter(whole)
        # what is left: the story the random offset cut into, the one the epoch's remainder cuts, and any
        # story wholly in the remainder (< 2 seq_len tokens)
        assert len(left) <= 2 + (2 * seq_len) // min(map(len, stories)), len(left)
        assert sum(len(s) * n for s, n in left.items()) == total - sum(map(len, whole))
        assert any(s[len(s) - len(head):] == head for s in left), "the head is not the end of a left-over story"
        assert any(s[:len(tail)] == tail for s in left), "the tail is not the beginning of a left-over story"
        assert len(head) <= max(map(len, stories)) and len(head) > 0
        orders.append(whole)
    # each epoch a fresh order (of the same stories), none of them the data's own order
    assert orders[0] != orders[1] != orders[2] != orders[0]
    index = {s: i for i, s in enumerate(stories)}
    for whole in orders:
        positions = [index[s] for s in whole]
        assert positions != sorted(positions)
    assert sampler.epoch(sampler.windows, 1) == 1.0
    assert sampler.epoch(10, 8) == pytest.approx(80 / sampler.windows)


def test_epochs_batches_are_a_pure_function(small_data):
    def fresh(seed=3):
        return StoryEpochs(TokenData(small_data, "train"), 64, seed=seed)

    a, b = fresh(), fresh()
    later = [b.batch(i, 8) for i in (40, 3, 19)]  # b reads other epochs first: its cache must not matter
    for i, (x2, y2) in zip((40, 3, 19), later):
        x1, y1 = a.batch(i, 8)
        assert x1.shape == (8, 64) and x1.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2), i
        assert torch.equal(fresh().batch(i, 8)[0], x1)
    assert not torch.equal(fresh(seed=4).batch(3, 8)[0], a.batch(3, 8)[0])
    assert not torch.equal(a.batch(4, 8)[0], a.batch(3, 8)[0])


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory, stories, tokenizer_dir):
    """Instruction records prepared with the tiny models' tokenizer (the data carries a loss mask)."""
    root = tmp_path_factory.mktemp("instruct")
    records = [f"Words: {s.split()[7].strip('.,')}, {s.split()[-1].strip('.')}\nStory: {s}" for s in stories[:120]]
    meta = prepare([write_tinystories(root / "records.txt", records)], tokenizer_dir, root / "data", val_fraction=0.1,
                   workers=1, progress=False)
    assert meta.get("mask"), "data prepare did not mask the instructions"
    return root / "data"


def test_epochs_refuse_instruction_data(tmp_path, instruct_data, capsys):
    with pytest.raises(StoryGPTError, match="sampling=epochs"):
        StoryEpochs(TokenData(instruct_data, "train"), 64, seed=0)
    code, _, err = run_cli(["train", "--data", instruct_data, "--out", tmp_path / "r", "--preset", "tiny",
                            "--max-steps", "5", "--quiet", "--set", "sampling=epochs"], capsys)
    one_line_error(code, err, "sampling=epochs", "instruction")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------
# 3. Exact resume with the whole recipe
# --------------------------------------------------------------------------------------------
def test_resume_is_exact_with_epochs_ema_and_wsd(tmp_path, small_data):
    straight, staged = tmp_path / "straight", tmp_path / "staged"
    kw = dict(preset="tiny", overrides=FAST + RECIPE, max_steps=30, progress=False, dtype="fp32")
    full = train(small_data, straight, **kw)
    s1 = train(small_data, staged, **kw, until_step=13)
    assert s1["stop_reason"] == "until_step" and s1["step"] == 13
    assert "ema" in load_checkpoint(staged / LATEST)
    s2 = train(None, staged, resume=True, progress=False)
    assert s2["step"] == 30 and s2["best_val_loss"] == full["best_val_loss"]
    a, b = load_checkpoint(straight / LATEST), load_checkpoint(staged / LATEST)
    assert_same_weights(a["model"], b["model"])
    assert a["ema"].keys() == b["ema"].keys()
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert int(a["ema"]["n_averaged"]) == 30  # one update per step
    ema = {k.removeprefix("module."): v for k, v in a["ema"].items() if k.startswith("module.")}
    assert ema.keys() == a["model"].keys() and not same_weights(ema, a["model"])  # an average, not a copy
    assert_same_weights(weights(straight, BEST), weights(staged, BEST))
    # the epochs were read: more than one of them in 30 steps of 8 windows, logged as such
    assert full["epochs"] > 1 and s2["epochs"] == full["epochs"]
    log = read_log(staged)
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps))
    windows = StoryEpochs(TokenData(small_data, "train"), 64, 1337).windows
    for r in log:
        assert r["epoch"] == round(r["step"] * 8 / windows, 4)
    # the lr each step trained with is the WSD schedule's (logged after step s: the lr of step s - 1)
    tc = build_config("tiny", overrides=FAST + RECIPE + ["max_steps=30"]).train
    lrs = {r["step"]: r["lr"] for r in log if "lr" in r}
    assert len(lrs) > 5
    for step, lr in lrs.items():
        assert lr == pytest.approx(lr_at(step - 1, (step - 1) / 30, tc)), step
    assert lrs[20] == tc.lr and lrs[30] < tc.lr / 2
    assert [r["lr"] for r in read_log(straight) if "lr" in r] == list(lrs.values())


# --------------------------------------------------------------------------------------------
# 4. The EMA: evaluated beside the weights, exported when it is better
# --------------------------------------------------------------------------------------------
def test_ema_is_logged_and_exported_when_better(tmp_path, data_dir):
    src, wrecked = tmp_path / "src", tmp_path / "wrecked"
    train(data_dir, src, preset="tiny", max_steps=30, progress=False, dtype="fp32",
          overrides=["eval_interval=10", "eval_iters=2", "log_interval=5", "ema_decay=0.99", "lr=1e-2"])
    evals = [r for r in read_log(src) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert all("ema_val_loss" in r and "ema_val_bpb" in r for r in evals)
    assert evals[0]["ema_val_loss"] == evals[0]["val_loss"]  # at step 0 the EMA is the weights
    # a slow EMA lags behind a model that is learning: the weights themselves are exported
    assert all(r["ema_val_loss"] > r["val_loss"] for r in evals[1:])
    best = load_checkpoint(src / BEST)
    assert best["weights"] == "model" and best["step"] == 30
    exported = load_file(src / "model" / "model.safetensors")
    assert exported and all(torch.equal(v, best["model"][k]) for k, v in exported.items())
    # one step at a huge learning rate wrecks the weights, while the EMA moves 1% of the way: it is exported
    summary = train(None, wrecked, branch_from=src, progress=False, overrides=["max_steps=31", "lr=0.5", "min_lr=0.5"])
    last = read_log(wrecked)[-1]
    assert last["step"] == 31 and last["ema_val_loss"] < last["val_loss"] - 0.5, last
    assert summary["best_val_loss"] == last["ema_val_loss"]
    assert summary["best_val_loss"] > load_checkpoint(src / BEST)["best_val_loss"]  # the branch's best starts afresh
    before, after, best = load_checkpoint(src / LATEST), load_checkpoint(wrecked / LATEST), load_checkpoint(wrecked / BEST)
    assert best["weights"] == "ema" and best["step"] == 31 and after["weights"] == "model"
    ema = {k.removeprefix("module."): v for k, v in after["ema"].items() if k.startswith("module.")}
    # the EMA's update: ema <- 0.99 ema + 0.01 weights
    for k, v in ema.items():
        expect = 0.99 * before["ema"][f"module.{k}"] + 0.01 * after["model"][k]
        torch.testing.assert_close(v, expect, rtol=1e-5, atol=1e-6, msg=k)
    assert not same_weights(ema, after["model"])
    exported = load_file(wrecked / "model" / "model.safetensors")
    assert exported and all(torch.equal(v, ema[k]) for k, v in exported.items())
    assert all(torch.equal(v, best["model"][k]) for k, v in exported.items())
    info = json.loads((wrecked / "model" / "config.json").read_text())
    assert info["storygpt"]["val_loss"] == last["ema_val_loss"] and info["storygpt"]["step"] == 31


# --------------------------------------------------------------------------------------------
# 5. Distillation
# --------------------------------------------------------------------------------------------
def test_distill_loss_matches_a_reference():
    g = torch.Generator().manual_seed(0)
    B, T, V, temp, alpha = 3, 7, 13, 2.0, 0.3
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    teacher_logits = torch.randn(B, T, V, generator=g) * 3
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :4] = -1
    y[2, 5] = -1
    probs = torch.softmax(teacher_logits / temp, -1)
    probs[1, 2] = 0.0
    probs[1, 2, 4] = 1.0  # a one-hot teacher: zeros in p carry no KL
    ce = F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-1)
    keep = y != -1
    kl = F.kl_div(torch.log_softmax(logits / temp, -1), probs, reduction="none").sum(-1)
    reference = (1 - alpha) * ce + alpha * temp ** 2 * kl[keep].sum() / keep.sum()
    # by the explicit formula as well
    explicit = sum(float((probs[b, t] * (probs[b, t].clamp_min(1e-30).log() - torch.log_softmax(logits[b, t].detach() / temp, -1))).sum())
                   for b in range(B) for t in range(T) if y[b, t] != -1) / int(keep.sum())
    assert float(kl[keep].mean().detach()) == pytest.approx(explicit, rel=1e-5)
    got = distill_loss(ce, logits, probs, y, alpha, temp)
    torch.testing.assert_close(got, reference)
    torch.testing.assert_close(kl_loss(probs, logits, y, temp), kl[keep].mean())
    # the masked positions carry no gradient of the KL
    kl_loss(probs, logits, y, temp).backward()
    assert logits.grad[~keep].abs().max() == 0 and logits.grad[keep].abs().max() > 0
    # identical distributions: no KL
    torch.testing.assert_close(kl_loss(torch.softmax(logits.detach() / temp, -1), logits.detach(), y, temp),
                               torch.tensor(0.0), atol=1e-6, rtol=0)


def test_teacher_probs_are_the_mean_of_the_teachers():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, max_seq_len=16)
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(Transformer(cfg).eval())
    x = torch.randint(0, 50, (2, 9))
    y = torch.randint(0, 50, (2, 9))
    y[0, 0] = -1
    with torch.no_grad():
        expect = sum(torch.softmax(t(x, y)[0] / 1.5, -1) for t in teachers) / 2
    got = teacher_probs(teachers, x, y, 1.5)
    assert got.shape == (2, 9, 50)
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 9))


def test_distill_alpha_zero_is_training_without_teachers(tmp_path, data_dir, teacher):
    kw = dict(preset="tiny", max_steps=8, progress=False, dtype="fp32")
    overrides = ["eval_interval=4", "eval_iters=2", "model.dropout=0.1"]
    plain = train(data_dir, tmp_path / "plain", overrides=overrides, **kw)
    zero = train(data_dir, tmp_path / "zero", overrides=overrides + ["distill_alpha=0"], teachers=[teacher], **kw)
    assert zero["teachers"] == 1 and "teachers" not in plain
    assert zero["best_val_loss"] == plain["best_val_loss"]
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "zero"))
    half = train(data_dir, tmp_path / "half", overrides=overrides + ["distill_alpha=0.5", "distill_temperature=2"],
                 teachers=[teacher], **kw)
    assert half["teachers"] == 1
    assert not same_weights(weights(tmp_path / "plain"), weights(tmp_path / "half"))  # the teacher does teach
    # the loss logged stays the cross-entropy: at step 1 (the same weights) it is the plain run's
    first = [r["loss"] for r in read_log(tmp_path / "half") if r["step"] == 1 and "loss" in r]
    assert first == [r["loss"] for r in read_log(tmp_path / "plain") if r["step"] == 1 and "loss" in r]


def test_distill_resume_keeps_the_teachers(tmp_path, data_dir, teacher):
    kw = dict(preset="tiny", max_steps=12, progress=False, dtype="fp32",
              overrides=["eval_interval=4", "eval_iters=2", "model.dropout=0.1", "distill_alpha=0.7"])
    train(data_dir, tmp_path / "straight", teachers=[teacher], **kw)
    train(data_dir, tmp_path / "staged", teachers=[teacher], until_step=5, **kw)
    cfg = json.loads((tmp_path / "staged" / "config.json").read_text())
    assert cfg["teachers"] == [str(teacher.resolve())]
    summary = train(None, tmp_path / "staged", resume=True, progress=False)  # no teachers given: the run's
    assert summary["teachers"] == 1 and summary["step"] == 12
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "staged"))


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, stories) -> Path:
    """A tiny model with another tokenizer (BPE, same vocabulary size) than the data's."""
    root = tmp_path_factory.mktemp("other")
    train_tokenizer(stories, 320, "bpe").save(root / "tok")
    prepare([write_tinystories(root / "s.txt", stories[:100])], root / "tok", root / "data", val_fraction=0.2,
            workers=1, progress=False)
    train(root / "data", root / "run", preset="tiny", max_steps=3, progress=False, overrides=["eval_iters=1"])
    return root / "run" / "model"


def test_teacher_with_another_tokenizer_is_a_one_line_error(tmp_path, data_dir, teacher, other_teacher, capsys):
    out = tmp_path / "student"
    code, _, err = run_cli(["train", "--data", data_dir, "--out", out, "--preset", "tiny", "--max-steps", "3",
                            "--quiet", "--teacher", teacher, "--teacher", other_teacher], capsys)
    one_line_error(code, err, str(other_teacher.resolve()), "tokenizer")
    assert not out.exists()  # nothing written
    code, out_text, err = run_cli(["train", "--data", data_dir, "--out", out, "--preset", "tiny", "--max-steps", "3",
                                   "--quiet", "--set", "eval_iters=1", "--teacher", teacher], capsys)
    assert code == 0, err
    assert json.loads(out_text)["teachers"] == 1


# --------------------------------------------------------------------------------------------
# 6. Branching a run
# --------------------------------------------------------------------------------------------
def test_branch_of_a_stopped_run_goes_on_as_the_run_would(tmp_path, data_dir):
    src, branch, straight = tmp_path / "src", tmp_path / "branch", tmp_path / "straight"
    kw = dict(preset="tiny", max_steps=30, progress=False, dtype="fp32", overrides=FAST + ["schedule=wsd"])
    train(data_dir, straight, **kw)
    train(data_dir, src, until_step=13, **kw)
    before = hashes(src)
    summary = train(None, branch, branch_from=src, progress=False)
    assert summary["step"] == 30 and summary["stop_reason"] == "max_steps"
    assert hashes(src) == before  # the source untouched: no byte of its checkpoints changed
    assert_same_weights(weights(straight), weights(branch))
    assert (branch / "model" / "model.safetensors").is_file() and not (src / "model").exists()
    log = read_log(branch)
    assert [r for r in log if r["step"] <= 13] == read_log(src)
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    # and the source is still resumable, to the same end
    train(None, src, resume=True, progress=False)
    assert_same_weights(weights(straight), weights(src))


def test_branch_of_a_finished_run_through_the_cli(tmp_path, data_dir, capsys):
    src, branch = tmp_path / "src", tmp_path / "branch"
    train(data_dir, src, preset="tiny", max_steps=20, progress=False, dtype="fp32",
          overrides=FAST + ["schedule=wsd", "ema_decay=0.9"])
    before = hashes(src)
    # a bad --set is refused before anything is written: the same command, corrected, then works
    code, _, err = run_cli(["train", "--resume", src, "--out", branch, "--set", "max_stepz=40", "--quiet"], capsys)
    one_line_error(code, err, "max_stepz")
    assert not branch.exists()
    code, out, err = run_cli(["train", "--resume", src, "--out", branch, "--set", "max_steps=40", "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == 40 and summary["run"] == str(branch)
    assert hashes(src) == before
    assert load_checkpoint(src / LATEST)["step"] == 20 and load_checkpoint(branch / LATEST)["step"] == 40
    assert json.loads((branch / "config.json").read_text())["train"]["max_steps"] == 40
    assert json.loads((src / "config.json").read_text())["train"]["max_steps"] == 20
    log = read_log(branch)
    assert [r for r in log if r["step"] <= 20] == read_log(src)
    new = [r for r in log if r["step"] > 20]
    assert [r["step"] for r in new if "loss" in r] == [25, 30, 35, 40]  # from the source's step on
    # the branch's schedule is the new one, from step 20 on
    tc = build_config("tiny", overrides=FAST + ["schedule=wsd", "ema_decay=0.9", "max_steps=40"]).train
    for r in new:
        if "lr" in r:
            assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, (r["step"] - 1) / 40, tc))
    # the best is the branch's own: chosen among its evaluations, not the source's
    evals = [min(r["val_loss"], r["ema_val_loss"]) for r in new if "val_loss" in r]
    assert [r["step"] for r in new if "val_loss" in r] == [30, 40]
    assert summary["best_val_loss"] == min(evals)
    assert load_checkpoint(branch / BEST)["step"] in (30, 40)
    assert not same_weights(weights(src), weights(branch))
    # a branch into a folder that holds a run is refused
    code, _, err = run_cli(["train", "--resume", src, "--out", branch, "--quiet"], capsys)
    one_line_error(code, err, "already holds a training run")
    assert hashes(src) == before


def test_branch_with_a_bad_teacher_leaves_no_branch(tmp_path, data_dir, other_teacher, capsys):
    src, branch = tmp_path / "src", tmp_path / "branch"
    train(data_dir, src, preset="tiny", max_steps=4, progress=False, dtype="fp32", overrides=FAST)
    before = hashes(src)
    code, _, err = run_cli(["train", "--resume", src, "--out", branch, "--teacher", other_teacher, "--quiet"], capsys)
    one_line_error(code, err, "tokenizer")
    assert not branch.exists() and hashes(src) == before


# --------------------------------------------------------------------------------------------
# 7. scripts/gpu_default_model.sh --smoke
# --------------------------------------------------------------------------------------------
def test_gpu_script_smoke(tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    write_tinystories(inputs / "train.txt", make_stories(300, seed=11))
    write_tinystories(inputs / "train_extra.txt", make_stories(100, seed=12))
    write_tinystories(inputs / "heldout.txt", make_stories(40, seed=13))
    env = os.environ | {"PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_default_model.sh"), str(out), "--smoke",
                           "--inputs", str(inputs)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert results["smoke"] is True and len(runs) == 9
    assert all("error" not in s for s in runs.values()), {n: s["error"] for n, s in runs.items() if "error" in s}
    for name, s in runs.items():
        assert math.isfinite(s["heldout_bpb"]) and 0 < s["heldout_bpb"] < 20, name
        assert 0 <= s["cloze"] <= 1 and 0 <= s["grammar"] <= 1 and 0 <= s["continuation"] <= 1, name
    assert runs["distilled"]["teachers"] == 2 and "teachers" not in runs["student"]
    # the best student: chosen on its own val split, never a teacher
    students = {n: s for n, s in runs.items() if not n.startswith("teacher")}
    assert results["best"] in students
    assert runs[results["best"]]["best_val_bpb"] == min(s["best_val_bpb"] for s in students.values())
    # what comes back from the GPU machine: at most 8 files, none of 16 MiB
    files = sorted(p for p in out.rglob("*"))
    assert all(p.is_file() for p in files) and len(files) <= 8, files
    assert all(p.stat().st_size < 16 << 20 for p in files)
    assert {"results.json", "runs.tar.gz", "curves.png", "best.0.safetensors", "second.0.safetensors"} <= {p.name for p in files}
    assert set(results["files"]) <= {p.name for p in files}
    ranked = sorted(students, key=lambda n: students[n]["best_val_bpb"])
    assert [results["configs"][k]["run"] for k in ("best", "second")] == ranked[:2]
    # the best student's weights, in bf16
    packed = {}
    for name in results["files"]:
        if name.startswith("best.") and name.endswith(".safetensors"):
            packed |= load_file(out / name)
    work = tmp_path / "out_work"
    exported = load_file(work / results["best"] / "model" / "model.safetensors")
    assert packed.keys() == exported.keys()
    assert all(torch.equal(packed[k], v.to(torch.bfloat16)) for k, v in exported.items())
    config = dict(results["configs"]["best"])
    assert config.pop("run") == results["best"]
    assert config == json.loads((work / results["best"] / "model" / "config.json").read_text())
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert all(f"{n}/log.jsonl" in names and f"{n}/config.json" in names for n in runs)


def test_gpu_instruct_script_smoke(tmp_path):
    """scripts/gpu_instruct.sh --smoke: records of the shipped tokenizer's text, a LoRA and a full fine-tune of
    the shipped model side by side, and what comes back: the adapter and the full model in bf16 parts."""
    from storygpt.data.instruct import build

    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    write_tinystories(tmp_path / "stories.txt", make_stories(400, seed=21))
    build([str(tmp_path / "stories.txt")], str(tmp_path / "records.txt"), seed=0)
    with open(tmp_path / "records.txt", "rb") as src, gzip.open(inputs / "records.txt.gz", "wb") as dst:
        dst.write(src.read())
    env = os.environ | {"PYTHON": sys.executable, "STORYGPT_GPU_INSTRUCT": str(inputs)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_instruct.sh"), str(out), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["full.0.safetensors", "full.1.safetensors", "full.config.json", "full.tar.gz", "lora.tar.gz"]
    assert all((out / f).stat().st_size < 16 << 20 for f in files)
    work = tmp_path / "out_work"
    packed = load_file(out / "full.0.safetensors") | load_file(out / "full.1.safetensors")
    exported = load_file(work / "full" / "model" / "model.safetensors")
    assert packed.keys() == exported.keys()
    assert all(torch.equal(packed[k], v.to(torch.bfloat16)) for k, v in exported.items())
    assert json.loads((out / "full.config.json").read_text())["storygpt"]["instruct"]["version"] == 2
    with tarfile.open(out / "lora.tar.gz") as tar:
        assert {"adapter/adapter_model.safetensors", "adapter/storygpt.json", "log.jsonl"} <= set(tar.getnames())
