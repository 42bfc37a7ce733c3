"""The web app: Streamlit's AppTest drives the script in-process; one test drives `storygpt app` in Chromium."""

import json
import shutil
import socket
from pathlib import Path

import pytest
from app_browser import CHROMIUM, running_app, write_story_in_browser
from conftest import run_cli
from streamlit.testing.v1 import AppTest

import storygpt
import storygpt.app.page as app_module
from storygpt.app.launch import find_models
from storygpt.app.page import COMPILE_ENV, DTYPE_ENV, MODELS_ENV

APP = str(Path(app_module.__file__))
PROMPT = "Once upon a time, Tom had a"  # mid-sentence: the story cannot end at once


@pytest.fixture
def app(tiny_run, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, json.dumps([str(tiny_run)]))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    return at


def write(at: AppTest, prompt: str, **settings) -> AppTest:
    at.text_area(key="prompt").input(prompt)
    for key, value in settings.items():
        widget = {"fresh_seed": at.toggle}.get(key, at.number_input if key in ("seed", "top_k") else at.slider)
        widget(key=key).set_value(value)
    at.button(key="write").click().run()
    assert not at.exception, at.exception
    return at


def story_markdown(at: AppTest) -> str:
    return "".join(m.value for m in at.markdown)


def test_controls_exist(app):
    assert app.title[0].value == "storygpt"
    assert app.text_area(key="prompt").value == ""
    assert app.button(key="write").label == "Write my story"
    for key in ("max_new_tokens", "temperature", "top_p", "repetition_penalty"):
        assert app.slider(key=key) is not None
    for key in ("top_k", "seed"):
        assert app.number_input(key=key) is not None
    assert app.toggle(key="fresh_seed").value is True
    assert app.button(key="surprise").label == "Surprise me"
    assert app.selectbox(key="model_name").options == ["run"]
    assert len([b for b in app.button if b.key.startswith("example_")]) == 4
    facts = app.caption[0].value
    assert "parameters" in facts and "context" in facts


def test_click_writes_a_story_with_speed_and_history(app, tiny_run):
    at = write(app, PROMPT, max_new_tokens=24)
    entry = at.session_state.history[0]
    assert entry["prompt"] == PROMPT and entry["story"].strip()
    assert 1 <= entry["stats"]["new_tokens"] <= 24
    assert "tokens/s" in " ".join(c.value for c in at.caption)
    assert entry["story"].strip().split()[0] in story_markdown(at)
    assert len(at.get("download_button")) == 2  # all stories + this one
    # an empty prompt is fine: a story from scratch (with a seed whose story does not end at once)
    model = storygpt.load(tiny_run)
    settings = dict(temperature=0.8, top_k=0, top_p=0.95, repetition_penalty=1.0, max_new_tokens=16)
    seed = next(s for s in range(100) if model.generate("", seed=s, **settings).strip())
    write(at, "", fresh_seed=False, seed=seed, **settings)
    assert len(at.session_state.history) == 2
    assert at.session_state.history[0]["story"] == model.generate("", seed=seed, **settings) != ""


def test_compiled_decoding_writes_the_same_story(tiny_run, monkeypatch):
    """With `storygpt app --compile` the page's model decodes with compiled steps (loaded once, compiled
    while loading), and a seeded story on the page is the one that model writes from Python. In fp32: the page's
    engine (8 slots) and `generate` (a batcher of its own, 1 slot) run graphs compiled for caches of different
    sizes, which in bf16 can round a logit differently by one bf16 step (measured up to 0.03) and so flip a
    sampled token."""
    monkeypatch.setenv(MODELS_ENV, json.dumps([str(tiny_run)]))
    monkeypatch.setenv(COMPILE_ENV, "1")
    monkeypatch.setenv(DTYPE_ENV, "fp32")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    model = app_module.get_model(str(tiny_run), True, "fp32")
    assert model.decode_step is not None and model is not app_module.get_model(str(tiny_run), False, "fp32")
    settings = dict(seed=7, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2, max_new_tokens=24)
    story = write(at, PROMPT, fresh_seed=False, **settings).session_state.history[0]["story"]
    assert story.strip() and PROMPT + story == model.generate(PROMPT, **settings)


def test_settings_reach_the_generator(app, tiny_run):
    settings = dict(fresh_seed=False, seed=123, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.2,
                    max_new_tokens=32)
    first = write(app, PROMPT, **settings).session_state.history[0]["story"]
    second = write(app, PROMPT, **settings).session_state.history[0]["story"]
    assert first == second
    expected = storygpt.load(tiny_run).generate(PROMPT, seed=123, temperature=1.3, top_k=20, top_p=0.9,
                                                repetition_penalty=1.2, max_new_tokens=32)
    assert PROMPT + first == expected
    other = write(app, PROMPT, **{**settings, "seed": 124}).session_state.history[0]["story"]
    assert other != first


def test_fresh_seed_and_surprise_me(app):
    seeds = set()
    for _ in range(3):
        seeds.add(write(app, PROMPT, max_new_tokens=8).session_state.history[0]["seed"])
    assert len(seeds) == 3
    before = app.session_state.seed
    app.button(key="surprise").click().run()
    assert app.session_state.seed != before


