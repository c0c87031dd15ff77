"""The real server on a multi-worker cluster (1P1M, tropical policy): the same tokens as the offline
single worker, per-worker state and dispatch counts in /v1/cluster and /metrics, disconnects."""

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from model_helpers import save_tiny_hf
from serve_helpers import ServerProcess, raw_post
from test_serve_api import sse_events
from tropical_jax import LLM, SamplingParams

pytestmark = [pytest.mark.subprocess]

# A long context with one context bucket: few executables, and a 1000-token stream lasts about 2 s,
# long enough to hang up in the middle of it.
ENGINE = dict(max_model_len=1024, context_buckets=[1024], page_size=16, max_num_seqs=8, max_chunk_tokens=16,
              batch_buckets=[1, 8])
FLAGS = ["--max-model-len", "1024", "--context-buckets", "1024", "--page-size", "16", "--max-num-seqs", "8",
         "--max-chunk-tokens", "16", "--batch-buckets", "1,8", "--cluster", "1P1M", "--policy", "tropical"]
# Hand-made cost model (ms): cheap prefill, 5 ms decode steps, so the scheduler's choices are stable.
PROFILE = {"units": "ms", "prefill": {"c2": 0.0, "c1": 0.05, "c0": 2.0},
           "decode": {"d0": 5.0, "d1": 0.1, "d2": 0.0}, "kv_bytes_per_token": 1024,
           "transfer": {"bandwidth_GBps": 5.0, "latency_ms": 1.0}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(path, "llama", max_position_embeddings=1024, eos_token_id=None)
    (path / "profile.json").write_text(json.dumps(PROFILE))
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    s = ServerProcess("--model", str(model_dir), "--profile", str(model_dir / "profile.json"), *FLAGS)
    yield s
    s.stop()


def pages(server):
    return {w["name"]: w["kv_pages_used"] for w in server.get("/v1/cluster").json()["workers"]}


def test_cluster_server_gives_the_single_worker_tokens(server, model_dir):
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (4, 20, 9)]
    llm = LLM(str(model_dir), **ENGINE, compilation_cache_dir=None, progress=False)
    want = [o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                              sampling_params=SamplingParams(max_tokens=8, temperature=0))]

    def both(p):
        whole = server.post("/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0}).json()
        streamed = sse_events(server.post("/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0,
                                                              "stream": True}, stream=True))
        return whole, [t for e in streamed[:-1] for t in json.loads(e)["token_ids"]]

    with ThreadPoolExecutor(3) as pool:  # concurrently, so decodes share steps on M0
        got = list(pool.map(both, prompts))
    for (whole, streamed), w in zip(got, want):
        assert whole["token_ids"] == w and streamed == w
        assert whole["slo"]["path"] in ("prefill", "inline") and whole["usage"]["completion_tokens"] == 8


def test_cluster_state_and_metrics_name_every_worker(server):
    r = server.post("/v1/completions", {"prompt": [3, 1, 4, 1, 5], "max_tokens": 6}).json()
    state = server.get("/v1/cluster").json()
    assert state["cluster"] == "1P1M" and state["policy"] == "tropical"
    assert state["step_time_factors"] == {}  # tropical plans with its profile as given (no recalibration)
    assert [(w["name"], w["role"]) for w in state["workers"]] == [("P0", "prefill"), ("M0", "multiplexing")]
    assert state["dispatch"].get("prefill", 0) + state["dispatch"].get("inline", 0) >= 1
    text = server.get("/metrics").text
    assert 'tropical_worker_info{role="multiplexing",worker="M0"} 1.0' in text
    assert 'tropical_worker_kv_pages_total{role="prefill",worker="P0"}' in text
    if r["slo"]["path"] == "prefill":  # handed P0 -> M0: its KV transfer was timed
        count = next(line for line in text.splitlines() if line.startswith("tropical_kv_transfer_seconds_count"))
        assert float(count.split()[-1]) >= 1


