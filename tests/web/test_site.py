"""`storygpt web`: the static site, built once per module for the shipped model through the CLI, then driven in
Debian's Chromium (Playwright) from a static server on a loopback port, every request elsewhere aborted and recorded
(none may happen). The page's greedy story is storygpt's token for token; a seeded story is the same on every
reload; Stop stops; a model too large for the page is refused with a message; the shipped instruct model's page
gets its fields, builds the instruction as storygpt does and writes storygpt's unguided story.

Without Chromium, playwright or npm the browser tests skip with the reason, and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from web_page import SitePage, chromium, chromium_missing, static_server

import storygpt
from storygpt.convert.web import MAX_MODEL_BYTES, ORT_FILES, cache_root

PROMPT = "Once upon a time, there was a little dog named"
ON_CI = os.environ.get("CI") == "true"


def need(reason: str | None) -> None:
    if reason:
        if ON_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def npm_missing() -> str | None:
    cached = list((cache_root() / "web").glob("*/.complete"))
    return None if shutil.which("npm") or cached else "npm is not installed (storygpt web needs it once)"


def storygpt_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storygpt", *args], capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    need(npm_missing())
    out = tmp_path_factory.mktemp("web") / "site"
    done = storygpt_cli("web", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done.stdout


@pytest.fixture(scope="module")
def site(built):
    return built[0]


@pytest.fixture(scope="module")
def browser():
    need(chromium_missing())
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def url(site):
    with static_server(site) as u:  # plain python -m http.server: the single-thread path
        yield u


@pytest.fixture
def page(browser, url):
    sp = SitePage(browser, url)
    assert sp.open() == "ready", sp.error_text()
    yield sp
    assert sp.foreign == [], f"requests outside the site: {sp.foreign}"
    assert not sp.errors, sp.errors
    sp.close()


# --------------------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------------------
def test_build_prints_one_line_and_writes_the_site(built):
    out, stdout = built
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    m = re.fullmatch(r"-> (.+) \(site: ([\d.]+) MB: model ([\d.]+) MB, runtime ([\d.]+) MB; "
                     r"open with python -m http\.server -d (.+)\)", lines[0])
    assert m and m[1] == m[5] == str(out), lines[0]
    info = json.loads((out / "site.json").read_text())
    assert info["format"] == "storygpt-web" and info["ort"]["version"] == "1.31.1"
    assert info["model"] == {"source": "default", "dtype": "fp32", "params": storygpt.load(device="cpu",
                             dtype="fp32").model.num_params(), "context": 512, "instruct": False}
    assert float(m[3]) == round(info["sizes"]["model"] / 1e6, 1) and float(m[4]) == round(info["sizes"]["runtime"] / 1e6, 1)
    assert sorted(p.name for p in (out / "ort").iterdir()) == sorted(ORT_FILES)  # no webgpu/jsep build
    for name in ("index.html", "app.js", "sampling.js", "tokenizer.js", "style.css", "model/model.onnx",
                 "model/onnx.json", "model/tokenizer.web.json", "_headers"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("node_modules"))
    assert "Cross-Origin-Embedder-Policy: require-corp" in (out / "_headers").read_text()


def test_bad_model_and_foreign_out_are_one_line_errors(site, tmp_path):
    done = storygpt_cli("web", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "s"))
    assert done.returncode == 2 and done.stderr.startswith("storygpt: error: ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and not (tmp_path / "s").exists()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    done = storygpt_cli("web", "--out", str(foreign))
    assert done.returncode == 2 and "refusing to replace" in done.stderr and done.stderr.count("\n") == 1
    assert (foreign / "mine.txt").read_text() == "keep me"


def test_without_npm_the_error_says_what_to_install(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "STORYGPT_CACHE": str(tmp_path / "cache")}
    if shutil.which("npm", path=env["PATH"]):
        pytest.skip("npm sits next to python here")
    done = storygpt_cli("web", "--out", str(tmp_path / "s"), env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "npm not found" in done.stderr and "install Node.js" in done.stderr


# --------------------------------------------------------------------------------------------------------------
# The page in Chromium
# --------------------------------------------------------------------------------------------------------------
def storygpt_greedy_ids(prompt: str, n: int, model=None) -> list[int]:
    """The new token ids of storygpt's own greedy story (fp32, CPU; `prompt`: the text the model reads, unguided):
    the Batcher that `storygpt generate` runs."""
    from storygpt.generate.batching import Batcher, Story
    from storygpt.generate.sampling import SamplingOptions

    model = model or storygpt.load(device="cpu", dtype="fp32")
    options = SamplingOptions(max_new_tokens=n, temperature=0, guide=False)
    story = Story(model, prompt, 1, options, lambda event: None)
    batcher = Batcher(model, slots=1)
    batcher.add(story)
    while batcher.stories:
        batcher.step()
    return story.rows[0][len(story.prompt_ids):]


def test_greedy_story_is_storygpts_token_for_token(page, site):
    done = storygpt_cli("generate", PROMPT, "--temperature", "0", "--dtype", "fp32", "--max-new-tokens", "64", "--json")
    assert done.returncode == 0, done.stderr
    want_text = json.loads(done.stdout)["stories"][0]
    got = page.write(prompt=PROMPT, max_new_tokens=64, temperature=0)
    assert got["ids"] == storygpt_greedy_ids(PROMPT, 64)
    assert got["text"] == want_text and got["shown"] == want_text
    assert got["stats"]["finish_reason"] in ("length", "stop") and got["stats"]["threads"] == 1
    stats = page.page.locator("#stats").inner_text()
    assert "tokens/s" in stats and "first token after" in stats
    facts = page.facts()
    assert facts["threads"] == 1 and not facts["crossOriginIsolated"] and not facts["instruct"]
    assert not page.page.locator("#instruct").is_visible()
    assert any(r.endswith("/ort/ort-wasm-simd-threaded.wasm") for r in page.requests)


def test_seeded_story_is_the_same_on_every_reload(page):
    settings = dict(prompt="Once upon a time", max_new_tokens=40, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    first = page.write(**settings)
    assert page.reload() == "ready"
    again = page.write(**settings)
    assert first["ids"] == again["ids"] and first["text"] == again["text"] and len(first["ids"]) > 5
    assert "seed 7" in page.page.locator("#stats").inner_text()
    other = page.write(**{**settings, "seed": 8})
    assert other["ids"] != first["ids"] and other["stats"]["seed"] == 8


def test_stop_stops_a_long_story(page):
    # temperature 2, seed 2: a story that runs to the 500 tokens asked for (2.6 s here) unless stopped
    page.fill(prompt="Once upon a time", max_new_tokens=500, temperature=2.0, top_p=1.0, seed=2)
    page.page.click("#write")
    page.page.wait_for_function("() => document.querySelector('#story').textContent.length > 40")
    assert page.page.locator("#stop").is_enabled() and page.page.locator("#write").is_disabled()
    page.page.click("#stop")
    got = page.wait_story()
    assert got["state"] == "stopped" and got["stats"]["finish_reason"] == "stopped"
    assert 0 < len(got["ids"]) < 500
    assert page.page.locator("#write").is_enabled() and page.page.locator("#stop").is_disabled()
    assert "stopped" in page.page.locator("#stats").inner_text()


def test_served_cross_origin_isolated_the_page_decodes_on_threads(browser, site):
    """storygpt's server (`storygpt web --serve`) sends the two headers: the page gets SharedArrayBuffer and runs
    onnxruntime-web's threads, and writes the same greedy story."""
    with static_server(site, isolated=True) as url:
        sp = SitePage(browser, url)
        try:
            assert sp.open() == "ready", sp.error_text()
            facts = sp.facts()
            cores = sp.page.evaluate("() => navigator.hardwareConcurrency")
            assert facts["crossOriginIsolated"] and facts["threads"] == min(cores, 4)
            got = sp.generate(prompt=PROMPT, maxNewTokens=32, temperature=0)
            assert got["ids"] == storygpt_greedy_ids(PROMPT, 32)
            assert sp.foreign == [] and not sp.errors
        finally:
            sp.close()


