"""`python -m tropical_jax.serve`: the OpenAI-compatible server.

Starts answering at once (/health says "warming_up", generation endpoints 503) while the model
loads and compiles; prints the URL when ready. SIGTERM/SIGINT stop admission (503), let in-flight
requests finish (bounded by --drain-timeout), then exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("tropical_jax.serve")

DEFAULTS = dict(model=None, host="127.0.0.1", port=8000, cluster="1C", policy="colocated", ttft_scale=5.0,
                tpot_slo_ms=100.0, max_model_len=1024, api_key=None, max_queue=256, queue_timeout=None,
                max_num_seqs=32, max_chunk_tokens=256, page_size=16, num_pages=None, dtype="float32",
                attention_backend="reference", threads=32, drain_timeout=60.0, max_body_bytes=4 << 20,
                batch_buckets=None, chunk_buckets=None, served_model_name=None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tropical_jax.serve", description=__doc__.splitlines()[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="JSON file with any of these options (flags win)")
    p.add_argument("--model", help="local HF or orbax checkpoint directory (default: the embedded model)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--cluster", help="worker layout; this build serves one colocated worker ('1C')")
    p.add_argument("--policy", help="dispatch policy; this build serves 'colocated'")
    p.add_argument("--ttft-scale", type=float, help="default TTFT SLO = scale x isolated prefill time")
    p.add_argument("--tpot-slo-ms", type=float)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (also TROPICAL_API_KEY)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 429")
    p.add_argument("--queue-timeout", type=float, help="seconds a request may wait before 429")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-chunk-tokens", type=int)
    p.add_argument("--page-size", type=int)
    p.add_argument("--num-pages", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--attention-backend", choices=["reference", "pallas"])
    p.add_argument("--batch-buckets", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--chunk-buckets", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--threads", type=int, help="HTTP worker threads")
    p.add_argument("--drain-timeout", type=float)
    p.add_argument("--served-model-name")
    args = vars(p.parse_args(argv))
    options = dict(DEFAULTS)
    if "config" in args:
        try:
            file_options = json.loads(Path(args.pop("config")).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"cannot read --config: {e}")
        unknown = set(file_options) - set(DEFAULTS)
        if unknown:
            p.error(f"unknown option(s) in --config: {', '.join(sorted(unknown))}")
        options.update(file_options)
    options.update(args)
    options["api_key"] = options["api_key"] or os.environ.get("TROPICAL_API_KEY")
    if options["cluster"] not in ("1C", "C") or options["policy"] != "colocated":
        p.error("multi-worker clusters and SLO policies are not served yet: use --cluster 1C --policy colocated "
                "(the simulator runs every policy: python -m tropical_jax.sim)")
    return argparse.Namespace(**options)


class Server:
    """What the HTTP layer needs; `client` stays None until warmup is done."""

    def __init__(self, args):
        from .api.metrics import ServerMetrics

        self.args = args
        self.client = None
        self.tokenizer = None
        self.model_name = args.served_model_name or (Path(args.model).name if args.model else "tropical-default")
        self.max_model_len = args.max_model_len
        self.api_key = args.api_key
        self.tpot_slo = args.tpot_slo_ms / 1000.0
        self.metrics = ServerMetrics()
        self.max_body_bytes = args.max_body_bytes
        self.started = int(time.time())
        self._prefill_times: dict[int, float] = {}

    def ttft_slo(self, prompt_len: int) -> float:
        """ttft_scale x the isolated prefill time, measured per chunk bucket at startup."""
        sizes = sorted(self._prefill_times)
        total, left = 0.0, prompt_len
        while left > 0:
            bucket = next((s for s in sizes if s >= left), sizes[-1])
            total += self._prefill_times[bucket]
            left -= bucket
        return self.args.ttft_scale * total

    def load(self):
        from .api.engine_client import EngineClient
        from .llm import LLM

        a = self.args
        llm = LLM(a.model, max_model_len=a.max_model_len, page_size=a.page_size, num_pages=a.num_pages,
                  dtype=a.dtype, attention_backend=a.attention_backend, max_num_seqs=a.max_num_seqs,
                  max_chunk_tokens=a.max_chunk_tokens, batch_buckets=a.batch_buckets, chunk_buckets=a.chunk_buckets)
        self.tokenizer = llm.tokenizer
        for c in llm.executor.chunk_sizes:
            start = time.perf_counter()
            llm.executor._run(c, 0, llm.engine_config.context_pages[0], None, [])
            self._prefill_times[c] = time.perf_counter() - start
        self.client = EngineClient(llm, max_queue=a.max_queue, queue_timeout=a.queue_timeout,
                                   on_finish=self.metrics.finished)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from waitress import create_server

    from .api.app import create_app

    server = Server(args)
    http = create_server(create_app(server), host=args.host, port=args.port, threads=args.threads,
                         channel_request_lookahead=1, ident="tropical_jax")
    url = f"http://{args.host}:{http.effective_port}"

    def warm():
        try:
            server.load()
        except Exception:
            log.exception("model failed to load")
            os._exit(1)
        print(f"tropical_jax serving {server.model_name} at {url}/v1 (ready)", flush=True)

    def drain(signum, _frame):
        if server.client is None:
            os._exit(0)
        server.client.draining = True
        log.info("signal %s: draining %d in-flight request(s)", signum, len(server.client.handles))

        def wait_then_exit():
            deadline = time.monotonic() + args.drain_timeout
            while not server.client.idle() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # let the last responses flush
            log.info("drained; exiting")
            os._exit(0)

        threading.Thread(target=wait_then_exit, daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    print(f"tropical_jax listening on {url} (warming up)", flush=True)
    threading.Thread(target=warm, daemon=True).start()
    http.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
