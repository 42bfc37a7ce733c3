"""Using instruction-tuned models: the prompt that generate() builds from words, a sentence, features or a
request, guided decoding (guide.py) of their stories, the CLI's options, the chat endpoint's request format,
the shipped names "default" and "instruct",
and the web app's inputs.

The models are tiny random Transformers over the test tokenizer (no training): an "instruct" one whose
config.json says it is instruction-tuned, and a plain one with the same weights. Their end-of-story output
row is zeroed, so greedy stories never end early and comparisons are over real text, and different prompts
give different stories (checked, so that the equalities below tell prompts apart).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from conftest import run_cli, running
from openai import OpenAI
from streamlit.testing.v1 import AppTest

import storygpt
import storygpt.app.page as app_module
import storygpt.model.load as checkpoint
from storygpt.app import find_models
from storygpt.app.page import MODELS_ENV, model_choices
from storygpt.errors import StoryGPTError
from storygpt.model.config import ModelConfig
from storygpt.model.load import instruct_model_path, shipped_or
from storygpt.model.model_dir import save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.serve import create_app, load_models
from storygpt.text.checks import contains_sentence, contains_word
from storygpt.text.instruct import INSTRUCT_INFO, header_prompt, request_prompt
from storygpt.text.tokenizer import Tokenizer

GREEDY = dict(temperature=0, max_new_tokens=16)
WORDS = "dog, ball, happy"
SENTENCE = "The dog ran to the park."
GUIDE_WORDS = ["dog", "ball", "happy"]


def make_model_dir(out: Path, tokenizer_dir: Path, info: dict) -> Path:
    tok = Tokenizer.load(tokenizer_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=128, tie_embeddings=False)
    torch.manual_seed(0)
    net = Transformer(cfg)
    with torch.no_grad():
        for name, weight in net.named_parameters():  # attention that matters: greedy stories vary with the prompt
            if "wqkv" in name or "wo." in name:
                weight.mul_(20)
        net.output.weight.normal_(0, 1)
        net.output.weight[tok.eos_id] = 0  # the end-of-story logit is 0, the largest of the others is above it
    return save_model_dir(out, cfg, net.state_dict(), tok, info={"params": net.num_params(), **info})


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("instruct") / "instruct-tiny", tokenizer_dir,
                          {"instruct": INSTRUCT_INFO})


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("plain") / "plain-tiny", tokenizer_dir, {})


@pytest.fixture(scope="module")
def instruct(instruct_dir):
    return storygpt.load(instruct_dir, dtype="fp32")


@pytest.fixture(scope="module")
def plain(plain_dir):
    return storygpt.load(plain_dir, dtype="fp32")


@pytest.fixture
def installed(monkeypatch, instruct_dir):
    """The instruct model "ships" with the package: src/storygpt/instruct_model is the test's model."""
    monkeypatch.setattr(checkpoint, "INSTRUCT_MODEL", instruct_dir)
    return instruct_dir


@pytest.fixture
def not_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "INSTRUCT_MODEL", tmp_path / "instruct_model")


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------
def test_generate_reads_the_header_and_returns_the_story(instruct):
    assert instruct.is_instruct
    head = header_prompt(words=WORDS, sentence=SENTENCE, features="dialogue")
    assert head == f"Features: Dialogue\nWords: dog, ball, happy\nRandom sentence: {SENTENCE}\nStory:"
    assert instruct.instruct_prompt(words=WORDS, sentence=SENTENCE, features="dialogue") == head
    assert instruct.instruct_prompt("Tom ran") is None  # nothing asked: a plain beginning
    whole = instruct.generate(head, **GREEDY)  # the plain API: the header is a prompt like any other
    assert whole.startswith(head)
    story = instruct.generate(words=WORDS, sentence=SENTENCE, features=["Dialogue"], **GREEDY)
    assert story == whole[len(head):].lstrip() and story and not story[0].isspace()
    assert "".join(instruct.stream(words=WORDS, sentence=SENTENCE, features="Dialogue", **GREEDY)) == story
    assert instruct.count_tokens(head) == instruct.last_stats["prompt_tokens"]
    others = {instruct.generate(words=w, **GREEDY) for w in ("dog", "cat", "dog,ball")}
    others |= {instruct.generate(features=f, **GREEDY) for f in ("Twist", "Dialogue")}
    others |= {instruct.request(r, **GREEDY) for r in ("Write a story about a dog.", "Write a story about a cat.")}
    assert len(others | {story}) == 8  # a prompt's story is its own


