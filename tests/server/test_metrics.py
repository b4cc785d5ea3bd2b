"""GET /metrics: Prometheus exposition of the engine's gauges and counters and the per-request histograms.

The session engine is shared with other tests, so counters are compared as deltas between two scrapes.
"""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from .helpers import HELLO, is_idle, wait_until, wait_until_idle

HISTOGRAMS = ("nitro:time_to_first_token_seconds", "nitro:e2e_request_latency_seconds",
              "nitro:request_queue_time_seconds", "nitro:inter_token_latency_seconds")
LONG_RUN = {"messages": HELLO, "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def scrape(base_url: str) -> tuple[dict[tuple[str, frozenset], float], list]:
    response = httpx.get(base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return samples, families


def value(samples, name: str, model: str, **labels) -> float:
    return samples.get((name, frozenset({"model_name": model, **labels}.items())), 0.0)


def test_counters_and_histograms_move_by_the_requests(threaded_server):
    engine, base = threaded_server.engine, threaded_server.base_url
    model = engine.model_name
    assert is_idle(wait_until_idle(engine))
    before, _ = scrape(base)
    usages, reasons = [], []
    with httpx.Client(timeout=120) as http:
        plain = http.post(base + "/v1/chat/completions",
                          json={"messages": HELLO, "max_tokens": 6, "temperature": 0}).json()
        usages.append(plain["usage"])
        reasons.append(plain["choices"][0]["finish_reason"])
        with http.stream("POST", base + "/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 5,
                               "ignore_eos": True, "stream": True,
                               "stream_options": {"include_usage": True}}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        usages.append(chunks[-1]["usage"])
        reasons.append(next(c["choices"][0]["finish_reason"] for c in chunks
                            if c["choices"] and c["choices"][0].get("finish_reason")))
        text = http.post(base + "/v1/completions",
                         json={"prompt": "The sky is", "max_tokens": 3, "ignore_eos": True}).json()
        usages.append(text["usage"])
        reasons.append(text["choices"][0]["finish_reason"])
    assert is_idle(wait_until_idle(engine))
    after, families = scrape(base)

    def delta(name, **labels):
        return value(after, name, model, **labels) - value(before, name, model, **labels)

    assert delta("nitro:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("nitro:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    for reason in set(reasons):
        assert delta("nitro:request_success_total", finished_reason=reason) == reasons.count(reason)
    assert sum(delta("nitro:request_success_total", finished_reason=r) for r in ("stop", "length", "abort")) == 3
    for name in HISTOGRAMS[:3]:
        assert delta(name + "_count") == 3, name
        assert delta(name + "_bucket", le="+Inf") == 3, name
        assert delta(name + "_sum") > 0, name
    assert delta("nitro:inter_token_latency_seconds_count") == sum(u["completion_tokens"] > 1 for u in usages)
    assert delta("nitro:prefix_cache_queries_total") >= 0
    assert value(after, "nitro:kv_cache_usage_perc", model) == 0
    assert value(after, "nitro:num_requests_running", model) == 0
    assert value(after, "nitro:num_requests_waiting", model) == 0
    names = {f.name for f in families}
    for expected in ("nitro:num_requests_running", "nitro:num_requests_waiting", "nitro:kv_cache_usage_perc",
                     "nitro:prefix_cache_queries", "nitro:prefix_cache_hits", "nitro:num_preemptions",
                     "nitro:prompt_tokens", "nitro:generation_tokens", "nitro:request_success", *HISTOGRAMS):
        assert expected in names
    for family in families:
        assert family.name.startswith("nitro:"), family.name
        assert family.samples, family.name
        for sample in family.samples:
            assert sample.labels.get("model_name") == model, sample


def test_gauges_reflect_a_request_in_flight_and_abort_counts(threaded_server):
    engine, base = threaded_server.engine, threaded_server.base_url
    model = engine.model_name
    assert is_idle(wait_until_idle(engine))
    before, _ = scrape(base)
    with httpx.Client(timeout=30) as http, \
            http.stream("POST", base + "/v1/chat/completions", json={**LONG_RUN, "stream": True}) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):  # the role chunk and two content chunks
            next(events)
        during, _ = scrape(base)
    assert value(during, "nitro:num_requests_running", model) == 1
    assert value(during, "nitro:num_requests_waiting", model) == 0
    assert 0 < value(during, "nitro:kv_cache_usage_perc", model) <= 1
    assert is_idle(wait_until_idle(engine))
    assert wait_until(lambda: value(scrape(base)[0], "nitro:request_success_total", model,
                                    finished_reason="abort")
                      == value(before, "nitro:request_success_total", model, finished_reason="abort") + 1)
    after, _ = scrape(base)
    assert value(after, "nitro:kv_cache_usage_perc", model) == 0
    assert value(after, "nitro:num_requests_running", model) == 0
    assert value(after, "nitro:e2e_request_latency_seconds_count", model) == \
        value(before, "nitro:e2e_request_latency_seconds_count", model) + 1


def test_metrics_without_a_model(engine_config):
    from nitro_torch.server.app import create_app
    from nitro_torch.server.model_host import ModelHost

    app = create_app(engine_config, host=ModelHost(engine_config))
    with TestClient(app) as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    families = list(text_string_to_metric_families(response.text))
    assert families and all(f.name.startswith("nitro:") for f in families)
    assert not any(f.samples for f in families)  # nothing served yet: no series


def test_an_engine_that_served_between_two_scrapes_is_counted(tiny_model_dir):
    """A model serves, then loadmodel replaces it by a fresh engine, with no scrape in between: the requests
    the first engine served are still counted."""
    from nitro_torch.config import build_config
    from nitro_torch.server.app import create_app

    config = build_config({"model": "none", "device": "cpu", "num_kv_blocks": 32}, env={})
    load = "/inferences/llamacpp/loadmodel"
    with TestClient(create_app(config)) as http:
        assert http.post(load, json={"model": tiny_model_dir}).status_code == 200
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": HELLO, "max_tokens": 3, "ignore_eos": True, "temperature": 0}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert http.post(load, json={"model": tiny_model_dir}).status_code == 200  # a new engine
        families = list(text_string_to_metric_families(http.get("/metrics").text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    assert value(samples, "nitro:generation_tokens_total", model) == 3
    assert value(samples, "nitro:request_success_total", model, finished_reason="length") == 1
    assert value(samples, "nitro:num_requests_running", model) == 0
