"""`python -m tropical_jax.serve`: the OpenAI-compatible server.

Answers at once (/health says "warming_up", the API 503) while the model loads and its steps
compile (a progress bar on stderr), then prints its URL. With no --cluster, one in-process worker
runs continuous batching; --cluster (e.g. 1P1M, 2C, 1P1D) runs the multi-worker engine under the
shared scheduler and --policy; --backend ray makes each of its workers a Ray actor (local Ray, or
--ray-address). SIGTERM/SIGINT stop admission (503), let in-flight requests finish
(bounded by --drain-timeout), then exit 0; at the drain timeout the requests still running get a
503 (or an in-band error event ending their stream) and the process exits 3 (EXIT_CUT).
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
import tomllib
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("tropical_jax.serve")
# transformers warns on import that PyTorch is missing: true of the base install, and harmless here
# (the server uses its tokenizers only), but alarming in a server's log.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
EXIT_CUT = 3  # the drain timeout cut requests short (0: drained; 1: failed to start, or a second signal)

DEFAULTS = dict(model=None, host="127.0.0.1", port=8000, cluster=None, policy=None, profile=None, ttft_scale=5.0,
                tpot_slo_ms=100.0, max_model_len=1024, api_key=None, api_key_file=None, max_queue=256,
                queue_timeout=None,
                max_num_seqs=32, max_chunk_tokens=256, max_prefill_seqs=8, page_size=16, num_pages=None, dtype="float32",
                attention_backend="reference", batch_buckets=None, chunk_buckets=None, context_buckets=None,
                compilation_cache_dir="~/.cache/tropical_jax/xla", tensor_parallel=1, threads=None, drain_timeout=60.0,
                max_body_bytes=4 << 20, served_model_name=None, backend="local", ray_address=None,
                jax_distributed="off", request_read_timeout=30.0)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _positive(kind):
    def check(text):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tropical_jax.serve", description=__doc__.splitlines()[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a JSON or TOML (.toml) file with any of these options, named with - or _ "
                                    "(flags win over the file)")
    p.add_argument("--model", help="local HF safetensors or orbax checkpoint directory (default: the embedded model)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000; 0 picks a free port")
    g = p.add_argument_group("scheduling")
    g.add_argument("--cluster", help="worker layout, e.g. 1P1M, 2C, 1P1D, 'P:tp2,M:tp2' (default: one in-process "
                                     "worker with continuous batching)")
    g.add_argument("--policy", help="tropical, planned, colocated, chunked or disaggregated, with knobs after a "
                                    "colon ('tropical:prefer=multiplex'); default from the cluster's roles: planned "
                                    "for P+M, colocated for C, disaggregated for P+D")
    g.add_argument("--profile", help="cost-model JSON for the scheduler (python -m tropical_jax.profile); "
                                     "default: measured at startup")
    g.add_argument("--backend", choices=["local", "ray"], help="where the cluster's workers run: local (threads in "
                                                               "this process, the default) or ray (one Ray actor each)")
    g.add_argument("--ray-address", help="Ray cluster to join with --backend ray (default: $RAY_ADDRESS, else start "
                                         "a local Ray)")
    g.add_argument("--ttft-scale", type=_positive(float), help="the default TTFT SLO (for requests that send no "
                   "ttft_slo_ms) is scale x the prompt's isolated prefill time, and at least a queueing allowance: "
                   "scale x the time to prefill a full decode batch of prompts (ceil(max-num-seqs / "
                   "max-prefill-seqs) full chunks of max-chunk-tokens), so a burst of short prompts can meet it (5)")
    g.add_argument("--tpot-slo-ms", type=_positive(float), help="default TPOT SLO (100)")
    g.add_argument("--max-queue", type=_positive(int), help="requests waiting for their prefill before 429 (256)")
    g.add_argument("--queue-timeout", type=_positive(float), help="seconds a request may wait for its prefill "
                                                                 "before 429 (default: no limit)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-model-len", type=_positive(int), help="context length, prompt plus output (1024)")
    e.add_argument("--max-num-seqs", type=_positive(int), help="largest decode batch per worker (32)")
    e.add_argument("--max-chunk-tokens", type=_positive(int), help="largest prefill chunk (256)")
    e.add_argument("--max-prefill-seqs", type=_positive(int), help="prompts one prefill chunk may pack (8)")
    e.add_argument("--page-size", type=_positive(int), help="tokens per KV page (16)")
    e.add_argument("--num-pages", type=_positive(int), help="KV pages per worker (default: max-num-seqs full contexts)")
    e.add_argument("--tensor-parallel", type=_positive(int), help="devices of the single worker (clusters say it "
                                                                  "per worker: 'P:tp2,M:tp2')")
    e.add_argument("--dtype", choices=["float32", "bfloat16"])
    e.add_argument("--attention-backend", choices=["reference", "pallas"])
    e.add_argument("--batch-buckets", type=_sizes, help="decode batch buckets, e.g. 1,8,32 (fewer: faster warmup)")
    e.add_argument("--chunk-buckets", type=_sizes, help="prefill chunk buckets, e.g. 16,64,256")
    e.add_argument("--context-buckets", type=_sizes, help="context buckets in tokens")
    e.add_argument("--compilation-cache-dir", help="persistent XLA cache ('' disables)")
    e.add_argument("--jax-distributed", choices=["off", "host", "slice"],
                   help="off (default); host: on a multi-host TPU slice use only this host's chips; slice: "
                        "jax.distributed.initialize() (see tropical_jax/cluster/distributed.py)")
    h = p.add_argument_group("http")
    h.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*; visible to `ps`: prefer "
                                     "--api-key-file or $TROPICAL_API_KEY")
    h.add_argument("--api-key-file", help="read the API key from this file (its first line)")
    h.add_argument("--threads", type=_positive(int), help="HTTP threads (default: enough for every running "
                                                          "and queued request)")
    h.add_argument("--drain-timeout", type=_positive(float), help="seconds SIGTERM waits for in-flight requests; "
                   "then those left get a 503 (streams: an error event and [DONE]) and the exit status is 3 (60)")
    h.add_argument("--max-body-bytes", type=_positive(int), help="larger request bodies get 413 (4 MiB)")
    h.add_argument("--request-read-timeout", type=_positive(float), help="seconds a client may take to send its "
                                                                        "request, headers and body; slower "
                                                                        "connections are closed (30)")
    return p


def _file_argv(path: str, parser) -> list[str]:
    """The config file as flags, so it gets exactly the command line's checks and messages."""
    try:
        text = Path(path).read_text()
        options = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (OSError, ValueError) as e:
        parser.error(f"cannot read --config {path}: {e}")
    if not isinstance(options, dict):
        parser.error(f"--config {path}: expected a table/object of options")
    argv = []
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in DEFAULTS or name == "config":
            parser.error(f"--config {path}: unknown option {key!r}")
        if value is None:
            continue
        argv += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def _key_from_file(path: str | None, parser) -> str | None:
    if path is None:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        parser.error(f"cannot read --api-key-file {path}: {e.strerror}")
    if not lines or not lines[0].strip():
        parser.error(f"--api-key-file {path} is empty")
    return lines[0].strip()


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    options = dict(DEFAULTS)
    if "config" in flags:
        options.update(vars(parser.parse_args(_file_argv(flags.pop("config"), parser))))
    options.update(flags)
    options["api_key"] = options["api_key"] or _key_from_file(options["api_key_file"], parser) \
        or os.environ.get("TROPICAL_API_KEY")
    a = argparse.Namespace(**options)
    workers, a.devices_needed = 1, a.tensor_parallel
    if a.cluster is None and (a.policy is not None or a.profile is not None):
        parser.error("--policy and --profile need --cluster (the single worker runs plain continuous batching)")
    if a.backend == "ray" and a.cluster is None:
        parser.error("--backend ray runs a cluster's workers as Ray actors: give --cluster (e.g. 1P1M)")
    if a.ray_address is not None and a.backend != "ray":
        parser.error("--ray-address needs --backend ray")
    if a.cluster is not None and a.tensor_parallel != 1:
        parser.error("--tensor-parallel is for the single worker; give clusters tp per worker ('P:tp2,M:tp2')")
    if a.cluster is not None:
        from .sched.config import PolicyConfig, default_policy, parse_cluster

        try:
            spec = parse_cluster(a.cluster)
            text = a.policy or default_policy(a.cluster)
            policy = PolicyConfig.parse(text)
            # --ttft-scale / --queue-timeout set those knobs unless the policy string names them.
            if "ttft_scale=" not in text:
                policy = replace(policy, ttft_scale=a.ttft_scale)
            if "queue_timeout=" not in text:
                policy = replace(policy, queue_timeout=a.queue_timeout)
            policy.check_cluster(spec)
        except ValueError as e:
            parser.error(str(e))
        a.policy, workers = policy, len(spec.workers)
        # Ray actors get their own devices (cluster/ray_backend.py); only local workers share ours.
        a.devices_needed = sum(w.tp for w in spec.workers) if a.backend == "local" else 1
    if a.threads is None:
        # A thread per running or queued request, so overload is answered with 429 instead of
        # waiting unseen in the socket backlog.
        a.threads = min(1024, workers * a.max_num_seqs + a.max_queue + 16)
    return a


