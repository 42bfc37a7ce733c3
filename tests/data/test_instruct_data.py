"""TinyStories-Instruct data: records built from stories, the real release's formats, and the loss mask."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from storygpt.data.instruct import build, make_record, pick_words
from storygpt.data.prepare import prepare
from storygpt.data.shards import TokenData
from storygpt.errors import StoryGPTError
from storygpt.text.checks import contains_sentence, contains_word, content_words, has_dialogue
from storygpt.text.instruct import FIELDS, header_prompt, normalize_features, normalize_words, request_prompt, split_record
from storygpt.text.stories import iter_stories
from storygpt.text.tokenizer import Tokenizer, train_tokenizer

STORIES = [
    "Once upon a time, there was a little dog named Max. Max had a red ball. He loved to jump and play in the "
    "green park. One day, Max lost his ball under a big tree. He was sad. His friend Lily said, \"Do not worry, "
    "I will help you!\" They looked and looked. At last they found the ball. Max was happy again.",
    "Tom saw a shiny star in the dark sky. He wanted to touch it. He climbed a tall hill with his mom. The star "
    "was still far away. Mom said the star was for looking, not for touching. Tom smiled and waved at the star.",
    "A small cat found a soft blanket in the warm kitchen. She curled up on it and slept all afternoon. When "
    "she woke up, the girl gave her some milk. The cat purred and rubbed her head on the girl's leg.",
]


def write_txt(path, stories):
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    return path


def parse_prompt(prompt: str) -> dict:
    """Field name -> value of a header prompt (the lines before `Story:`)."""
    return dict(line.split(": ", 1) for line in prompt.splitlines()[:-1])


def test_record_fields_come_from_the_story():
    for i, story in enumerate(STORIES * 5):
        record = make_record(story, random.Random(i), request_share=0.0)
        prompt, body = split_record(record)
        assert body == story
        fields = parse_prompt(prompt)
        assert set(fields) <= set(FIELDS) and fields
        if "Words" in fields:
            words = fields["Words"].split(", ")
            assert len(words) == 3 and all(contains_word(story, w) for w in words)
        if "Random sentence" in fields:
            assert contains_sentence(story, fields["Random sentence"]) and fields["Random sentence"] in story
        if "Features" in fields:
            assert fields["Features"] == "Dialogue" and has_dialogue(story)


def test_words_are_content_words_of_known_parts_of_speech():
    by_pos = content_words(STORIES[0])
    assert "ball" in by_pos["NOUN"] and "jump" in by_pos["VERB"] and "happy" in by_pos["ADJ"]
    assert "max" not in sum(by_pos.values(), [])  # names are not words to ask for
    assert not {"he", "his", "they", "be"} & set(sum(by_pos.values(), []))
    words = pick_words(STORIES[0], random.Random(0))
    kinds = [next(p for p, ws in by_pos.items() if w in ws) for w in words]
    assert sorted(kinds) == ["ADJ", "NOUN", "VERB"]  # one of each where the story has them


def test_requests_state_the_same_requirements():
    seen_templates = set()
    for i in range(40):
        record = make_record(STORIES[0], random.Random(i), request_share=1.0)
        prompt, body = split_record(record)
        assert prompt.startswith("Request: ") and prompt.endswith("\nStory:") and body == STORIES[0]
        request = prompt.splitlines()[0]
        seen_templates.add(request.split()[1])
        if "the sentence" in request:
            quoted = request.split('"')[1]
            assert quoted in STORIES[0]
        if "words" in request:
            tail = request.split("words")[1].split('"')[0]
            words = [w.strip(" :,.?") for w in tail.replace(" and ", ", ").split(",")][:3]
            assert all(contains_word(STORIES[0], w) for w in words), request
    assert len(seen_templates) >= 4  # varied wording, not one template


def test_dialogue_detection():
    assert has_dialogue('Lily said, "Do not worry, I will help you!"')
    assert has_dialogue("Mom said, \u201cTime for bed, little one.\u201d")
    assert not has_dialogue("Tom saw a shiny star in the dark sky.")
    assert not has_dialogue('He read the word "stop".')  # one quoted word is not speech


def test_inclusion_checks_allow_inflections():
    assert contains_word("The frog jumped high.", "jump")
    assert contains_word("She ran home.", "run")
    assert contains_word("Two happy dogs.", "dog") and contains_word("Two happy dogs.", "happy")
    assert not contains_word("The frog sat still.", "jump")
    assert contains_sentence("Hi. The dog ran, fast! Bye.", "the dog ran fast")
    assert not contains_sentence("The dog ran away.", "The dog ran fast.")


def test_build_is_seeded(tmp_path):
    src = write_txt(tmp_path / "s.txt", STORIES * 3)
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    assert build([src], a, seed=1)["records"] == 9
    build([src], b, seed=1)
    build([src], c, seed=2)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    records = list(iter_stories([a]))
    assert len(records) == 9 and all(split_record(r)[1] in STORIES for r in records)
    assert {split_record(r)[0].split(":")[0] == "Request" for r in records} == {True, False}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(iter(STORIES * 20 + ["Words: Features: Random sentence: Request: Story: Dialogue"] * 20),
                          380, "unigram")
    tok.save(d)
    return d


def test_mask_covers_exactly_the_instructions(tmp_path, tokenizer):
    records = [make_record(s, random.Random(i), request_share=i % 2) for i, s in enumerate(STORIES * 4)]
    src = write_txt(tmp_path / "r.txt", records)
    meta = prepare([src], tokenizer, tmp_path / "prep", val_fraction=0.0, progress=False)
    assert meta["mask"] is True and meta["instruct"]["format"] == "tinystories-instruct"
    tok = Tokenizer.load(tokenizer)
    data = TokenData(tmp_path / "prep", "train")
    stream, mask = np.asarray(data.shards[0]), np.asarray(data.masks[0])
    # the stream is records one after another (shuffled): each EOS-delimited record is its prompt's
    # tokens (mask 0), then its story's and the EOS (mask 1)
    ends = np.flatnonzero(stream == tok.eos_id)
    start = 0
    for end in ends:
        ids, m = stream[start:end + 1], mask[start:end + 1]
        prompt, story = split_record(tok.decode(ids))
        n_prompt = len(tok.encode(prompt))
        assert m[:n_prompt].sum() == 0 and m[n_prompt:].all()
        assert tok.decode(ids[n_prompt:]) == tok.decode(tok.encode(story))
        start = end + 1
    # batches: a target is -1 exactly where the mask is 0
    T = 96
    x, y = data.batch(3, 4, T, seed=0)
    assert (y == -1).any() and (y != -1).any()
    windows = np.lib.stride_tricks.sliding_window_view(stream, T)
    for xs, ys in zip(x.numpy(), y.numpy()):
        o = int(np.flatnonzero((windows == xs).all(1))[0])  # where the window was cut from the stream
        assert ((ys == -1) == (mask[o + 1:o + T + 1] == 0)).all()
        assert (ys[ys != -1] == stream[o + 1:o + T + 1][ys != -1]).all()
    # every training window starts at a record's start token, so its first story has its instruction;
    # the starts vary over the records that leave room for a whole window
    offsets = set()
    for step in range(40):
        x, y = data.batch(step, 4, T, seed=0)
        assert (x[:, 0] == tok.eos_id).all() and (y[:, :2] == -1).all()
        offsets |= {int(np.flatnonzero((windows == xs).all(1))[0]) for xs in x.numpy()}
    assert offsets == {int(e) for e in ends if e + T + 1 <= len(stream)}
    # evaluation windows: each at the first record start after the window before it ends
    val = data.sequential_batches(2, T, 3)
    xs = np.concatenate([x.numpy() for x, _ in val])
    seen = [int(np.flatnonzero((windows == w).all(1))[0]) for w in xs]
    expect = [int(ends[0])]
    while True:
        later = [int(e) for e in ends if e >= expect[-1] + T and e + T + 1 <= len(stream)]
        if not later or len(expect) == len(seen):
            break
        expect.append(later[0])
    assert seen == expect and len(seen) > 1
    ys = np.concatenate([y.numpy() for _, y in val])
    assert all(((yy == -1) == (mask[o + 1:o + T + 1] == 0)).all() for o, yy in zip(seen, ys))


def test_plain_stories_have_no_mask(tmp_path, tokenizer):
    meta = prepare([write_txt(tmp_path / "s.txt", STORIES)], tokenizer, tmp_path / "p", val_fraction=0.0,
                   progress=False)
    assert "mask" not in meta and not list((tmp_path / "p").glob("*.mask"))
    x, y = TokenData(tmp_path / "p").batch(0, 2, 16, 0)
    assert (y >= 0).all() and (x[:, 1:] == y[:, :-1]).all()


def test_reads_the_releases_formats(tmp_path, tokenizer):
    # TinyStories-Instruct text release: fields, then "Story: " and a blank line before the story
    txt = tmp_path / "instruct.txt"
    txt.write_text("Features: Dialogue\nWords: ball, jump, happy\nSummary: A dog loses a ball and finds it.\n"
                   f"Story: \n\n{STORIES[0]}\n<|endoftext|>\n")
    [record] = list(iter_stories([txt]))
    prompt, story = split_record(record)
    assert story == STORIES[0] and parse_prompt(prompt)["Summary"] == "A dog loses a ball and finds it."
    # the JSON release: `instruction` with words and features, `summary` beside it
    js = tmp_path / "data00.json"
    js.write_text(json.dumps([{"story": STORIES[1], "instruction": {"prompt:": "...", "words": ["star", "climb", "tall"],
                                                                       "features": ["Dialogue", "BadEnding"]},
                               "summary": "Tom wants to touch a star.", "source": "GPT-4"}]))
    [plain] = list(iter_stories([js]))
    assert plain == STORIES[1]  # without --instruct: the story alone, as for pretraining
    [record] = list(iter_stories([js], instruct=True))
    fields = parse_prompt(split_record(record)[0])
    assert fields == {"Features": "Dialogue, BadEnding", "Words": "star, climb, tall",
                      "Summary": "Tom wants to touch a star."}
    meta = prepare([js], tokenizer, tmp_path / "pj", val_fraction=0.0, progress=False, instruct=True)
    assert meta["mask"] is True


def test_prompt_building_and_bad_input():
    assert header_prompt(words="dog, ball,happy", features=["dialogue"]) == \
        "Features: Dialogue\nWords: dog, ball, happy\nStory:"
    assert header_prompt(sentence="  The dog ran.\n") == "Random sentence: The dog ran.\nStory:"
    assert request_prompt("Write a story.") == "Request: Write a story.\nStory:"
    assert normalize_features("bad ending, Twist") == ["BadEnding", "Twist"]
    with pytest.raises(StoryGPTError, match="unknown feature 'rhymes'"):
        normalize_features(["dialogue", "rhymes"])
    for bad in ("", ",", [], ["dog", ""]):
        with pytest.raises(StoryGPTError, match="empty"):
            normalize_words(bad)
    with pytest.raises(StoryGPTError, match="not a word"):
        normalize_words(["two words"])
    with pytest.raises(StoryGPTError, match="needs words"):
        header_prompt()
    assert split_record(STORIES[0]) is None  # a plain story is not a record
    assert split_record("Story time was fun.\nStory: x") is None  # a first line that is not a field


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "storygpt", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_errors_are_one_line(tmp_path):
    src = write_txt(tmp_path / "s.txt", STORIES)
    for args, message in [(["--request-share", "2"], "--request-share must be in [0, 1]"),
                          (["--copies", "0"], "--copies must be >= 1")]:
        r = run_cli("data", "instruct", "--input", str(src), "--out", str(tmp_path / "o.txt"), *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o.txt").exists()
    r = run_cli("data", "instruct", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.txt"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run_cli("data", "instruct", "--input", str(src), "--out", str(tmp_path / "o.txt"), "--seed", "3")
    assert r.returncode == 0 and "3 instruction records from 3 stories" in r.stdout


def test_main_character_is_read_from_the_story():
    from storygpt.text.checks import character_parts, is_main_character, main_character

    named = "Once upon a time, there was a little cat named Pip. Pip liked milk. One day Pip met Tom. Pip smiled."
    assert main_character(named) == "a little cat named Pip"
    assert main_character("Tom was a boy. Tom ran. Tom jumped. Sue said hi.") == "a boy named Tom"
    assert main_character("Tom was a brave boy. Tom ran. Tom jumped.") is None  # one word after the article only
    assert main_character("There was an old dog. His name was Max. Max barked at Max's ball.") == "an old dog named Max"
    # the most used name only: Sue is introduced, Tom is the main character and has no kind here
    assert main_character("There was a girl named Sue. Then Tom ran. Then Tom jumped. Then Tom fell. Sue laughed.") is None
    assert main_character("The sun was hot. A bird sang.") is None
    assert character_parts("a little cat named Pip") == ("cat", "Pip")
    assert character_parts("Pip") is None
    assert is_main_character("The little cat, Pip, played. Then Pip ran home to the other cats.", "a cat named Pip")
    # Tom is the main character (the most used name)
    assert not is_main_character("Then Tom played with Pip the cat. Then Tom ran and Tom fell.", "a cat named Pip")
    assert not is_main_character("Then Pip played. Then Pip ran. Then Pip sang.", "a cat named Pip")  # no cat in it


def test_records_and_prompts_carry_the_character():
    from storygpt.data.instruct import make_record, request_text
    from storygpt.generate.story_model import instruction_header

    story = "Once upon a time, there was a little dog named Max. Max liked to run and jump in the big green park."
    prompts = [make_record(story, random.Random(i), request_share=0.0).split("Story:")[0] for i in range(40)]
    assert any("Character: a little dog named Max\n" in p for p in prompts)
    requests = [request_text({"character": "a little dog named Max", "words": ["park"]}, random.Random(i)) for i in range(20)]
    assert all("a little dog named Max" in r and "park" in r for r in requests)
    assert request_text({"character": "a cat named Pip"}, random.Random(0)).rstrip(".?").endswith("a cat named Pip")
    head = instruction_header(words="ball", character="a cat named Pip")
    assert head == "Character: a cat named Pip\nWords: ball\nStory:" and "Character" in FIELDS
    assert split_record(head + " Pip ran.") == (head, "Pip ran.")
    with pytest.raises(StoryGPTError, match="request replaces"):
        instruction_header(request="Write a story.", character="a cat named Pip")