def test_the_prompt_is_the_story_beginning(instruct):
    head = header_prompt(words=["dog", "ball"])
    assert instruct.instruct_prompt("  Tom had a", words="dog,ball") == head + " Tom had a"
    story = instruct.generate("  Tom had a", words="dog,ball", **GREEDY)
    assert story.startswith("Tom had a")
    assert story == instruct.generate(head + " Tom had a", **GREEDY)[len(head) + 1:]
    pieces = list(instruct.stream("Tom had a", words="dog,ball", **GREEDY))
    assert pieces[0] == "Tom had a" and "".join(pieces) == story
    samples = ["", ""]
    for i, text in instruct.stream_samples("Tom had a", 2, words="dog,ball", **GREEDY):
        samples[i] += text
    assert samples == [story[len("Tom had a"):]] * 2


def test_request_and_sampled_stories(instruct):
    text = "Write a story about a dog who finds a ball."
    head = request_prompt(text)
    assert head == f"Request: {text}\nStory:"
    story = instruct.request(text, **GREEDY)
    assert story == instruct.generate(request=text, **GREEDY) == instruct.generate(head, **GREEDY)[len(head):].lstrip()
    sampled = instruct.generate(summary="A dog finds a ball.", num_samples=2, seed=3, max_new_tokens=12)
    head = header_prompt(summary="A dog finds a ball.")
    plain = instruct.generate(head, num_samples=2, seed=3, max_new_tokens=12)
    assert sampled == [p[len(head):].lstrip() for p in plain]
    samples = ["", ""]
    for i, piece in instruct.stream_samples(num_samples=2, summary="A dog finds a ball.", seed=3, max_new_tokens=12):
        assert piece
        samples[i] += piece
    assert samples == sampled


def test_guided_stories_of_a_model(instruct):
    kw = dict(words=GUIDE_WORDS, sentence=SENTENCE, features="dialogue", max_new_tokens=120, temperature=0.9)
    for seed in range(3):
        story = instruct.generate(seed=seed, **kw)
        assert all(contains_word(story, w) for w in GUIDE_WORDS) and contains_sentence(story, SENTENCE), story
        free = instruct.generate(seed=seed, guide=False, **kw)
        assert free != story and not contains_sentence(free, SENTENCE)
    # a request is guided as well, in the chat format the server uses
    story = instruct.request(f'Write a story that uses the words dog, ball and happy and includes the sentence '
                             f'"{SENTENCE}"', max_new_tokens=120, seed=1)
    assert all(contains_word(story, w) for w in GUIDE_WORDS) and contains_sentence(story, SENTENCE), story


def test_plain_prompts_are_not_guided(instruct, plain):
    for model in (instruct, plain):
        for prompt in ("Once upon a time", header_prompt(words=GUIDE_WORDS)):
            a = model.generate(prompt, max_new_tokens=40, seed=2)
            b = model.generate(prompt, max_new_tokens=40, seed=2, guide=False)
            assert (a == b) == (model is plain or prompt.startswith("Once")), (model.path, prompt)


def test_bad_instructions(instruct, plain):
    assert not plain.is_instruct
    assert plain.generate("Tom", **GREEDY) == instruct.generate("Tom", **GREEDY)  # same weights, plain prompts as today
    with pytest.raises(StoryGPTError, match="not an instruction-tuned model"):
        plain.generate(words=WORDS)
    with pytest.raises(StoryGPTError, match="not an instruction-tuned model"):
        plain.request("Write a story")
    with pytest.raises(StoryGPTError, match="unknown feature 'magic'"):
        instruct.generate(features="dialogue,magic")
    with pytest.raises(StoryGPTError, match="word list is empty"):
        instruct.generate(words=" , ")
    with pytest.raises(StoryGPTError, match="one or the other"):
        instruct.generate(words=WORDS, request="Write a story")
    with pytest.raises(StoryGPTError, match="request is empty"):
        instruct.request("  ")
    with pytest.raises(StoryGPTError, match="needs words"):
        instruct.generate(features=[])


def test_shipped_names(installed):
    assert shipped_or("instruct") == installed and storygpt.load("instruct").is_instruct
    assert shipped_or(None) == shipped_or("default") == checkpoint.DEFAULT_MODEL
    assert shipped_or("runs/x") == "runs/x"