def test_cluster_disconnect_frees_pages_on_every_worker(server):
    r = server.post("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1000, "stream": True}, stream=True)
    lines = r.iter_lines()
    next(line for line in lines if line.startswith(b"data: "))
    deadline = time.monotonic() + 1
    while not sum(pages(server).values()) and time.monotonic() < deadline:  # the snapshot lags by <= 20 ms
        time.sleep(0.01)
    assert sum(pages(server).values()) > 0
    r.close()  # hang up mid-stream
    deadline = time.monotonic() + 1  # aborted and freed within a second of the hang-up
    while sum(pages(server).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pages(server) == {"P0": 0, "M0": 0}
    text = server.get("/metrics").text
    assert 'tropical_requests_total{outcome="abort"} 1.0' in text
    generated = next(line for line in text.splitlines() if line.startswith("tropical_generated_tokens_total"))
    assert float(generated.split()[-1]) < 1000 + 100  # it stopped early (other tests made < 100 tokens)
    ok = server.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_cluster_non_streaming_hangup_frees_pages_within_a_second(server):
    sock = raw_post(server.url, json.dumps({"prompt": [5, 6, 7], "max_tokens": 1000}).encode())
    deadline = time.monotonic() + 10
    while pages(server)["M0"] == 0:  # decoding on M0
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sock.close()
    hung_up = time.monotonic()
    while sum(pages(server).values()):
        assert time.monotonic() - hung_up < 1.0, pages(server)
        time.sleep(0.02)
    assert server.get("/v1/cluster").json()["in_flight"] == 0


@pytest.fixture(scope="module")
def planned(model_dir):
    """1P1M under planned (it sheds requests whose TTFT SLO cannot be met), with a short drain."""
    flags = [f if f != "tropical" else "planned" for f in FLAGS]
    s = ServerProcess("--model", str(model_dir), "--profile", str(model_dir / "profile.json"), *flags,
                      "--drain-timeout", "0.5")
    yield s
    s.stop()


@pytest.mark.slow  # a second server
def test_a_hopeless_slo_is_refused_once_not_retried_by_the_openai_client(planned):
    import openai

    def rejected():
        return planned.get("/v1/cluster").json()["dispatch"].get("rejected", 0)

    client = openai.OpenAI(base_url=planned.url + "/v1", api_key="unused", max_retries=2)
    before = rejected()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=planned.get("/v1/models").json()["data"][0]["id"], prompt=[1, 2, 3],
                                  max_tokens=4, extra_body={"ttft_slo_ms": 0.001})
    assert e.value.status_code == 503 and e.value.body["code"] == "slo_unattainable"
    assert "(scheduler: shed" in e.value.body["message"]  # the scheduler's reason
    assert e.value.response.headers["x-should-retry"] == "false"
    assert rejected() == before + 1  # sent once: the client believed the header
    assert planned.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4}).status_code == 200


@pytest.mark.slow  # a second server
def test_drain_timeout_ends_every_request_cleanly_and_exits_3(planned):
    """Runs last: it takes the planned server down."""
    results = {}

    def stream(i):
        r = planned.post("/v1/completions", {"prompt": [i + 1, 2], "max_tokens": 1000, "stream": True}, stream=True)
        results[i] = sse_events(r)

    def whole():
        r = planned.post("/v1/completions", {"prompt": [9, 9], "max_tokens": 1000})
        results["whole"] = (r.status_code, r.json(), r.headers)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)] + [threading.Thread(target=whole)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while planned.get("/v1/cluster").json()["in_flight"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    planned.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=30)
    for i in range(3):
        events = results[i]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutdown"
        assert sum(len(json.loads(e)["token_ids"]) for e in events[:-2]) < 1000
    status, body, headers = results["whole"]
    assert status == 503 and body["error"]["code"] == "shutdown" and "Retry-After" in headers
    assert planned.proc.wait(timeout=30) == 3
    time.sleep(0.2)  # the reader thread collects the last lines
    assert "cut 4 unfinished request(s)" in "".join(planned.lines)


@pytest.mark.slow
@pytest.mark.ray
def test_server_on_ray_actors_gives_the_same_tokens_and_takes_its_ray_down_on_sigterm(model_dir):
    import psutil

    def name(p):
        try:
            return p.name()
        except psutil.Error:  # exited since it was listed
            return ""

    prompt = [7, 3, 9, 11, 2, 8]
    llm = LLM(str(model_dir), **ENGINE, compilation_cache_dir=None, progress=False)
    want = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=8, temperature=0))
    s = ServerProcess("--model", str(model_dir), "--profile", str(model_dir / "profile.json"), *FLAGS,
                      "--backend", "ray", timeout=300)
    try:
        ray_processes = psutil.Process(s.proc.pid).children(recursive=True)
        assert {"raylet", "gcs_server"} <= {name(p) for p in ray_processes}  # the server started a local Ray
        r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
        assert r["token_ids"] == want[0].token_ids
        assert s.get("/v1/cluster").json()["backend"] == "ray"
        s.proc.send_signal(signal.SIGTERM)
        rc = s.proc.wait(timeout=60)
        time.sleep(0.2)  # the reader thread collects the last lines
        assert rc == 0, "".join(s.lines[-40:])
        _, alive = psutil.wait_procs(ray_processes, timeout=30)
        # Ray's per-node agents notice their raylet is gone on their own, up to about a minute later.
        lingering = [name(p) for p in alive if not name(p).endswith("Agent")]
        assert not lingering, f"Ray processes outlived the server: {lingering}"
    finally:
        s.stop()
