"""The server with the embedded default model: text and chat through the official openai client."""

import json
import subprocess
import sys

import pytest

from serve_helpers import ServerProcess
from tropical_jax import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

FLAGS = ["--max-model-len", "128", "--max-num-seqs", "2", "--max-chunk-tokens", "32", "--batch-buckets", "1,2"]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(*FLAGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline():
    return LLM(max_model_len=128, max_num_seqs=2, max_chunk_tokens=32, batch_buckets=[1, 2],
               compilation_cache_dir=None, progress=False)


def test_openai_client_completions_and_chat_match_offline(server, offline):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    prompt = "Return a new list containing"
    want = offline.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0]
    r = client.completions.create(model="tropical-default", prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tropical-default", prompt=prompt, max_tokens=16, temperature=0, stream=True) if c.choices)
    assert streamed == want.text

    messages = [{"role": "user", "content": "Tell me a fortune."}]
    ids = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    chat_want = offline.generate(prompt_token_ids=[list(ids)],
                                 sampling_params=SamplingParams(max_tokens=12, temperature=0))[0]
    chat = client.chat.completions.create(model="tropical-default", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == chat_want.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tropical-default", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}) if c.choices]
    assert "".join(pieces) == chat_want.text


def test_stop_strings_cut_the_text(server, offline):
    prompt = "This program is free software; you can redistribute it"
    full = offline.generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0].text
    stop = full.strip().split()[2]
    r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 30, "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert stop not in r["choices"][0]["text"] and full.startswith(r["choices"][0]["text"])


def run_load_client(*args):
    r = subprocess.run([sys.executable, "bench/serve_load.py", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_load_client_against_the_server(server, tmp_path):
    from tropical_jax.sim.workloads import make_requests

    out = run_load_client("--url", server.url, "--workload", "humaneval", "--rate", "20", "--num-requests", "12",
                          "--max-input-len", "60", "--max-output-len", "8", "--out", str(tmp_path / "s.json"))
    assert out == json.loads((tmp_path / "s.json").read_text())
    assert out["num_requests"] == out["completed"] == 12 and out["errors"] == 0
    assert 0 <= out["attainment"] <= 1 and 0 < out["ttft_p50"] <= out["ttft_p99"] and out["tpot_p50"] > 0
    # ignore_eos: every request generated its workload output length.
    want = make_requests("humaneval", 12, 20, seed=0, max_input_len=60, max_output_len=8)
    assert out["mean_completion_tokens"] == pytest.approx(sum(r.max_tokens for r in want) / 12)

    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"input_length": 5 + i, "output_length": 3, "timestamp": 40 * i}) + "\n"
                             for i in range(6)))
    chat = run_load_client("--url", server.url, "--endpoint", "chat", "--workload", str(trace), "--arrival", "trace",
                           "--rate", "25", "--num-requests", "6", "--ttft-slo-ms", "60000", "--tpot-slo-ms", "60000")
    assert chat["completed"] == 6 and chat["mean_completion_tokens"] == 3 and chat["attainment"] == 1.0