def test_sampling_filters_match_storygpts(page):
    import torch

    from storygpt.generate.sampling import sampling_probs

    torch.manual_seed(0)
    logits = torch.randn(300) * 3
    tied = logits.clone()
    tied[[5, 9, 17]] = logits.max() + 1  # a three-way tie at the top: argmax takes the first, as torch's
    script = """([x, t, k, p, tied]) => import('./sampling.js').then(s => ({
        probs: Array.from(s.samplingProbs(Float32Array.from(x), t, k, p)),
        argmax: s.argmax(Float32Array.from(tied)),
        topKTies: Array.from(s.topK(Float64Array.from([1, 3, 3, 2, 3]), 2)),
        tinyP: Array.from(s.topP(Float64Array.from([0, 5, 5, 1]), 1e-9)),
        same: [s.seededRandom(7)(), s.seededRandom(7)(), s.seededRandom(8)()]}))"""
    for t, k, p in ((0.7, 0, 0.9), (1.0, 20, 1.0), (1.3, 50, 0.5), (1e-6, 0, 0.95)):
        got = page.page.evaluate(script, [logits.tolist(), t, k, p, tied.tolist()])
        want = sampling_probs(logits[None], t, k, p)[0]
        assert torch.allclose(torch.tensor(got["probs"], dtype=torch.float32), want, atol=1e-5), (t, k, p)
    assert got["argmax"] == 5 == int(tied.argmax())
    inf = None  # JSON has no -Infinity: Playwright returns it as a number
    assert [v if v > -1e308 else inf for v in got["topKTies"]] == [inf, 3, 3, inf, 3]  # ties at the k-th stay
    assert [v if v > -1e308 else inf for v in got["tinyP"]] == [inf, 5, inf, inf]  # the top token always stays
    assert got["same"][0] == got["same"][1] != got["same"][2]