class Server:
    """What the HTTP layer needs (see api.app.create_app); `client` stays None until warmup is done."""

    def __init__(self, args):
        from .api.metrics import ServerMetrics
        from .api.protocol import Limits

        self.args = args
        self.client = None
        self.backend = None
        self.warmup = "loading the model"
        self.tokenizer = None
        name = args.served_model_name or (Path(args.model).name if args.model else "tropical-default")
        self.limits = Limits(name, args.max_model_len, vocab_size=0)
        self.api_key = args.api_key
        self.tpot_slo = args.tpot_slo_ms / 1000.0
        self.ttft_floor = 0.0  # seconds, set by load()
        self.metrics = ServerMetrics(state=lambda: self.client.state() if self.client else None)
        self.max_body_bytes = args.max_body_bytes
        self.started = int(time.time())

    def default_ttft_slo(self, prompt_len: int) -> float:
        return max(self.backend.default_ttft_slo(prompt_len), self.ttft_floor)

    def release(self) -> None:
        """Before exit: stop a cluster's workers (Ray: its actors, and a Ray this server started)."""
        cluster = getattr(self.backend, "cluster", None)
        if cluster is not None:
            try:
                cluster.close()
            except Exception:
                log.exception("releasing the cluster's workers failed")

    def load(self):
        from .api.backends import ClusterWorkers, LocalWorker
        from .api.engine_client import EngineClient
        from .api.protocol import prompt_char_limit
        from .llm import LLM

        a = self.args
        engine = dict(max_model_len=a.max_model_len, page_size=a.page_size, num_pages=a.num_pages, dtype=a.dtype,
                      attention_backend=a.attention_backend, max_num_seqs=a.max_num_seqs,
                      max_chunk_tokens=a.max_chunk_tokens, max_prefill_seqs=a.max_prefill_seqs,
                      batch_buckets=a.batch_buckets,
                      chunk_buckets=a.chunk_buckets, context_buckets=a.context_buckets,
                      compilation_cache_dir=a.compilation_cache_dir or None)
        self.warmup = "loading the model and compiling its steps"
        if a.cluster is not None:
            llm = LLM(a.model, cluster=a.cluster, policy=a.policy, profile=a.profile, backend=a.backend,
                      ray_address=a.ray_address, **engine)
            self.backend = ClusterWorkers(llm.cluster)
        else:
            llm = LLM(a.model, tensor_parallel=a.tensor_parallel, **engine)
            self.warmup = "measuring prefill times"
            self.backend = LocalWorker(llm.engine, measure_prefill(llm.executor), a.ttft_scale, a.queue_timeout)
        # The queueing allowance: a request may wait while a full decode batch of prompts ahead of
        # it is prefilled, max_prefill_seqs to a chunk.
        full_chunks = -(-a.max_num_seqs // a.max_prefill_seqs)
        self.ttft_floor = full_chunks * self.backend.default_ttft_slo(a.max_chunk_tokens)
        log.info("default SLOs: TTFT at least %.0f ms (the queueing floor; a one-token prompt's would be %.1f ms "
                 "without it), TPOT %.0f ms", 1000 * self.ttft_floor, 1000 * self.backend.default_ttft_slo(1),
                 1000 * self.tpot_slo)
        self.tokenizer = llm.tokenizer
        self.limits = replace(self.limits, vocab_size=llm.model_config.vocab_size,
                              max_prompt_chars=prompt_char_limit(llm.tokenizer, a.max_model_len))
        self.client = EngineClient(self.backend, max_queue=a.max_queue, on_finish=self.metrics.finished)
        self.warmup = "done"


def measure_prefill(executor) -> dict[int, float]:
    """Isolated step time of each chunk bucket (best of 3, after warmup): the default TTFT SLO's base.
    Times each shape full, as cluster/profile.py does."""
    times = {}
    for c in executor.chunk_sizes:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            executor.time_step(c, 0, executor.cfg.context_pages[0])
            best = min(best, time.perf_counter() - start)
        times[c] = best
    return times


def main(argv=None) -> int:
    started = time.monotonic()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tropical_jax").setLevel(logging.INFO)  # ours at INFO; libraries' chatter stays out
    args = parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if args.devices_needed > 1 and "xla_force_host_platform_device_count" not in flags:
        # On a CPU host, emulate the devices the workers need; other platforms ignore this flag.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices_needed}".strip()
    from .cluster.distributed import initialize as init_distributed

    init_distributed(args.jax_distributed)  # before JAX starts its backend
    from .api.app import create_app
    from .api.wsgi_server import TrackResponses, make_server
    from .runtime.map_budget import MappingBudgetError, startup_report

    server = Server(args)
    wsgi = TrackResponses(create_app(server))
    http = make_server(wsgi, host=args.host, port=args.port, threads=args.threads,
                       max_body_bytes=args.max_body_bytes, read_timeout=args.request_read_timeout)
    url = f"http://{args.host}:{http.effective_port}"

    def warm():
        try:
            server.load()
        except MappingBudgetError as e:
            log.error("%s", e)
            os._exit(2)
        except Exception:
            log.exception("the model failed to load")
            os._exit(1)
        log.info(startup_report(time.monotonic() - started))
        print(f"tropical_jax serving {server.limits.model_name} at {url}/v1 (ready)", flush=True)

    signals = []

    def drain(signum, _frame):
        signals.append(signum)
        if server.client is None or len(signals) > 1:
            log.info("signal %s: exiting now", signum)
            os._exit(0 if server.client is None else 1)
        server.client.draining = True
        log.info("signal %s: draining %d in-flight request(s)", signum, len(server.client.handles))

        def wait_then_exit():
            def wait(seconds):
                deadline = time.monotonic() + seconds
                while (not server.client.idle() or wsgi.active) and time.monotonic() < deadline:
                    time.sleep(0.05)

            wait(args.drain_timeout)
            left = list(server.client.handles)
            for rid in left:  # each client gets a 503, or an error event and [DONE] ending its stream
                server.client.abort(rid, "shutdown")
            if left:
                wait(5.0)
            time.sleep(0.2)  # the last bytes leave waitress's buffers
            if left:
                log.warning("drain timeout: cut %d unfinished request(s) short; exiting with status %d",
                            len(left), EXIT_CUT)
            else:
                log.info("drained; exiting")
            server.release()
            os._exit(EXIT_CUT if left else 0)

        threading.Thread(target=wait_then_exit, daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    print(f"tropical_jax listening on {url} (warming up)", flush=True)
    threading.Thread(target=warm, daemon=True).start()
    http.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
