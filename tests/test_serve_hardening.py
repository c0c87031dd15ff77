"""The real server against hostile or careless clients: hang-ups, oversized and malformed input,
slow senders, impossible max_tokens; every refusal an OpenAI JSON error, and the server unharmed.

One single-worker server on a tiny model with the default model's tokenizer (so text prompts work)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

from model_helpers import save_tiny_hf
from serve_helpers import ServerProcess, raw_post
from tropical_jax.model.loader import model_path

pytestmark = [pytest.mark.subprocess]

MAX_LEN = 1024
# Chunks of 16 tokens, at most 2 prompts per chunk: the default TTFT SLO's floor is the time of
# ceil(8 / 2) = 4 full chunks.
FLAGS = ["--max-model-len", str(MAX_LEN), "--context-buckets", str(MAX_LEN), "--page-size", "16",
         "--max-num-seqs", "8", "--max-chunk-tokens", "16", "--max-prefill-seqs", "2", "--batch-buckets", "1,8",
         "--request-read-timeout", "2"]
LONGEST_TOKEN = 16  # characters, in the default model's vocabulary (asserted below)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    save_tiny_hf(path, "llama", vocab_size=4096, max_position_embeddings=MAX_LEN, eos_token_id=None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_path() / name, path / name)
    s = ServerProcess("--model", str(path), *FLAGS)
    yield s
    s.stop()


def worker(server):
    return server.get("/v1/cluster").json()["workers"][0]


def metric(server, name):
    line = next(line for line in server.get("/metrics").text.splitlines() if line.startswith(name))
    return float(line.split()[-1])


def error_of(response, status):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()["error"]


def still_serves(server):
    ok = server.post("/v1/completions", {"prompt": [9, 8], "max_tokens": 2, "ignore_eos": True})  # EOS may come first
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_non_streaming_client_that_hangs_up_is_aborted_within_a_second(server):
    aborted = metric(server, 'tropical_requests_total{outcome="abort"}')
    body = json.dumps({"prompt": "The quick brown fox", "max_tokens": 900, "ignore_eos": True,
                       "temperature": 0}).encode()
    socks = [raw_post(server.url, body) for _ in range(4)]
    deadline = time.monotonic() + 30
    while worker(server)["running"] < 4:  # all four decode, tokens flowing without a pause
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert worker(server)["kv_pages_used"] > 0
    for s in socks:
        s.close()
    hung_up = time.monotonic()
    while worker(server)["kv_pages_used"] or worker(server)["running"]:
        assert time.monotonic() - hung_up < 1.0, worker(server)
        time.sleep(0.02)
    assert metric(server, 'tropical_requests_total{outcome="abort"}') == aborted + 4
    still_serves(server)


def test_stop_token_ids_are_bounded_by_the_vocabulary(server):
    err = error_of(server.post("/v1/completions", {"prompt": [1, 2], "stop_token_ids": list(range(5000))}), 400)
    assert err["param"] == "stop_token_ids" and "4096" in err["message"]
    # The whole vocabulary is allowed, and it stops at the first token.
    r = server.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 5, "stop_token_ids": list(range(4096))})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
    assert r.json()["usage"]["completion_tokens"] == 1
    err = error_of(server.post("/v1/completions", {"prompt": [1], "stop": ["x" * 257]}), 400)
    assert err["param"] == "stop" and "256 characters" in err["message"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "abc \ud800 def", "max_tokens": 8}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \udfff"}], "max_tokens": 8}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
     "messages"),
    ("/v1/completions", {"prompt": "abc", "stop": ["\udc00"]}, "stop"),
])
def test_lone_surrogates_are_a_400_naming_the_field(server, path, body, param):
    raw = json.dumps(body)
    assert "\\ud8" in raw or "\\udf" in raw or "\\udc" in raw  # sent as JSON escapes, as a client would
    err = error_of(requests.post(server.url + path, data=raw, headers={"Content-Type": "application/json"},
                                 timeout=30), 400)
    assert err["param"] == param and "surrogate" in err["message"]
    still_serves(server)
    assert "Traceback" not in "".join(server.lines)


def test_huge_prompts_are_refused_by_their_length_before_tokenizing(server):
    limit = MAX_LEN * LONGEST_TOKEN
    err = error_of(server.post("/v1/completions", {"prompt": "word " * 600_000}), 400)  # 3 MB
    assert err["param"] == "prompt" and f"at most {limit} characters" in err["message"]
    err = error_of(server.post("/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "y" * (limit + 1)}]}), 400)
    assert err["param"] == "messages" and "characters" in err["message"]
    r = server.post("/v1/completions", {"prompt": "hello " * 100, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 100


def test_max_tokens_beyond_the_context_is_a_400_naming_the_limit(server):
    prompt = [5] * 1000
    r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 24})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24  # exactly fits
    err = error_of(server.post("/v1/completions", {"prompt": prompt, "max_tokens": 25}), 400)
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert "1024" in err["message"] and "at most 24" in err["message"]
    err = error_of(server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "max_completion_tokens": 10**12}), 400)
    assert err["param"] == "max_completion_tokens" and "1024" in err["message"]


def test_huge_bodies_and_headers_get_json_errors(server):
    big = requests.post(server.url + "/v1/completions", data=b"x" * (40 << 20), timeout=60)
    assert "larger than" in error_of(big, 413)["message"]
    chunked = requests.post(server.url + "/v1/completions", data=(b"x" * (1 << 20) for _ in range(8)), timeout=60)
    assert "larger than" in error_of(chunked, 413)["message"]
    headers = requests.post(server.url + "/v1/completions", json={"prompt": [1]}, timeout=60,
                            headers={"X-Big": "y" * 300_000})
    assert "Header" in error_of(headers, 431)["message"]
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # malformed HTTP
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        head, _, body = sock.makefile("rb").read().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert "Content-Length" in json.loads(body)["error"]["message"]
    still_serves(server)


def test_a_client_trickling_its_headers_is_cut(server):
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(0.5)
    start, closed = time.monotonic(), False
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
    while time.monotonic() - start < 10:
        try:
            sock.sendall(b"X")  # a byte every half second: waitress's idle timeout never fires
            if sock.recv(1024) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except OSError:  # reset by the server
            closed = True
            break
    sock.close()
    assert closed and 2 <= time.monotonic() - start < 6  # --request-read-timeout 2, checked every second
    still_serves(server)


def test_default_ttft_slo_has_a_queueing_floor(server):
    def slo_ms(n):
        return server.post("/v1/completions", {"prompt": [3] * n, "max_tokens": 1}).json()["slo"]["ttft_slo_ms"]

    # Up to 4 full chunks of 16 the floor holds; past it, the prompt's own chunks count (its prefill time
    # as profiled, chunk by chunk from its start: not exactly 5/4 of four single chunks).
    short, four, five = slo_ms(3), slo_ms(64), slo_ms(80)
    assert short == pytest.approx(four, rel=1e-4) and five > four * 1.01


def test_the_longest_token_is_as_assumed():
    from tropical_jax.model.loader import load_tokenizer

    assert max(map(len, load_tokenizer(model_path()).get_vocab())) == LONGEST_TOKEN


def test_startup_prints_no_torch_warning():
    hide_torch = "import sys; sys.modules['torch'] = None; "
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}  # set by imports here
    run = lambda code: subprocess.run([sys.executable, "-c", hide_torch + code], capture_output=True,  # noqa: E731
                                      text=True, timeout=120, env=env)
    assert "PyTorch was not found" in run("import transformers").stderr  # what the base install prints
    quiet = run("import tropical_jax.serve, transformers")
    assert quiet.returncode == 0 and "PyTorch" not in quiet.stderr