def test_example_prompt_fills_the_box(app):
    app.button(key="example_1").click().run()
    assert app.text_area(key="prompt").value == app_module.EXAMPLES[1]


def test_prompt_over_the_context_is_a_friendly_message(app):
    at = write(app, "Tom had a red ball. " * 200, max_new_tokens=8)
    assert not at.exception
    assert any("shorten" in w.value for w in at.warning)
    assert at.session_state.history == []


def test_stop_keeps_the_story_so_far(app):
    app.session_state.partial = {"prompt": PROMPT, "story": " He ran", "seed": 1, "model": "run"}
    app.session_state.stopped = True
    app.run()
    assert app.session_state.history[0]["story"] == " He ran"
    assert any("Stopped" in i.value for i in app.info)
    assert any("stopped early" in c.value for c in app.caption)


def test_unloadable_model_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    (broken / "config.json").write_text("{}")
    monkeypatch.setenv(MODELS_ENV, json.dumps([str(broken)]))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "cannot be loaded" in at.error[0].value


def test_model_picker_and_models_dir(tiny_run, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("alpha", "beta"):
        shutil.copytree(tiny_run / "model", models / name)
    (models / "notes").mkdir()  # not a model: ignored
    found = find_models(models_dir=str(models))
    assert [Path(p).name for p in found] == ["alpha", "beta"]
    monkeypatch.setenv(MODELS_ENV, json.dumps(found))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert at.selectbox(key="model_name").options == ["alpha", "beta"]
    at.selectbox(key="model_name").select("beta").run()
    write(at, PROMPT, max_new_tokens=8)
    assert at.session_state.history[0]["model"] == "beta"


def test_cli_app_bad_input(tmp_path, capsys):
    code, _, err = run_cli(["app", "--model", tmp_path / "missing"], capsys)
    assert code == 2 and "no such model" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["app", "--models-dir", tmp_path], capsys)
    assert code == 2 and "no model or run folders" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, _, err = run_cli(["app", "--port", s.getsockname()[1]], capsys)
    assert code == 2 and "cannot listen" in err


def test_browser_end_to_end(tiny_run, tmp_path):
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (see .ci/run)"
    shot = tmp_path / "app.png"
    with running_app([str(tiny_run)]) as url:
        story = write_story_in_browser(url, PROMPT, shot, seed=5)
    assert story.startswith(PROMPT) and len(story) > len(PROMPT) + 5
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_table_shows_the_recorded_figures_next_to_the_previous_model(tmp_path, tiny_run, monkeypatch):
    from storygpt.eval.quality import quality_rows, record_previous
    from storygpt.model.model_dir import record_eval, record_suite

    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(tiny_run / "model", old)
    shutil.copytree(tiny_run / "model", new)
    record_eval(old, "heldout.txt", {"loss": 2.7, "perplexity": 14.9, "bits_per_byte": 0.96, "tokens": 10, "bytes": 40,
                                     "context": 256})
    record_suite(new, {"bits_per_byte": 0.8512, "cloze": {"accuracy": 0.7}, "grammar": {"accuracy": 0.93},
                       "names": 0.6, "samples": ["..."]}, {"n": 10})
    record_previous(new, old, "v1 (256 tokens)")
    info = storygpt.load(new).facts()
    assert "samples" not in info["suite"]["measures"]
    rows = {r["measure"]: r for r in quality_rows(info)}
    assert rows["held-out bits/byte"] == {"measure": "held-out bits/byte", "this model": 0.851,
                                         "v1 (256 tokens)": 0.96, "better": "lower"}
    assert rows["cloze (consistency items)"]["this model"] == 0.7
    assert rows["cloze (consistency items)"]["v1 (256 tokens)"] is None
    assert list(rows) == ["held-out bits/byte", "cloze (consistency items)", "names kept", "grammar (minimal pairs)"]
    assert quality_rows({}) == []

    monkeypatch.setenv(MODELS_ENV, json.dumps([str(new)]))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    table = at.table[0].value
    assert list(table["measure"]) == list(rows) and list(table["v1 (256 tokens)"])[0] == 0.96
    with pytest.raises(storygpt.StoryGPTError, match="records no figures"):
        record_previous(old, tiny_run / "model", "x")

    newer = tmp_path / "newer"  # replacing `new` keeps what `new` had replaced: three columns
    shutil.copytree(tiny_run / "model", newer)
    record_suite(newer, {"bits_per_byte": 0.84, "names": 0.65}, {"n": 10})
    record_previous(newer, new, "v2")
    rows = {r["measure"]: r for r in quality_rows(storygpt.load(newer).facts())}
    assert rows["held-out bits/byte"] == {"measure": "held-out bits/byte", "this model": 0.84, "v2": 0.851,
                                         "v1 (256 tokens)": 0.96, "better": "lower"}
    assert rows["names kept"]["v2"] == 0.6 and rows["cloze (consistency items)"]["this model"] is None