def test_a_model_too_large_for_the_page_gets_a_message(browser, site, tmp_path):
    big = tmp_path / "site"
    shutil.copytree(site, big, ignore=shutil.ignore_patterns("model.onnx"))
    with open(big / "model" / "model.onnx", "wb") as fh:  # sparse: no disk used
        os.truncate(fh.fileno(), MAX_MODEL_BYTES + (100 << 20))
    with static_server(big) as url:
        sp = SitePage(browser, url)
        try:
            assert sp.open() == "error"
            message = sp.error_text()
            assert "more than the 1073.7 MB (1 GiB)" in message and "1178.6 MB" in message, message
            assert not sp.page.locator("#form #write").is_enabled() and sp.foreign == []
        finally:
            sp.close()


@pytest.fixture(scope="module")
def instruct_site(tmp_path_factory):
    need(npm_missing())
    from storygpt.convert.web import build_site

    return build_site("instruct", tmp_path_factory.mktemp("web-instruct") / "site")


def test_instruct_model_page_writes_storygpts_unguided_story(browser, instruct_site):
    """The shipped instruct model's page shows its fields, builds the instruction exactly as `instruct_prompt`, and
    writes the greedy story storygpt writes without guided decoding (--no-guide), token for token."""
    model = storygpt.load("instruct", device="cpu", dtype="fp32")
    cases = [("", dict(words="dog, ball ,happy")), ("  The sun was up.", dict(sentence=" It  rained. ")),
             ("Tom", dict(words="cat", sentence="We ran.", features=["Twist", "Dialogue"])), ("Plain start", {})]
    with static_server(instruct_site) as url:
        sp = SitePage(browser, url)
        try:
            assert sp.open() == "ready", sp.error_text()
            assert sp.page.locator("#instruct").is_visible() and sp.facts()["instruct"]
            for prompt, fields in cases:
                plan = sp.page.evaluate("([p, f]) => window.storygpt.storyPlan(p, f)", [prompt, fields])
                want = model.instruct_prompt(prompt, **fields)
                assert plan["modelText"] == (prompt if want is None else want), (prompt, fields)
            bad = sp.page.evaluate("() => { try { window.storygpt.storyPlan('', {words: 'dog,,cat'}); return ''; } "
                                   "catch (e) { return e.message; } }")
            assert "empty words" in bad
            got = sp.write(prompt="", words="dog, ball", features=("Dialogue",), max_new_tokens=48, temperature=0)
            fields = dict(words="dog, ball", features="Dialogue")
            want_text = model.generate("", temperature=0, max_new_tokens=48, guide=False, **fields)
            assert got["ids"] == storygpt_greedy_ids(model.instruct_prompt("", **fields), 48, model)
            assert got["text"] == want_text == got["shown"] and not want_text[:1].isspace()
            assert sp.foreign == [] and not sp.errors
        finally:
            sp.close()
