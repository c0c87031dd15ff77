"""The HTTP layer in process, against the real engine and scheduler stepping a fake worker (no
device work): overload (429 queue full / queue timeout), warmup and broken-engine 503s, a failing
step, aborts, metrics. These run in a few seconds."""

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tropical_jax.api.app import create_app
from tropical_jax.api.engine_client import EngineClient
from tropical_jax.api.metrics import ServerMetrics
from tropical_jax.api.protocol import Limits
from tropical_jax.config import EngineConfig
from tropical_jax.engine.build import engine_policy
from tropical_jax.engine.core import MAX_CONSECUTIVE_FAILURES, Engine
from tropical_jax.sched.config import parse_cluster
from tropical_jax.sched.cost_model import CostModel

CFG = EngineConfig(max_model_len=64, page_size=16, max_num_seqs=8, max_chunk_tokens=16, max_prefill_seqs=8,
                   bucket_set="fine", compilation_cache_dir=None)
# Every step costs 10 ms to the scheduler, so a request's default TTFT SLO is 5 x 10 ms (the queueing
# floor too: one chunk prefills a full decode batch).
COST = CostModel.from_json({"units": "ms", "prefill": {"c2": 0, "c1": 0, "c0": 10}, "decode": {"d0": 10, "d1": 0,
                            "d2": 0}, "transfer": {"bandwidth_GBps": 1, "latency_ms": 1}, "kv_bytes_per_token": 1})