def test_instruct_not_installed(not_installed, capsys):
    with pytest.raises(StoryGPTError, match="^no instruct model is installed with this copy of storygpt"):
        instruct_model_path()
    with pytest.raises(StoryGPTError, match="no instruct model"):
        storygpt.load("instruct")
    for argv in (["generate", "--model", "instruct", "--words", "dog"], ["eval", "--model", "instruct", "--text", "x"],
                 ["app", "--model", "instruct"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and "no instruct model is installed" in err and len(err.strip().splitlines()) == 1, argv


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def test_cli_generate_with_instructions(instruct_dir, instruct, capsys):
    # fp32 as the fixture: "auto" is bf16 on CPUs with native bf16, and a random model's greedy ties break otherwise
    args = ["generate", "--model", instruct_dir, "--dtype", "fp32", "--temperature", 0, "--max-new-tokens", 16,
            "--words", "dog,ball", "--features", "bad ending, Dialogue", "--sentence", SENTENCE]
    story = instruct.generate(words="dog,ball", features="BadEnding,Dialogue", sentence=SENTENCE, **GREEDY)
    code, out, err = run_cli(args, capsys)
    assert code == 0 and out == story + "\n", err
    code, out, _ = run_cli(args + ["--no-stream"], capsys)
    assert code == 0 and out == story + "\n"
    code, out, _ = run_cli(args + ["--no-guide"], capsys)
    free = instruct.generate(words="dog,ball", features="BadEnding,Dialogue", sentence=SENTENCE, guide=False, **GREEDY)
    assert code == 0 and out == free + "\n" and free != story
    code, out, _ = run_cli(args + ["--json", "Once"], capsys)
    result = json.loads(out)
    assert result["prompt"] == "Once" and result["stories"] == [instruct.generate(
        "Once", words="dog,ball", features="BadEnding,Dialogue", sentence=SENTENCE, **GREEDY)]
    assert result["instruction"] == header_prompt(words="dog,ball", sentence=SENTENCE,
                                                  features="BadEnding,Dialogue") + " Once"
    code, out, _ = run_cli(["generate", "--model", instruct_dir, "--dtype", "fp32", "--temperature", 0,
                            "--max-new-tokens", 16, "--request", "Write a story about a cat."], capsys)
    assert code == 0 and out == instruct.request("Write a story about a cat.", **GREEDY) + "\n"


def test_cli_generate_shipped_instruct(installed, instruct, capsys):
    code, out, _ = run_cli(["generate", "--model", "instruct", "--temperature", 0, "--max-new-tokens", 16,
                            "--words", "dog"], capsys)
    assert code == 0 and out == instruct.generate(words="dog", **GREEDY) + "\n"


@pytest.mark.parametrize("extra, message", [
    (["--words", "dog,ball"], "not an instruction-tuned model"),
    (["--request", "Write a story"], "not an instruction-tuned model"),
    (["--features", "dialogue,magic"], "unknown feature 'magic'"),
    (["--words", ""], "word list is empty"),
    (["--words", "dog,,ball"], "word list is empty"),
    (["--features", ""], "needs words, a sentence, features, a character or a summary"),
    (["--words", "two words"], "is not a word"),
    (["--sentence", "  "], "sentence is empty"),
    (["--request", "Write", "--words", "dog"], "one or the other"),
])
def test_cli_generate_bad_instructions(plain_dir, instruct_dir, extra, message, capsys):
    model = plain_dir if message.startswith("not an") else instruct_dir
    code, out, err = run_cli(["generate", "--model", model, "--max-new-tokens", 4, *extra], capsys)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------------------------
# HTTP API
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(instruct, plain):
    app = create_app({"plain": plain, "ins": instruct}, max_concurrency=4)
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Write about a cat."},
            {"role": "assistant", "content": "Once upon a time ..."},
            {"role": "user", "content": "Write a story about a dog\nwho finds a ball."}]


def test_chat_sends_the_last_user_message_as_a_request(client, instruct):
    request = "Write a story about a dog who finds a ball."
    head = request_prompt(MESSAGES[-1]["content"])
    assert head == f"Request: {request}\nStory:"
    r = client.chat.completions.create(model="ins", messages=MESSAGES, max_tokens=16, temperature=0)
    content = r.choices[0].message.content
    assert content and content == instruct.generate(head, **GREEDY)[len(head):].lstrip() == instruct.request(request, **GREEDY)
    assert r.usage.prompt_tokens == instruct.count_tokens(head)
    for kw in ({"temperature": 0}, {"seed": 5, "temperature": 0.9}):  # sampled: the same seed, the same story
        whole = client.chat.completions.create(model="ins", messages=MESSAGES, max_tokens=16, **kw).choices[0]
        chunks = client.chat.completions.create(model="ins", messages=MESSAGES, max_tokens=16, stream=True, **kw)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert whole.message.content == streamed == instruct.request(request, max_new_tokens=16, **kw)
    two = client.chat.completions.create(model="ins", messages=MESSAGES, max_tokens=16, n=2, seed=5)
    assert [c.message.content for c in two.choices] == instruct.request(request, num_samples=2, max_new_tokens=16, seed=5)
    asks = "Write a story that uses the words dog and ball."  # guided unless "guide": false (an extension)
    guided = client.chat.completions.create(model="ins", messages=[{"role": "user", "content": asks}], max_tokens=16,
                                            temperature=0).choices[0].message.content
    free = client.chat.completions.create(model="ins", messages=[{"role": "user", "content": asks}], max_tokens=16,
                                          temperature=0, extra_body={"guide": False}).choices[0].message.content
    assert guided == instruct.request(asks, **GREEDY) != free == instruct.request(asks, guide=False, **GREEDY)


def test_completions_and_plain_chat_are_unchanged(client, instruct, plain):
    head = header_prompt(words="dog")
    text = client.completions.create(model="ins", prompt=head, max_tokens=16, temperature=0).choices[0].text
    assert text == instruct.generate(head, **GREEDY)[len(head):]  # the prompt is continued as given
    r = client.chat.completions.create(model="plain", messages=MESSAGES, max_tokens=16, temperature=0)
    prompt = MESSAGES[-1]["content"]
    assert r.choices[0].message.content == plain.generate(prompt, **GREEDY)[len(prompt):]
    empty = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": ""}], max_tokens=4)
    assert empty.choices[0].finish_reason in ("stop", "length")  # a story from scratch, as before


@pytest.mark.parametrize("content, message", [("", "request is empty"), ("  \n ", "request is empty"),
                                              ("a" * 1001, "longer than 1000 characters")])
def test_chat_bad_requests_are_400(server, content, message):
    body = {"model": "ins", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == "messages" and error["type"] == "invalid_request_error"


def test_models_say_which_are_instruct(server):
    data = httpx.get(f"{server}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["instruct"]) for m in data] == [("plain", False), ("ins", True)]
    assert httpx.get(f"{server}/v1/models/ins", timeout=30).json()["instruct"] is True


def test_serve_default_models(installed):
    assert list(load_models(None)) == ["storygpt-default", "storygpt-instruct"]
    assert list(load_models(["instruct", "default"])) == ["storygpt-instruct", "storygpt-default"]


def test_serve_default_models_without_instruct(not_installed):
    assert list(load_models(None)) == ["storygpt-default"]
    with pytest.raises(StoryGPTError, match="no instruct model"):
        load_models(["instruct"])


# --------------------------------------------------------------------------------------------
# Web app
# --------------------------------------------------------------------------------------------
APP = str(Path(app_module.__file__))


def test_app_instruct_inputs(instruct_dir, instruct, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, json.dumps([str(instruct_dir)]))
    monkeypatch.setenv(app_module.DTYPE_ENV, "fp32")  # as the fixture (auto is bf16 where the CPU has it)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.multiselect(key="features").options == ["Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing",
                                                      "Conflict"]
    at.text_input(key="words").input("dog, ball")
    at.text_input(key="sentence").input(SENTENCE)
    at.multiselect(key="features").select("Twist")
    at.slider(key="temperature").set_value(0.0)
    at.slider(key="max_new_tokens").set_value(16)
    at.button(key="write").click().run()
    assert not at.exception, at.exception
    entry = at.session_state.history[0]
    want = instruct.generate(words="dog, ball", sentence=SENTENCE, features=["Twist"], **GREEDY)
    assert entry["prompt"] == "" and entry["story"] == want
    assert entry["instruction"] == header_prompt(words="dog, ball", sentence=SENTENCE, features=["Twist"])
    assert at.toggle(key="guide").value  # guided decoding (guide.py) is on unless switched off
    at.toggle(key="guide").set_value(False)
    at.button(key="write").click().run()
    free = instruct.generate(words="dog, ball", sentence=SENTENCE, features=["Twist"], guide=False, **GREEDY)
    assert at.session_state.history[0]["story"] == free != want
    at.text_input(key="words").input("dog, two words")
    at.button(key="write").click().run()
    assert not at.exception and any("is not a word" in w.value for w in at.warning)
    assert len(at.session_state.history) == 2


def test_app_plain_model_has_no_instruct_inputs(plain_dir, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, json.dumps([str(plain_dir)]))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.multiselect and not at.text_input


def test_app_offers_both_shipped_models(installed, monkeypatch):
    monkeypatch.delenv(MODELS_ENV, raising=False)
    assert model_choices() == {"storygpt default": None, "storygpt instruct": "instruct"}
    monkeypatch.setenv(MODELS_ENV, json.dumps(["instruct"]))
    assert model_choices() == {"storygpt instruct": "instruct"}
    assert find_models(["instruct"]) == ["instruct"]


def test_app_without_instruct_offers_the_default(not_installed, monkeypatch):
    monkeypatch.delenv(MODELS_ENV, raising=False)
    assert model_choices() == {"storygpt default": None}
