"""The HTTP API, through the official `openai` client and raw httpx, against real servers on free loopback ports."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx
import openai
import pytest
import schemathesis
import torch
from conftest import run_cli, running, wait_until
from hypothesis import HealthCheck, given, settings
from openai import AsyncOpenAI, OpenAI
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

import storygpt
from storygpt.errors import StoryGPTError
from storygpt.generate.story_model import StoryModel
from storygpt.serve import create_app, is_loopback, listen, load_models

KEY = "sk-test-key"


class Endless(torch.nn.Module):
    """Wraps a model: the end-of-story token is forbidden (stories only end at max_tokens), each decoding step
    takes at least `delay` seconds, and `steps` counts them: a generation still running shows as a growing count."""

    def __init__(self, model, eos_id, delay=0.005):
        super().__init__()
        self.inner, self.cfg, self.eos_id, self.delay, self.steps = model, model.cfg, eos_id, delay, 0

    def forward(self, idx, targets=None, cache=None):
        logits, loss = self.inner(idx, targets, cache)
        logits = logits.clone()
        logits[..., self.eos_id] = float("-inf")
        self.steps += 1
        time.sleep(self.delay)
        return logits, loss

    def num_params(self):
        return self.inner.num_params()


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return storygpt.load(tiny_run)


@pytest.fixture(scope="module")
def endless(tiny):
    return StoryModel(Endless(tiny.model, tiny.tokenizer.eos_id), tiny.tokenizer, tiny.info, tiny.path)


@pytest.fixture(scope="module")
def server(tiny, endless):
    app = create_app({"tiny": tiny, "endless": endless}, api_key=KEY, max_concurrency=4, max_queue=64)
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


# --------------------------------------------------------------------------------------------
# The openai client
# --------------------------------------------------------------------------------------------
def test_completion(client, tiny):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, seed=1)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.text and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == tiny.count_tokens("Once upon a time")
    assert 1 <= r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same seed gives the same story as the Python API (text without the prompt), and `echo` adds the prompt
    assert choice.text == tiny.generate("Once upon a time", seed=1, max_new_tokens=20)[len("Once upon a time"):]
    echoed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, seed=1, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + choice.text


def test_chat_uses_the_last_user_message(client):
    messages = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Mia had a cat."},
                {"role": "assistant", "content": "Nice."}, {"role": "user", "content": "Tom had a red ball."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    plain = client.completions.create(model="tiny", prompt="Tom had a red ball.", max_tokens=20, temperature=0)
    assert choice.message.content == plain.choices[0].text
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tom had "}, {"type": "text", "text": "a red ball."}]}]
    assert client.chat.completions.create(model="tiny", messages=parts, max_tokens=20, temperature=0) \
        .choices[0].message.content == plain.choices[0].text


def test_streaming_matches_non_streaming(client):
    kw = {"model": "tiny", "max_tokens": 30, "seed": 7}
    whole = client.completions.create(prompt="Lily", **kw).choices[0]
    chunks = list(client.completions.create(prompt="Lily", stream=True, **kw))
    assert len(chunks) > 2 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Lily"}]
    chat = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    assert chat == whole.text
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_n_samples_streamed_and_not(client):
    kw = {"model": "tiny", "prompt": "Tom", "max_tokens": 24, "seed": 3, "n": 3}
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # sampled, so the three stories differ
    streamed = ["", "", ""]
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in r.choices]
    assert r.usage.completion_tokens <= 3 * 24
    two = client.completions.create(model="tiny", prompt=["Tom", "Lily"], n=2, max_tokens=10, seed=3)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]


def test_seeded_determinism(client):
    kw = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 30, "temperature": 1.0}
    a, b, c = (client.completions.create(seed=s, **kw).choices[0].text for s in (5, 5, 6))
    assert a == b and a != c


def test_stop_strings(client):
    kw = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    stop = full.split()[3]
    r = client.completions.create(stop=[stop, "zzzz"], **kw).choices[0]
    assert r.text == full[:full.index(stop)] and r.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == r.text


def test_api_key(server, client):
    for key in ("wrong", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as err:
            OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0).completions.create(model="tiny", prompt="x")
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200  # liveness needs no key
    assert [m.id for m in client.models.list().data] == ["tiny", "endless"]
    assert client.models.retrieve("endless").id == "endless"


def test_unknown_and_path_like_models_are_not_found(client):
    for name in ("nope", "../tiny", "/etc/passwd", "tiny/../tiny", "C:\\models\\tiny", "~", "."):
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model=name, prompt="x", max_tokens=2)
        assert err.value.body["code"] == "model_not_found"


# --------------------------------------------------------------------------------------------
# Malformed requests: a 4xx with an OpenAI error body, and the server carries on
# --------------------------------------------------------------------------------------------
MALFORMED = [
    ("/v1/completions", "{not json", 400),
    ("/v1/completions", "", 400),
    ("/v1/completions", "[1, 2]", 400),
    ("/v1/completions", '{"prompt": 5}', 400),
    ("/v1/completions", '{"prompt": [1, 2, 3]}', 400),
    ("/v1/completions", '{"prompt": []}', 400),
    ("/v1/completions", '{"max_tokens": "10"}', 400),
    ("/v1/completions", '{"max_tokens": -1}', 400),
    ("/v1/completions", '{"max_tokens": 0}', 400),
    ("/v1/completions", '{"max_tokens": 1e999}', 400),
    ("/v1/completions", '{"max_tokens": 123456789012345678901234567890}', 400),
    ("/v1/completions", '{"n": 10000}', 400),
    ("/v1/completions", '{"n": 2.5}', 400),
    ("/v1/completions", '{"prompt": ["a", "b"], "n": 9}', 400),
    ("/v1/completions", '{"temperature": -1}', 400),
    ("/v1/completions", '{"temperature": NaN}', 400),
    ("/v1/completions", '{"top_p": 0}', 400),
    ("/v1/completions", '{"top_k": true}', 400),
    ("/v1/completions", '{"seed": 1e30}', 400),
    ("/v1/completions", '{"seed": 99999999999999999999999999}', 400),
    ("/v1/completions", '{"repetition_penalty": 0}', 400),
    ("/v1/completions", '{"stop": ""}', 400),
    ("/v1/completions", '{"stop": ["a", "b", "c", "d", "e"]}', 400),
    ("/v1/completions", '{"stop": [null]}', 400),
    ("/v1/completions", '{"stream": "yes"}', 400),
    ("/v1/completions", '{"presence_penalty": 0.5}', 400),
    ("/v1/completions", '{"logprobs": 3}', 400),
    ("/v1/completions", json.dumps({"prompt": "x" * 40_000}), 400),
    ("/v1/completions", json.dumps({"prompt": "Tom had a ball. " * 30}), 400),  # longer than the context
    ("/v1/completions", '{"model": "../../etc/passwd"}', 404),
    ("/v1/completions", '{"model": 7}', 400),
    ("/v1/completions", '{"a":' * 100_000 + "1" + "}" * 100_000, 400),  # deep nesting
    ("/v1/completions", json.dumps({"prompt": "x" * 2_000_000}), 413),
    ("/v1/chat/completions", "{}", 400),
    ("/v1/chat/completions", '{"messages": []}', 400),
    ("/v1/chat/completions", '{"messages": "hi"}', 400),
    ("/v1/chat/completions", '{"messages": [{"content": "hi"}]}', 400),
    ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}', 400),
    ("/v1/chat/completions", '{"messages": [{"role": "system", "content": "hi"}]}', 400),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5}', 400),
    ("/v1/nothing", "{}", 404),
]


@pytest.mark.parametrize(("path", "body", "status"), MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_malformed_requests(http, path, body, status):
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert http.get("/health").json()["status"] == "ok"


def test_half_surrogate_pairs_become_replacement_characters(http):
    """JSON can carry half a UTF-16 pair, which is no text; it is read as U+FFFD instead of failing."""
    body = '{"prompt": "Tom \\ud800", "max_tokens": 3, "echo": true, "stop": ["\\udc00"]}'
    r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("Tom \ufffd")


def test_prompt_longer_than_context_is_refused(http, tiny):
    prompt = "Tom had a red ball. " * 20
    assert tiny.count_tokens(prompt) >= tiny.context
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"


def test_openapi_schema(http):
    schema = http.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/health", "/v1/models", "/v1/models/{model}", "/v1/completions",
                                    "/v1/chat/completions"}
    post = schema["paths"]["/v1/completions"]["post"]
    assert "422" not in post["responses"] and {"200", "400", "401", "404", "503"} <= set(post["responses"])
    assert "text/event-stream" in post["responses"]["200"]["content"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"max_tokens", "temperature", "top_p", "n", "seed", "stop", "top_k", "repetition_penalty"} <= set(fields)
    max_tokens = next(x for x in fields["max_tokens"]["anyOf"] if x["type"] == "integer")
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (1, 4096)


# --------------------------------------------------------------------------------------------
# The schema against the server: schemathesis
# --------------------------------------------------------------------------------------------
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
FUZZED = [("POST", "/v1/completions", POSITIVE), ("POST", "/v1/completions", NEGATIVE),
          ("POST", "/v1/chat/completions", POSITIVE), ("POST", "/v1/chat/completions", NEGATIVE),
          ("GET", "/v1/models/{model}", POSITIVE), ("GET", "/v1/models/{model}", NEGATIVE),
          ("GET", "/v1/models", POSITIVE), ("GET", "/health", POSITIVE)]  # no parameters: nothing invalid to send
# what the schema does not say: a prompt must fit the model's context in tokens, n x prompts <= 16, and the
# model names (the path of GET /v1/models/{model}; request bodies get a real one below)
SEMANTIC = {(400, "context_length_exceeded"), (400, "too_many_choices"), (404, "model_not_found")}


@pytest.mark.parametrize(("method", "path", "mode"), FUZZED, ids=[f"{m} {p} {g.value}" for m, p, g in FUZZED])
def test_schemathesis(server, method, path, mode):
    """Seeded, bounded runs of schemathesis' checks (no 5xx; status codes, content types, headers and bodies as
    documented, streamed events too; invalid requests refused) over requests made from /openapi.json. Valid
    requests must succeed, unless they break one of the rules the schema does not express (then with that code)."""
    operation = schemathesis.openapi.from_url(f"{server}/openapi.json")[path][method]

    @given(operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        if isinstance(case.body, dict) and mode == POSITIVE:
            case.body |= {"model": "tiny"} if "model" in case.body else {}  # the schema allows any name
            for key, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):  # keep it fast
                if isinstance(case.body.get(key), int | float) and not isinstance(case.body[key], bool):
                    case.body[key] = min(case.body[key], cap)
        response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                                          excluded_checks=[positive_data_acceptance])
        if mode == POSITIVE and response.status_code != 200:
            assert (response.status_code, response.json()["error"]["code"]) in SEMANTIC, response.text

    check()


# --------------------------------------------------------------------------------------------
# Concurrency: disconnects stop generation, a full queue answers 503, many streams at once
# --------------------------------------------------------------------------------------------


def test_disconnect_stops_generation(http, endless):
    steps, before = endless.model, endless.model.steps
    body = {"model": "endless", "prompt": "Tom", "max_tokens": 4096, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = (line for line in r.iter_lines() if line)
        for _ in range(5):
            assert next(events).startswith("data: {")
    # the client closed the stream after five chunks: the worker stops at its next step and frees its slot
    wait_until(lambda: http.get("/health").json()["running"] == 0)
    stopped_at = steps.steps
    time.sleep(0.3)
    assert steps.steps == stopped_at < before + 1000  # of 4096: at 5 ms a step, it would go on for 20 s more


def test_disconnect_stops_non_streamed_generation(server, endless):
    before = endless.model.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json={"model": "endless", "prompt": "Tom", "max_tokens": 4096},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    wait_until(lambda: httpx.get(f"{server}/health").json()["running"] == 0)
    assert endless.model.steps - before < 1000  # of 4096


def test_full_queue_answers_503_and_recovers(endless):
    app = create_app({"endless": endless}, max_concurrency=1, max_queue=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"prompt": "Tom", "max_tokens": 4096, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as first, \
                http.stream("POST", "/v1/completions", json=body) as second:
            assert first.status_code == second.status_code == 200
            wait_until(lambda: http.get("/health").json()["waiting"] == 1)
            r = http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 2})
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "server_busy"
        # both clients left: the worker and the queue place are free again
        wait_until(lambda: (h := http.get("/health").json())["running"] + h["waiting"] == 0)
        r = http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_load_64_concurrent_streams(server):
    """64 streaming requests at once against the tiny model: all complete, none fail; prints latency figures."""
    n, max_tokens = 64, 16

    async def one(client: AsyncOpenAI, i: int) -> tuple[float, int]:
        t0, tokens = time.perf_counter(), 0
        stream = await client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=max_tokens,
                                                 seed=i, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - t0, tokens

    async def main() -> list:
        client = AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
        async with client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n)),
                                                         return_exceptions=True), timeout=120)

    t0 = time.perf_counter()
    results = asyncio.run(main())
    wall = time.perf_counter() - t0
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    assert all(r[1] >= 1 for r in results)
    p50, p99 = statistics.median(latencies), latencies[min(n - 1, round(0.99 * (n - 1)))]
    print(f"\n{n} concurrent streams, max_tokens {max_tokens}: p50 {p50:.2f} s, p99 {p99:.2f} s, "
          f"{tokens / wall:.0f} tokens/s, 0 failures")


# --------------------------------------------------------------------------------------------
# Models and the command line
# --------------------------------------------------------------------------------------------
def test_model_names(tiny_run):
    models = load_models([str(tiny_run), f"other={tiny_run}"])
    assert list(models) == [tiny_run.name, "other"]
    with pytest.raises(StoryGPTError, match="two models"):
        load_models([str(tiny_run), str(tiny_run)])
    with pytest.raises(StoryGPTError, match="model name"):
        create_app({"bad/name": models["other"]})


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com"]))


def test_cli_serve_refuses_bad_input(tmp_path, tiny_run, capsys):
    code, _, err = run_cli(["serve", "--model", tmp_path / "missing"], capsys)
    assert code == 2 and err.startswith("storygpt: error:") and len(err.strip().splitlines()) == 1
    busy = listen("127.0.0.1", 0)  # also keeps a wrongly started server from serving forever
    port = busy.getsockname()[1]
    try:
        code, _, err = run_cli(["serve", "--model", tiny_run, "--port", port], capsys)
        assert code == 2 and "cannot listen" in err and len(err.strip().splitlines()) == 1
        code, _, err = run_cli(["serve", "--model", tiny_run, "--port", port, "--max-concurrency", 0], capsys)
        assert code == 2 and "max_concurrency" in err
        code, _, err = run_cli(["serve", "--model", tiny_run, "--port", 70000], capsys)
        assert code == 2 and "--port" in err
    finally:
        busy.close()


def test_cli_serve_compiled(tiny_run, tiny, tmp_path):
    """`storygpt serve --compile` compiles before it listens (its step for 1 and 2 stories at once) and answers as
    the eager model does (greedy), for one story and for two."""
    cmd = [sys.executable, "-m", "storygpt", "serve", "--model", f"tiny={tiny_run}", "--port", "0", "--compile",
           "--log-level", "warning", "--max-concurrency", "2"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("storygpt serve: http"), log.read_text()
        client = OpenAI(base_url=line.split()[2], api_key="none", max_retries=0, timeout=120)
        want = tiny.generate("Once upon a time", temperature=0, max_new_tokens=30)[len("Once upon a time"):]
        one = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0)
        two = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0, n=2)
        assert [c.text for c in one.choices] == [want] and [c.text for c in two.choices] == [want, want]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "compiling tiny" in log.read_text()
