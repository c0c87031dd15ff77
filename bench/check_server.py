"""Part 5 of the accelerator check: `python -m tropical_jax.serve --cluster` on this machine's devices, a
burst through the official openai client, and /metrics.

Layout: tropical_jax.cluster.layout's default for the devices JAX sees. A cluster's workers each own their
own devices (cluster/workers.carve_devices), so two workers cannot share one GPU or TPU chip: with a
single device the layout is one colocated worker (1C), which still runs the cluster engine, its
scheduler and its metrics. On a CPU host the server emulates the devices a layout needs, so there it
runs two workers (1P1M). The scheduler's cost model is given (PROFILE): this part checks the plumbing
on the devices; `python -m tropical_jax.profile` measures a real one.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.check_engine import SERVER_MODEL, checkpoint
from bench.check_parts import MODELS

from bench.server_process import ServerProcess

# A plausible cost model (ms) for a small model: the scheduler needs one to place requests.
PROFILE = {"units": "ms", "prefill": {"c2": 0.0, "c1": 0.02, "c0": 5.0}, "decode": {"d0": 5.0, "d1": 0.1, "d2": 0.0},
           "kv_bytes_per_token": 4096, "transfer": {"bandwidth_GBps": 10.0, "latency_ms": 1.0}}
ENGINE_FLAGS = ["--dtype", "bfloat16", "--max-model-len", "512", "--context-buckets", "512", "--page-size", "16",
                "--max-num-seqs", "8", "--batch-buckets", "8", "--max-chunk-tokens", "64", "--chunk-buckets", "64",
                "--compilation-cache-dir", ""]
BURST, NEW_TOKENS = 12, 16
# SLOs no request can miss: the burst checks the path through the server, not the scheduler's admission.
LOOSE_SLO = {"ttft_slo_ms": 600_000, "tpot_slo_ms": 60_000}


def layout(platform: str, num_devices: int) -> tuple[str, str]:
    """(cluster string, why)."""
    if platform not in ("gpu", "tpu"):
        return "1P1M", "CPU host: the server emulates the two devices a prefill and a multiplexing worker need"
    from tropical_jax.cluster.layout import choose_layout

    cluster = choose_layout(num_devices, platform=platform)
    why = "the default layout for these devices (tropical_jax.cluster.layout)"
    if num_devices == 1:
        why = ("one device: a cluster's workers each need their own device (cluster/workers.carve_devices), so "
               "two cannot share it; one colocated worker runs the cluster path instead")
    return cluster, why


def run(settings: dict, record) -> None:
    import openai

    from bench.accelerators import device_info

    info = device_info()
    cluster, why = layout(info["platform"], info["num_devices"])
    record["layout"] = {"cluster": cluster, "why": why, "devices": info["num_devices"]}
    profile = Path(settings["work_dir"]) / "server_profile.json"
    profile.write_text(json.dumps(PROFILE))
    backend = "pallas" if info["platform"] in ("gpu", "tpu") else "reference"
    model = checkpoint(settings, SERVER_MODEL["smoke" if settings["smoke"] else "full"])
    start = time.perf_counter()
    server = ServerProcess("--model", str(model), "--cluster", cluster, "--profile", str(profile),
                           "--attention-backend", backend, *ENGINE_FLAGS, timeout=settings["limit_s"])
    try:
        record["startup"] = {"seconds": round(time.perf_counter() - start, 1), "attention_backend": backend,
                             "model": model.name}
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        vocab = MODELS[model.name]["vocab_size"]
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(4, 200, BURST)]

        def one(i):
            t0 = time.perf_counter()
            if i % 4 == 0:  # some streamed
                chunks = list(client.completions.create(model=name, prompt=prompts[i], max_tokens=NEW_TOKENS,
                                                        temperature=0, stream=True, extra_body=LOOSE_SLO,
                                                        stream_options={"include_usage": True}))
                usage = chunks[-1].usage
            else:
                usage = client.completions.create(model=name, prompt=prompts[i], max_tokens=NEW_TOKENS,
                                                  temperature=0, extra_body=LOOSE_SLO).usage
            return usage.completion_tokens, time.perf_counter() - t0

        start = time.perf_counter()
        with ThreadPoolExecutor(BURST) as pool:
            done = list(pool.map(one, range(BURST)))
        tokens = [n for n, _ in done]
        record["burst"] = {"requests": BURST, "completion_tokens": tokens,
                           "seconds": round(time.perf_counter() - start, 2),
                           "latency_s_max": round(max(s for _, s in done), 2)}
        if tokens != [NEW_TOKENS] * BURST:
            record.fail(f"expected {NEW_TOKENS} completion tokens per request, got {tokens}")
        record["metrics"] = check_metrics(server.get("/metrics").text, server.get("/v1/cluster").json(), record)
    finally:
        server.stop()


def check_metrics(text: str, state: dict, record) -> dict:
    """Every worker named in /metrics, and the burst's tokens and requests counted."""
    workers = [w["name"] for w in state["workers"]]
    missing = [w for w in workers if f'worker="{w}"' not in text]
    if missing:
        record.fail(f"/metrics names no series for worker(s) {missing}")

    def total(metric):
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(metric + "{")
                   or line.startswith(metric + " "))

    counted = {"generated_tokens": total("tropical_generated_tokens_total"),
               "finished_requests": total("tropical_requests_total")}
    if counted["generated_tokens"] < BURST * NEW_TOKENS or counted["finished_requests"] < BURST:
        record.fail(f"/metrics counted {counted} for {BURST} requests of {NEW_TOKENS} tokens")
    return {"workers": workers, "cluster": state.get("cluster"), "policy": state.get("policy"), **counted}