class FakeWorker:
    """A worker handle whose every step samples token 7 for every row, while `gate` is set; `fail`
    makes the next steps raise."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.fail = 0

    def step(self, inputs):
        self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise RuntimeError("device exploded")
        time.sleep(0.002)
        return np.full(len(inputs.temperature), 7, np.int32)


class FakeEngine(Engine):
    """The real engine on one fake worker: its scheduler, policy and pages are the real ones."""

    def __init__(self, queue_timeout=None):
        policy = engine_policy(f"chunked:shed=true,queue_timeout={queue_timeout}", CFG)
        self.worker = FakeWorker()
        super().__init__({"C0": self.worker}, parse_cluster("1C"), policy, COST, CFG, None, (), vocab_size=100)
        self.gate = self.worker.gate

    def run_once(self):
        # A closed gate holds the next step back on the engine thread, as a long device step would:
        # requests then wait in the scheduler's queue.
        if not self.gate.is_set() and not self.worker.fail:
            time.sleep(0.005)
            self.scheduler.tick(self.now())
            return True
        return super().run_once()


CLIENTS = []


@pytest.fixture(autouse=True)
def stop_engine_threads():
    yield
    while CLIENTS:
        CLIENTS.pop().shutdown()


def make(max_queue=8, queue_timeout=None, ready=True):
    engine = FakeEngine(queue_timeout)
    server = SimpleNamespace(client=None, engine=engine, warmup="compiling", tokenizer=None,
                             limits=Limits("fake", 64, 100), api_key=None, max_body_bytes=1 << 16, started=0)
    server.metrics = ServerMetrics(state=lambda: server.client.state() if server.client else None)
    if ready:
        server.client = EngineClient(engine, max_queue=max_queue, on_finish=server.metrics.finished)
        CLIENTS.append(server.client)
    return server, engine, create_app(server).test_client()


def sse(resp):
    return [json.loads(line[6:]) for line in resp.get_data(as_text=True).splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def wait_for(cond, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_warming_up_answers_503_then_serves():
    server, engine, http = make(ready=False)
    h = http.get("/health")
    assert h.status_code == 503 and h.json == {"status": "warming_up", "warmup": "compiling"}
    assert h.headers["Retry-After"] == "5"
    r = http.post("/v1/completions", json={"prompt": [1, 2]})
    assert r.status_code == 503 and r.json["error"]["code"] == "warming_up" and r.headers["Retry-After"] == "5"
    assert http.get("/metrics").status_code == 200  # scrapes work before the engine exists
    server.client = EngineClient(server.engine, on_finish=server.metrics.finished)
    CLIENTS.append(server.client)
    assert http.get("/health").json == {"status": "ok"}
    r = http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 3})
    assert r.status_code == 200 and r.json["token_ids"] == [7, 7, 7] and r.json["slo"]["path"] == "colocated"


def test_queue_full_is_429_and_the_queued_ones_still_finish():
    server, engine, http = make(max_queue=2)
    engine.gate.clear()  # nothing starts: requests pile up in the queue
    results = []

    def queued():
        results.append(http.post("/v1/completions", json={"prompt": [1], "max_tokens": 4}).json)

    threads = [threading.Thread(target=queued) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(server.client.unscheduled) == 2)
    full = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 4})
    assert full.status_code == 429 and full.json["error"]["code"] == "queue_full"
    assert full.headers["Retry-After"] == "1"
    assert full.json["error"]["type"] == "rate_limit_error" and "queue is full" in full.json["error"]["message"]
    time.sleep(0.1)
    engine.gate.set()
    for t in threads:
        t.join(timeout=5)
    assert [r["token_ids"] for r in results] == [[7] * 4] * 2
    metrics = http.get("/metrics").get_data(as_text=True)
    assert 'tropical_requests_total{outcome="rejected"} 1.0' in metrics
    # They waited past their default TTFT SLO (5 x 10 ms): served, but missed.
    assert 'tropical_requests_total{outcome="missed"} 2.0' in metrics


def test_queue_timeout_is_429_with_retry_after_whole_or_streamed():
    server, engine, http = make(queue_timeout=0.1)
    engine.gate.clear()
    r = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 4})
    assert r.status_code == 429 and r.json["error"]["code"] == "queue_timeout"
    assert r.headers["Retry-After"] == "1" and "x-should-retry" not in r.headers
    # A stream's status line waits for its first event, so a refusal gets its status there too.
    s = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 4, "stream": True})
    assert s.status_code == 429 and s.json["error"]["code"] == "queue_timeout" and s.headers["Retry-After"] == "1"
    wait_for(lambda: server.client.state()["queued"] == 0 and not server.client.handles)


def test_a_request_whose_slo_cannot_be_met_is_a_503_not_to_be_retried():
    _, engine, http = make()  # the scheduler sheds it: its 10 ms prefill cannot end within 1 us
    for stream in (False, True):
        r = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 4, "stream": stream, "ttft_slo_ms": 1e-3})
        assert r.status_code == 503 and r.json["error"]["code"] == "slo_unattainable"
        assert r.headers["x-should-retry"] == "false" and "TTFT SLO" in r.json["error"]["message"]
    assert engine.scheduler.counters["rejected"] == 2


def test_requests_cut_by_a_drain_get_a_503_or_an_error_event_and_done():
    server, engine, http = make()
    results = {}

    def ask(stream):
        r = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 50, "stream": stream})
        results[stream] = (r.status_code, r.get_data(as_text=True), r.headers)

    threads = [threading.Thread(target=ask, args=(stream,)) for stream in (False, True)]
    for t in threads:
        t.start()
    wait_for(lambda: len(engine.scheduler.workers["C0"].decoding) == 2)
    engine.gate.clear()  # both are mid-generation
    for rid in list(server.client.handles):
        server.client.abort(rid, "shutdown")
    for t in threads:
        t.join(timeout=5)
    status, body, headers = results[False]
    assert status == 503 and json.loads(body)["error"]["code"] == "shutdown" and headers["Retry-After"] == "5"
    status, body, _ = results[True]
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and json.loads(events[-2])["error"]["code"] == "shutdown" and events[-1] == "[DONE]"
    wait_for(lambda: engine.pages_used() == 0)
    assert 'tropical_requests_total{outcome="shutdown"} 2.0' in http.get("/metrics").get_data(as_text=True)


def test_a_stream_that_fails_midway_still_ends_with_an_error_and_done():
    server, engine, http = make()
    engine.gate.clear()
    results = []
    t = threading.Thread(target=lambda: results.append(http.post(
        "/v1/completions", json={"prompt": [1], "max_tokens": 20, "stream": True}).get_data(as_text=True)))
    t.start()
    wait_for(lambda: server.client.handles)
    handle = next(iter(server.client.handles.values()))
    handle.events.put(([7], "x", None))
    handle.events.put(({7}, "x", None))  # a set: not JSON, the chunk cannot be written
    t.join(timeout=5)
    events = [line[6:] for line in results[0].splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["token_ids"] == [7]
    assert "internal error: TypeError" in json.loads(events[1])["error"]["message"] and events[2] == "[DONE]"
    wait_for(lambda: not server.client.handles)  # aborted


def test_a_failing_step_fails_its_requests_only_until_the_engine_is_broken():
    server, engine, http = make()
    engine.worker.fail = 1
    r = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 3})
    assert r.status_code == 500 and r.json["error"]["code"] == "engine_error"
    ok = http.post("/v1/completions", json={"prompt": [2], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json["usage"]["completion_tokens"] == 3
    assert http.get("/health").json["status"] == "ok"
    wait_for(lambda: engine.pages_used() == 0)  # the failed request's page came back
    engine.worker.fail = MAX_CONSECUTIVE_FAILURES
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        assert http.post("/v1/completions", json={"prompt": [1], "max_tokens": 3}).status_code == 500
    wait_for(lambda: http.get("/health").status_code == 503)
    h = http.get("/health")
    assert h.json["status"] == "error" and "device exploded" in h.json["error"]
    r = http.post("/v1/completions", json={"prompt": [1]})
    assert r.status_code == 503 and r.json["error"]["code"] == "engine_error"
    assert 'tropical_requests_total{outcome="error"} 4.0' in http.get("/metrics").get_data(as_text=True)


def test_closing_a_stream_aborts_the_request_and_frees_its_pages():
    server, engine, http = make()
    r = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 60, "stream": True})
    body = r.response  # the SSE generator
    first = next(iter(body))
    assert b"token_ids" in first
    wait_for(lambda: engine.pages_used() == 1)
    r.close()  # what waitress does when the client has gone
    wait_for(lambda: engine.pages_used() == 0 and not server.client.handles)
    assert server.client.state()["workers"][0]["kv_pages_used"] == 0


def test_metrics_and_cluster_state_have_their_shapes():
    server, engine, http = make()
    r = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5, "ttft_slo_ms": 10000,
                                           "tpot_slo_ms": 10000})
    slo = r.json["slo"]
    assert slo["slo_met"] and slo["ttft_slo_ms"] == 10000 and 0 <= slo["queueing_ms"] <= slo["ttft_ms"]
    text = http.get("/metrics").get_data(as_text=True)
    for line in ("tropical_ttft_seconds_count 1.0", "tropical_tpot_seconds_count 1.0",
                 "tropical_queueing_seconds_count 1.0", "tropical_kv_transfer_seconds_count 0.0",
                 'tropical_dispatch_total{path="colocated"} 1.0',
                 'tropical_worker_info{role="colocated",worker="C0"} 1.0',
                 'tropical_worker_kv_pages_used{role="colocated",worker="C0"} 0.0',
                 "tropical_generated_tokens_total 5.0"):
        assert line in text, line
    state = http.get("/v1/cluster").json
    assert state["workers"][0]["name"] == "C0" and state["in_flight"] == 0 and state["draining"] is False
    # The single worker is a one-worker cluster under the shared scheduler's policy.
    assert (state["cluster"], state["policy"], state["workers"][0]["role"]) == ("1C", "chunked", "colocated")
    assert set(state["workers"][0]) >= {"role", "queue", "running", "kv_pages_used", "kv_pages_total", "min_slack_s"}


def test_chat_stream_opens_with_the_role_and_closes_with_usage():
    class Tok:
        chat_template = "fake"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert not tokenize  # the server encodes the text itself
            return "|".join(m["content"] for m in messages)

        def encode(self, text, add_special_tokens):
            return [len(part) % 100 + 1 for part in text.split("|")]

    server, engine, http = make()
    server.tokenizer = Tok()
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                     {"role": "user", "content": "hi"}],
        "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]] == [None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3,
                                                                    "total_tokens": 5}
    whole = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json
    # Chat's default max_tokens is the rest of the context (64 - 1 prompt token).
    assert whole["usage"]["completion_tokens"] == 63 and whole["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("body,param", [
    ({"prompt": [1], "logprobs": 2}, "logprobs"),
    ({"prompt": [1], "echo": True}, "echo"),
    ({"prompt": [1], "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": [1], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [1], "temperature": float("nan")}, "temperature"),
    ({"prompt": [[1], [2]]}, "prompt"),
])
def test_unsupported_or_inconsistent_fields_are_refused(body, param):
    _, _, http = make()
    r = http.post("/v1/completions", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 400 and r.json["error"]["param"] == param, r.json
    ok = http.post("/v1/completions", json={"prompt": [1], "logprobs": None, "frequency_penalty": 0, "echo": False})
    assert ok.status_code == 200
