"""Open-loop load client for any OpenAI-compatible server (ours, vLLM, SGLang, ...).

    python bench/serve_load.py --url http://127.0.0.1:8000 --workload humaneval --rate 2 \
        --num-requests 100 [--arrival poisson|gamma|trace] [--cv 2] [--max-input-len 512] \
        [--max-output-len 64] [--ttft-slo-ms 2000] [--tpot-slo-ms 100] [--model NAME] [--out FILE.json]

Requests are sent at their arrival times whatever the server's state (open loop), streaming, with
prompts of the workload's input lengths (synthetic text: the server's tokenizer decides the exact
count, reported back in `usage`). TTFT and TPOT are measured on the client. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time

import numpy as np
import requests
from tqdm import tqdm

from tropical_jax.sim.workloads import ARRIVALS, make_requests

WORDS = "the of and to in is that for it as with be on not this are by at from or an".split()


def prompt_of(n_tokens: int, rng) -> str:
    # About one token per short common word for BPE tokenizers.
    return " ".join(rng.choice(WORDS, n_tokens))


def one_request(url, model, prompt, max_tokens, headers, extra, out):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    times, usage, error = [], None, None
    try:
        with requests.post(url + "/v1/completions", json=body, headers=headers, stream=True, timeout=600) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                for line in r.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk.get("token_ids")):
                        times.append(time.perf_counter())
                    usage = chunk.get("usage") or usage
    except requests.RequestException as e:
        error = str(e)
    out.update(start=start, times=times, usage=usage, error=error)


def summarize(results, ttft_slo, tpot_slo):
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in results if len(r["times"]) > 1]
    ok = 0
    for r in results:
        if r["error"] or not r["times"]:
            continue
        t1 = r["times"][0] - r["start"]
        t2 = (r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) if len(r["times"]) > 1 else 0.0
        ok += t1 <= ttft_slo and t2 <= tpot_slo
    pct = lambda v, q: float(np.percentile(v, q)) if v else None  # noqa: E731
    return {"num_requests": len(results), "errors": sum(bool(r["error"]) for r in results),
            "attainment": ok / len(results), "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90),
            "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p90": pct(tpot, 90), "tpot_p99": pct(tpot, 99),
            "first_errors": [r["error"] for r in results if r["error"]][:3]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models)")
    ap.add_argument("--api-key")
    ap.add_argument("--workload", default="humaneval")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--num-requests", type=int, default=50)
    ap.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=64)
    ap.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    model = a.model or requests.get(a.url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    reqs = make_requests(a.workload, a.num_requests, a.rate, arrival=a.arrival, cv=a.cv, seed=a.seed,
                         max_input_len=a.max_input_len, max_output_len=a.max_output_len)
    rng = np.random.default_rng(a.seed)
    extra = {"ttft_slo_ms": a.ttft_slo_ms, "tpot_slo_ms": a.tpot_slo_ms}
    results = [{} for _ in reqs]
    threads = []
    t0 = time.perf_counter()
    for r, out in tqdm(list(zip(reqs, results)), desc="sending", unit="req"):
        time.sleep(max(0.0, t0 + r.arrival - time.perf_counter()))
        t = threading.Thread(target=one_request, args=(a.url, model, prompt_of(r.prompt_len, rng), r.output_len,
                                                        headers, extra, out), daemon=True)
        t.start()
        threads.append(t)
    for t in tqdm(threads, desc="waiting", unit="req"):
        t.join()
    summary = {"url": a.url, "model": model, "workload": a.workload, "rate": a.rate, "arrival": a.arrival,
               "max_input_len": a.max_input_len, "max_output_len": a.max_output_len, "client": platform.platform(),
               "ttft_slo_ms": a.ttft_slo_ms, "tpot_slo_ms": a.tpot_slo_ms,
               **summarize(results, a.ttft_slo_ms / 1000, a.tpot_slo_ms / 1000)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
