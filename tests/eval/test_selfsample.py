"""storygpt data sample (selfsample.py): beginnings from prepared data, the checks a kept completion passes,
continuous-batched sampling that gives each beginning the completions `generate` gives it alone, the kept stories."""
import subprocess
import sys
from pathlib import Path

import pytest

from storygpt import load
from storygpt.data.prepare import prepare
from storygpt.errors import StoryGPTError
from storygpt.eval import selfsample
from storygpt.eval.suite import split_story
from storygpt.generate.sampling import SamplingOptions
from storygpt.text.stories import iter_stories
from storygpt.text.tokenizer import EOS_TEXT

SHIPPED = Path(__file__).resolve().parents[2] / "src/storygpt/default_model"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    stories = [f"Once upon a time, there was a girl named Lily {i}. " + " ".join(
        "Lily saw a red bird and a big dog in the park." for _ in range(7)) for i in range(16)]
    stories.insert(3, "Too short to use.")
    (tmp / "s.txt").write_text("".join(f"{s}\n{EOS_TEXT}\n" for s in stories), encoding="utf-8")
    meta = prepare([tmp / "s.txt"], SHIPPED, tmp / "data", val_fraction=0.25, seed=3, progress=False)
    return tmp, stories, meta


@pytest.fixture(scope="module")
def model():
    return load(SHIPPED, dtype="fp32")


def test_beginnings_are_the_split_stories_cut(data):
    tmp, stories, meta = data
    cut = {split_story(s, 0.25)[0] for s in stories if len(s.split()) >= 60}  # the short story is never used
    got = {split: selfsample.beginnings(tmp / "data", split, 100, 0.25) for split in ("train", "val")}
    for split, starts in got.items():
        assert set(starts) <= cut and len(set(starts)) == len(starts) >= meta["splits"][split]["stories"] - 1
        assert selfsample.beginnings(tmp / "data", split, 2, 0.25) == starts[:2]
    assert not set(got["train"]) & set(got["val"]) and len(got["train"]) + len(got["val"]) == len(cut) == 16
    with pytest.raises(StoryGPTError, match="cut must be in"):
        selfsample.beginnings(tmp / "data", "val", 2, 1.0)


def test_failed_check_names_each_failure():
    prompt = "Once upon a time, there was a girl named Lucy. Lucy had a dog called Zib."
    good = " Lucy and Zib played in the park. They were happy."
    assert selfsample.failed_check(prompt, good, ended=True) is None  # Zib is no English word, but the prompt has it
    assert selfsample.failed_check(prompt, good, ended=False) == "ended"
    assert selfsample.failed_check(prompt, " Then Lily and Zib played.", ended=True) == "names"
    assert selfsample.failed_check(prompt, " Then a boy named Tom came. Tom and Lucy played.", ended=True) is None
    assert selfsample.failed_check(prompt, " Lucy saw a blorpish cat.", ended=True) == "spelling"
    loop = " Lucy went to the big park. Lucy went to the big park."
    assert selfsample.failed_check(prompt, loop, ended=True) == "loops"


def test_sample_all_gives_each_beginning_its_own_completions(model):
    prompts = ["Once upon a time, there was a cat.", "Tom had a red ball.", "One day, Sue went to the park.",
               "The sun was hot."]
    opts = SamplingOptions(temperature=1.0, top_p=1.0, max_new_tokens=12)
    got = {i: (texts, ended) for i, texts, ended in
           selfsample.sample_all(model, prompts, 2, opts, seed=7, slots=5, progress=False)}  # joins as rows free
    assert sorted(got) == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt, num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=7 + i)
        assert [prompt + t for t in got[i][0]] == alone
        assert got[i][1] == [r == "stop" for r in model.last_stats["finish_reasons"]]
    with pytest.raises(StoryGPTError, match="at most --slots"):
        next(selfsample.sample_all(model, prompts, 6, opts, seed=0, slots=4, progress=False))


def test_build_writes_the_passing_completions(data, model, tmp_path):
    tmp, _, meta = data
    out = tmp_path / "kept.txt"
    counts = selfsample.build(model, tmp / "data", out, prompts=4, samples=3, keep=2, cut=0.25, seed=1, slots=6,
                              progress=False, max_new_tokens=160)
    assert counts["prompts"] == 4 and counts["completions"] == 12
    assert counts["passed"] + sum(counts["failed"].values()) == 12
    kept = list(iter_stories([out]))
    assert len(kept) == counts["kept"] <= min(counts["passed"], 8) and counts["kept"] >= 1
    starts = selfsample.beginnings(tmp / "data", "train", 4, 0.25)
    for story in kept:
        start = next(s for s in starts if story.startswith(s))
        assert selfsample.failed_check(start, story[len(start):], ended=True) is None
    with pytest.raises(StoryGPTError, match="--keep"):
        selfsample.build(model, tmp / "data", out, prompts=2, samples=2, keep=3)


def test_cli_bad_keep_is_one_line_exit_2(data, tmp_path):
    tmp, _, _ = data
    out = subprocess.run([sys.executable, "-m", "storygpt", "data", "sample", "--data", str(tmp / "data"),
                          "--out", str(tmp_path / "k.txt"), "--keep", "9", "--samples", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--keep" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "k.txt").exists()
