"""GET /metrics: Prometheus' text format, parsed with prometheus_client's own parser, against a server of its own
(so that every count starts at zero)."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import running, wait_until
from prometheus_client.parser import text_string_to_metric_families

import storygpt
from storygpt.serve import create_app

KEY = "sk-metrics"


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return storygpt.load(tiny_run)


def scrape(http: httpx.Client) -> dict[str, list]:
    """The samples of each family: (sample name, labels, value)."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {family.name: [(s.name, s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(r.text)}


def value(families: dict, sample: str, **labels) -> float:
    family = next(f for f in families.values() if any(name == sample for name, _, _ in f))
    return sum(v for name, lbl, v in family if name == sample and labels.items() <= lbl.items())


def streamed_usage(r: httpx.Response) -> dict:
    """The `usage` of a stream's last chunk (include_usage), after reading the whole stream."""
    data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return json.loads(data[-2])["usage"]


def test_metrics_count_requests_tokens_and_latency(tiny):
    app = create_app({"tiny": tiny}, api_key=KEY, max_concurrency=4)
    with running(app) as url, httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        # behind the API key, as /v1/* is; /health is not
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics").json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").status_code == 200
        usages = []
        for seed in (1, 2):
            r = http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 12, "seed": seed})
            assert r.status_code == 200
            usages.append(r.json()["usage"])
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Mia"}], "max_tokens": 9})
        assert r.status_code == 200
        usages.append(r.json()["usage"])
        stream = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 10, "seed": 3}
        with http.stream("POST", "/v1/completions", json={"prompt": "Lily", **stream}) as r:
            usages.append(streamed_usage(r))
        with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Ben"}],
                                                               **stream}) as r:
            usages.append(streamed_usage(r))
        assert http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": -1}).status_code == 400
        assert http.post("/v1/completions", json={"model": "nope", "prompt": "Tom"}).status_code == 404
        assert http.get("/v1/nothing/here").status_code == 404  # no route: counted as "other", whatever the path

        # a request is counted once its response has gone out: the last one may still be on its way
        wait_until(lambda: value(scrape(http), "storygpt_requests_total", endpoint="/v1/completions") == 5)
        families = scrape(http)
        requests = {(lbl["model"], lbl["endpoint"], lbl["status"]): v
                    for name, lbl, v in families["storygpt_requests"] if name == "storygpt_requests_total"}
        assert {k: v for k, v in requests.items() if k[1].startswith("/v1/")} == {
            ("tiny", "/v1/completions", "200"): 3, ("tiny", "/v1/chat/completions", "200"): 2,
            ("", "/v1/completions", "400"): 1, ("", "/v1/completions", "404"): 1}
        assert requests[("", "/metrics", "401")] == 2 and requests[("", "/metrics", "200")] >= 1
        assert requests[("", "other", "404")] == 1 and requests[("", "/health", "200")] == 1

        stories = len(usages)
        assert value(families, "storygpt_prompt_tokens_total", model="tiny") == sum(u["prompt_tokens"] for u in usages)
        assert value(families, "storygpt_completion_tokens_total", model="tiny") == \
            sum(u["completion_tokens"] for u in usages)
        assert value(families, "storygpt_time_to_first_token_seconds_count", model="tiny") == stories
        ttft_sum = value(families, "storygpt_time_to_first_token_seconds_sum", model="tiny")
        assert 0 < ttft_sum < 60 * stories
        per_token = value(families, "storygpt_time_per_output_token_seconds_count", model="tiny")
        assert per_token == sum(u["completion_tokens"] > 1 for u in usages)
        steps = value(families, "storygpt_decode_steps_total", model="tiny")
        assert steps >= max(u["completion_tokens"] for u in usages)
        assert value(families, "storygpt_decode_batch_size_count", model="tiny") == steps
        assert value(families, "storygpt_decode_batch_size_bucket", model="tiny", le="1.0") == steps  # one at a time
        assert value(families, "storygpt_requests_running", model="tiny") == 0
        assert value(families, "storygpt_requests_waiting", model="tiny") == 0
        assert value(families, "storygpt_free_slots", model="tiny") == 4


def test_metrics_without_a_key_are_open_and_per_app(tiny):
    """No API key: /metrics is as open as the API. Each app has its own registry: two apps in one process."""
    first, second = create_app({"a": tiny}), create_app({"b": tiny})
    with running(first) as a, running(second) as b:
        assert httpx.post(f"{a}/v1/completions", json={"prompt": "Tom", "max_tokens": 2}).status_code == 200
        text_a, text_b = httpx.get(f"{a}/metrics").text, httpx.get(f"{b}/metrics").text
    assert 'storygpt_completion_tokens_total{model="a"} 2.0' in text_a and 'model="b"' not in text_a
    assert 'storygpt_completion_tokens_total{model="b"} 0.0' in text_b and 'model="a"' not in text_b
