"""The real server over HTTP: OpenAI shapes, parity with LLM.generate, concurrency, failures."""

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from model_helpers import save_tiny_hf
from serve_helpers import ServerProcess
from tropical_jax import LLM, SamplingParams

pytestmark = [pytest.mark.subprocess]

# A long context with one context bucket: few executables, and a 1000-token stream lasts long
# enough to hang up in the middle of it.
ENGINE = dict(max_model_len=1024, context_buckets=[1024], page_size=16, max_num_seqs=8, max_chunk_tokens=16,
              batch_buckets=[1, 8])
ENGINE_FLAGS = ["--max-model-len", "1024", "--context-buckets", "1024", "--page-size", "16", "--max-num-seqs", "8",
                "--max-chunk-tokens", "16", "--batch-buckets", "1,8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(path, "llama", max_position_embeddings=1024, eos_token_id=None)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    s = ServerProcess("--model", str(model_dir), *ENGINE_FLAGS)
    yield s
    s.stop()


def sse_events(resp):
    out = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            out.append(line[6:].decode())
    return out


def test_completions_match_offline_generate_streaming_and_not(server, model_dir):
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (5, 13)]
    llm = LLM(str(model_dir), **ENGINE, compilation_cache_dir=None, progress=False)
    want = [o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                              sampling_params=SamplingParams(max_tokens=10, temperature=0))]
    for p, w in zip(prompts, want):
        r = server.post("/v1/completions", {"prompt": p, "max_tokens": 10, "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion"
        assert body["token_ids"] == w and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(p), "completion_tokens": 10, "total_tokens": len(p) + 10}
        assert set(body["slo"]) >= {"ttft_ms", "tpot_ms", "slo_met"}
        r = server.post("/v1/completions", {"prompt": p, "max_tokens": 10, "temperature": 0, "stream": True,
                                            "stream_options": {"include_usage": True}}, stream=True)
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        ids = [t for c in chunks if c["choices"] for t in c["token_ids"]]
        assert ids == w
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_64_concurrent_streaming_clients(server):
    def one(i):
        r = server.post("/v1/completions", {"prompt": [1 + i % 50, 2, 3], "max_tokens": 5 + i % 7, "stream": True,
                                            "seed": i}, stream=True)
        events = sse_events(r)
        return sum(len(json.loads(e)["token_ids"]) for e in events[:-1]), events[-1]

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert [n for n, _ in results] == [5 + i % 7 for i in range(64)]
    assert all(done == "[DONE]" for _, done in results)
    assert server.get("/health").json()["status"] == "ok"


BAD = [
    ("not json", "{oops", 400, "not valid JSON"),
    ("array body", [1, 2], 400, "JSON object"),
    ("no prompt", {}, 400, "'prompt'"),
    ("empty prompt", {"prompt": ""}, 400, "must not be empty"),
    ("prompt wrong type", {"prompt": 5}, 400, "'prompt'"),
    ("max_tokens string", {"prompt": [1], "max_tokens": "9"}, 400, "max_tokens"),
    ("max_tokens zero", {"prompt": [1], "max_tokens": 0}, 400, "max_tokens"),
    ("temperature negative", {"prompt": [1], "temperature": -0.5}, 400, "temperature"),
    ("top_p above one", {"prompt": [1], "top_p": 1.5}, 400, "top_p"),
    ("top_k zero", {"prompt": [1], "top_k": 0}, 400, "top_k"),
    ("seed float", {"prompt": [1], "seed": 1.5}, 400, "seed"),
    ("n=2", {"prompt": [1], "n": 2}, 400, "'n'"),
    ("stop wrong type", {"prompt": [1], "stop": 3}, 400, "stop"),
    ("stream not bool", {"prompt": [1], "stream": "yes"}, 400, "stream"),
    ("unknown model", {"prompt": [1], "model": "gpt-9"}, 404, "does not exist"),
    ("prompt over context", {"prompt": [1] * 1024}, 400, "context"),
    ("token outside vocab", {"prompt": [1, 100000]}, 400, "vocabulary"),
    ("negative slo", {"prompt": [1], "ttft_slo_ms": -5}, 400, "ttft_slo_ms"),
    ("chat without messages", {"messages": []}, 400, "messages"),
    ("chat unknown role", {"messages": [{"role": "root", "content": "x"}]}, 400, "unknown message role"),
    ("chat content not text", {"messages": [{"role": "user", "content": 5}]}, 400, "text parts"),
    ("deep nesting", "{\"prompt\": " + "[" * 100000 + "]" * 100000 + "}", 400, "not valid JSON"),
    ("not utf-8", b'{"prompt": "\xff\xfe"}', 400, "not valid JSON"),
    ("NaN temperature", '{"prompt": [1], "temperature": NaN}', 400, "temperature"),
    ("negative token", {"prompt": [1, -1]}, 400, "vocabulary"),
    ("unsupported logprobs", {"prompt": [1], "logprobs": 5}, 400, "not supported"),
    ("too many stops", {"prompt": [1], "stop": list("abcdefghijklmnopq")}, 400, "at most 16"),
]


@pytest.mark.parametrize("name,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_malformed_requests_get_clear_4xx(server, name, body, status, message):
    path = "/v1/chat/completions" if name.startswith("chat") else "/v1/completions"
    if isinstance(body, (str, bytes)):
        r = requests.post(server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = server.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"]
    assert err["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    # ... and the server still answers correctly.
    ok = server.post("/v1/completions", {"prompt": [9, 8], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_routes_body_size_and_recovery(server):
    assert server.get("/nope").status_code == 404
    wrong = server.get("/v1/completions")
    assert wrong.status_code == 405 and "not allowed" in wrong.json()["error"]["message"]
    big = requests.post(server.url + "/v1/completions", data=b"x" * (5 << 20), timeout=30)
    assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]
    ok = server.post("/v1/completions", {"prompt": [3, 4], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    models = server.get("/v1/models").json()
    assert models["data"][0]["id"].startswith("tiny") and models["object"] == "list"


def test_client_disconnect_frees_pages(server):
    r = server.post("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1000, "stream": True}, stream=True)
    it = r.iter_lines()
    next(l for l in it if l.startswith(b"data: "))
    assert server.get("/v1/cluster").json()["workers"][0]["kv_pages_used"] > 0
    r.close()  # hang up mid-stream
    deadline = time.monotonic() + 1  # aborted and freed within a second of the hang-up
    while time.monotonic() < deadline:
        if server.get("/v1/cluster").json()["workers"][0]["kv_pages_used"] == 0:
            break
        time.sleep(0.1)
    assert server.get("/v1/cluster").json()["workers"][0]["kv_pages_used"] == 0
    metrics = server.get("/metrics").text
    assert 'tropical_requests_total{outcome="abort"} 1.0' in metrics


@pytest.mark.slow
def test_api_key_and_sigterm_drain(model_dir):
    s = ServerProcess("--model", str(model_dir), *ENGINE_FLAGS, "--api-key", "sekrit")
    try:
        assert s.post("/v1/completions", {"prompt": [1], "max_tokens": 2}).status_code == 401
        bad = s.post("/v1/completions", {"prompt": [1]}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and "API key" in bad.json()["error"]["message"]
        assert bad.json()["error"]["type"] == "authentication_error"
        assert s.get("/v1/models").status_code == 401
        assert s.get("/health").status_code == 200 and s.get("/metrics").status_code == 200  # stay open
        auth = {"Authorization": "Bearer sekrit"}
        assert s.get("/v1/models", headers=auth).status_code == 200
        results, started = [], threading.Semaphore(0)

        def long_request():
            r = s.post("/v1/completions", {"prompt": [2, 3], "max_tokens": 600, "stream": True}, headers=auth,
                       stream=True)
            n, lines = 0, r.iter_lines()
            for line in lines:
                if line.startswith(b"data: {"):
                    n += len(json.loads(line[6:])["token_ids"])
                    if n == 1:
                        started.release()
            results.append(n)

        threads = [threading.Thread(target=long_request) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=30)  # all four are streaming
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while s.get("/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.get("/health").json()["status"] == "draining"
        late = s.post("/v1/completions", {"prompt": [1], "max_tokens": 2}, headers=auth)
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        assert all(t.is_alive() for t in threads)  # still in flight when admission stopped
        for t in threads:
            t.join(timeout=60)
        assert results == [600] * 4
        assert s.proc.wait(timeout=30) == 0
        time.sleep(0.2)  # the reader thread collects the last lines
        log = "".join(s.lines)
        assert "drained; exiting" in log and "Traceback" not in log
    finally:
        s.stop()
