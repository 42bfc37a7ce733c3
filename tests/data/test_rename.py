"""Character renaming (storygpt.rename, `storygpt data rename`): consistent, gender-keeping, seeded."""
import random
import re
import subprocess
import sys

import pytest

from storygpt.data.rename import build, name_pool, rename_characters
from storygpt.errors import StoryGPTError
from storygpt.text import measures
from storygpt.text.stories import EOS_TEXT, expand_inputs, iter_stories

STORY = ("Once upon a time, there was a girl named Lily. Lily had a dog called Spot and a brother named Tim. "
         "Tim and his friend Timmy liked to play with Lily's ball. One day, Lily said, \"Tim, let's go!\" "
         "Spot barked and Lily laughed.")


def test_pool_knows_genders_and_offers_only_unambiguous_non_words():
    pool = name_pool()
    assert pool.gender("Lily") == "female" and pool.gender("Tim") == "male"
    assert pool.gender("Spot") is None  # no gender: left alone
    assert len(pool.female_new) > 1000 and len(pool.male_new) > 1000
    assert not set(pool.female_new) & set(pool.male_new)
    for name in pool.female_new[:200] + pool.male_new[:200]:
        assert re.fullmatch(r"[A-Z][a-z]+", name) and not measures.known_word(name.lower())


def test_rename_is_consistent_and_keeps_gender_and_the_rest_of_the_text():
    pool = name_pool()
    out = rename_characters(STORY, random.Random(3), pool)
    old, new = measures.names(STORY), measures.names(out)
    assert old == ["Lily", "Spot", "Tim", "Timmy"]
    assert len(new) == len(old) and new[1] == "Spot"
    mapping = dict(zip(old, new))
    assert pool.gender(mapping["Lily"]) == "female" and pool.gender(mapping["Tim"]) == "male"
    assert len(set(new)) == 4 and not set(new) - {"Spot"} & set(old)
    # replacing the new names back gives the story again: every use (possessive too) was renamed, nothing else
    back = re.sub(r"\b(" + "|".join(new) + r")\b", lambda m: dict(zip(new, old))[m.group()], out)
    assert back == STORY
    assert f"{mapping['Lily']}'s ball" in out
    # a story that keeps its names still does after renaming (the measure sees the same characters)
    cut = len(STORY) // 3
    assert measures.keeps_names(out[:cut], out[cut:]) == measures.keeps_names(STORY[:cut], STORY[cut:])


def test_rename_depends_only_on_the_seed():
    a = rename_characters(STORY, random.Random(7))
    assert a == rename_characters(STORY, random.Random(7))
    assert a != rename_characters(STORY, random.Random(8))
    assert rename_characters("The dog ran home. It was happy.", random.Random(0)) == "The dog ran home. It was happy."


@pytest.fixture
def stories_file(tmp_path):
    names = ["Lily", "Tom", "Sue", "Ben", "Mia", "Max"]
    stories = [f"Once there was a child named {n}. {n} liked to run. {n} ran to the park every day." for n in names * 10]
    stories.append("A dog ran home. The end.")
    path = tmp_path / "in.txt"
    path.write_text("".join(f"{s}\n{EOS_TEXT}\n" for s in stories), encoding="utf-8")
    return path, stories


def test_build_renames_the_share_asked_and_keeps_order(stories_file, tmp_path):
    path, stories = stories_file
    counts = build([str(path)], str(tmp_path / "none.txt"), share=0.0)
    assert counts == {"stories": 61, "renamed": 0}
    assert list(iter_stories(expand_inputs([tmp_path / "none.txt"]))) == stories
    counts = build([str(path)], str(tmp_path / "all.txt"), share=1.0, seed=1)
    out = list(iter_stories(expand_inputs([tmp_path / "all.txt"])))
    assert counts == {"stories": 61, "renamed": 60} and len(out) == 61 and out[-1] == stories[-1]
    for old, new in zip(stories[:-1], out[:-1]):
        name = measures.names(new)[0]
        assert new == old.replace(measures.names(old)[0], name) and name != measures.names(old)[0]
    half = build([str(path)], str(tmp_path / "half.txt"), share=0.5, seed=1)
    assert 15 <= half["renamed"] <= 45
    assert build([str(path)], str(tmp_path / "half2.txt"), share=0.5, seed=1) == half
    assert (tmp_path / "half.txt").read_bytes() == (tmp_path / "half2.txt").read_bytes()


def test_bad_share_is_one_clear_line_and_exit_2(stories_file, tmp_path):
    path, _ = stories_file
    with pytest.raises(StoryGPTError, match="--share"):
        build([str(path)], str(tmp_path / "x.txt"), share=1.5)
    r = subprocess.run([sys.executable, "-m", "storygpt", "data", "rename", "--input", str(path), "--out",
                        str(tmp_path / "x.txt"), "--share", "-1"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["storygpt: error: --share must be in [0, 1], got -1.0"]
    assert not (tmp_path / "x.txt").exists()
