"""Open-loop load client for any OpenAI-compatible server (ours, vLLM, SGLang, ...).

    python -m bench.serve_load --url http://127.0.0.1:8000 --workload humaneval --rate 2 \\
        --num-requests 100 [--arrival poisson|gamma|trace] [--cv 2] [--max-input-len 512] \\
        [--max-output-len 64] [--ttft-slo-ms 2000] [--tpot-slo-ms 100] [--endpoint completions|chat] \\
        [--model NAME] [--api-key KEY] [--out FILE.json]

Workloads and arrivals are the simulator's (tropical_jax.sim.workloads): a named trace or a JSONL
file of {input_length, output_length[, timestamp ms]}. Requests are sent at their arrival times
whatever the server's state (open loop), streaming. Prompts are synthetic text of about the
workload's input length (the server's tokenizer decides the exact count, which `usage` reports).
TTFT and TPOT are measured here, on the client: TTFT to the first chunk carrying text or tokens,
TPOT = (last - first) / (completion tokens - 1) (docs/algorithm.md, Metrics and goodput). A request
that fails (HTTP error, 429 included) counts as a miss. Prints a JSON summary (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

from tropical_jax.sim.workloads import ARRIVALS, make_requests

WORDS = "the of and to in is that for it as with be on not this are by at from or an".split()


def prompt_of(n_tokens: int, rng) -> str:
    # About one token per short common word for BPE tokenizers.
    return " ".join(rng.choice(WORDS, n_tokens))


def request_body(args, model, prompt, max_tokens) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM and this server accept it: outputs get the workload's lengths
    if args.slo_fields:
        body.update(ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms)
    return body


def _has_output(chunk) -> bool:
    if chunk.get("token_ids"):
        return True
    for c in chunk.get("choices") or []:
        if c.get("text") or (c.get("delta") or {}).get("content"):
            return True
    return False


def one_request(url, body, headers, out) -> None:
    start = time.perf_counter()
    first = last = None
    chunks, usage, error = 0, None, None
    try:
        with requests.post(url, json=body, headers=headers, stream=True, timeout=600) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                for line in r.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = f"in-stream error: {chunk['error'].get('message')}"
                        break
                    if _has_output(chunk):
                        last = time.perf_counter()
                        first = first or last
                        chunks += 1
                    usage = chunk.get("usage") or usage
    except (requests.RequestException, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    n_out = (usage or {}).get("completion_tokens") or chunks
    out.update(start=start, ttft=None if first is None else first - start,
               tpot=None if first is None else ((last - first) / (n_out - 1) if n_out > 1 else 0.0),
               n_out=n_out, n_in=(usage or {}).get("prompt_tokens"), error=error)


def summarize(results, ttft_slo: float, tpot_slo: float, duration: float) -> dict:
    ok = [r for r in results if not r["error"] and r["ttft"] is not None]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["n_out"] > 1]
    met = sum(r["ttft"] <= ttft_slo and r["tpot"] <= tpot_slo for r in ok)
    statuses = Counter(r["error"].split(":")[0] for r in results if r["error"])
    ins = [r["n_in"] for r in ok if r["n_in"] is not None]  # servers report it in usage

    def pct(v, q):
        return float(np.percentile(v, q)) if v else None

    return {"num_requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
            "errors_by_kind": dict(statuses), "attainment": met / len(results) if results else None,
            "duration_s": duration, "request_throughput": len(ok) / duration if duration else None,
            "output_tokens_per_s": sum(r["n_out"] for r in ok) / duration if duration else None,
            "mean_prompt_tokens": float(np.mean(ins)) if ins else None,
            "mean_completion_tokens": float(np.mean([r["n_out"] for r in ok])) if ok else None,
            **{f"ttft_p{q}": pct(ttft, q) for q in (50, 90, 99)},
            **{f"tpot_p{q}": pct(tpot, q) for q in (50, 90, 99)},
            "first_errors": [r["error"] for r in results if r["error"]][:3]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (without /v1)")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models)")
    ap.add_argument("--api-key")
    ap.add_argument("--workload", default="humaneval", help="a named trace (see tropical_jax.sim) or a JSONL file")
    ap.add_argument("--rate", type=float, default=1.0, help="mean requests per second")
    ap.add_argument("--num-requests", type=int, default=50)
    ap.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    ap.add_argument("--cv", type=float, default=1.0, help="burstiness of gamma arrivals")
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=64)
    ap.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=100.0)
    ap.add_argument("--no-slo-fields", dest="slo_fields", action="store_false",
                    help="do not send ttft_slo_ms/tpot_slo_ms (for servers that refuse unknown fields)")
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let the model stop at EOS instead of generating the workload's output lengths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    model = a.model or requests.get(a.url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    reqs = make_requests(a.workload, a.num_requests, a.rate, arrival=a.arrival, cv=a.cv, seed=a.seed,
                         max_input_len=a.max_input_len, max_output_len=a.max_output_len)
    url = a.url + ("/v1/chat/completions" if a.endpoint == "chat" else "/v1/completions")
    rng = np.random.default_rng(a.seed)
    bodies = [request_body(a, model, prompt_of(r.prompt_len, rng), r.max_tokens) for r in reqs]
    results = [{} for _ in reqs]
    bar = tqdm(total=len(reqs), desc="requests done", unit="req")
    lock = threading.Lock()

    def run(body, out):
        one_request(url, body, headers, out)
        with lock:
            bar.update()

    threads = []
    t0 = time.perf_counter()
    for r, body, out in zip(reqs, bodies, results):
        time.sleep(max(0.0, t0 + r.arrival - time.perf_counter()))  # open loop: never wait for answers
        t = threading.Thread(target=run, args=(body, out), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    bar.close()
    duration = time.perf_counter() - t0
    summary = {"url": a.url, "endpoint": a.endpoint, "model": model, "workload": a.workload, "rate": a.rate,
               "arrival": a.arrival, "cv": a.cv if a.arrival == "gamma" else None, "seed": a.seed,
               "max_input_len": a.max_input_len, "max_output_len": a.max_output_len,
               "ttft_slo_ms": a.ttft_slo_ms, "tpot_slo_ms": a.tpot_slo_ms, "client": platform.platform(),
               **summarize(results, a.ttft_slo_ms / 1000, a.tpot_slo_ms / 1000, duration)}
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
