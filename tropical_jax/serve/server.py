"""The server: its state for the HTTP layer (Server), its startup, and its lifecycle.

Answers at once (/health says "warming_up", the API 503) while the model loads and its steps
compile (a progress bar on stderr), then prints its URL. The shared SLO-aware scheduler decides
every step under --policy: with no --cluster on one in-process worker (a "1C" cluster, chunked
steps with shedding by default); --cluster (e.g. 1P1M, 2C, 1P1D) runs several workers; --backend ray
makes each of its workers a Ray actor (local Ray, or --ray-address). SIGTERM/SIGINT stop admission
(503), let in-flight requests finish (bounded by --drain-timeout), then exit 0; at the drain timeout
the requests still running get a 503 (or an in-band error event ending their stream) and the
process exits 3 (EXIT_CUT).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from .cli import Options, parse_args

log = logging.getLogger("tropical_jax.serve")
# transformers warns on import that PyTorch is missing: true of the base install, and harmless here
# (the server uses its tokenizers only), but alarming in a server's log.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
EXIT_CUT = 3  # the drain timeout cut requests short (0: drained; 1: failed to start, or a second signal)


class Server:
    """What the HTTP layer needs (see api.app.create_app); `client` stays None until warmup is done."""

    def __init__(self, args: Options):
        from ..api.metrics import ServerMetrics
        from ..api.protocol import Limits

        self.args = args
        self.client = None
        self.engine = None
        self.warmup = "loading the model"
        self.tokenizer = None
        name = args.served_model_name or (Path(args.model).name if args.model else "tropical-default")
        self.limits = Limits(name, args.max_model_len, vocab_size=0)
        self.api_key = args.api_key
        self.metrics = ServerMetrics(state=lambda: self.client.state() if self.client else None)
        self.max_body_bytes = args.max_body_bytes
        self.started = int(time.time())

    def release(self) -> None:
        """Before exit: stop the engine's workers (Ray: its actors, and a Ray this server started)."""
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:
                log.exception("releasing the engine's workers failed")

    def load(self):
        from ..api.engine_client import EngineClient
        from ..api.protocol import prompt_char_limit
        from ..engine.build import build_engine

        a = self.args
        self.warmup = "loading the model, compiling its steps and profiling them"
        self.engine = e = build_engine(a.model, a.engine, a.scheduling)
        log.info("default SLOs: TTFT at least %.0f ms (the queueing floor; a one-token prompt's would be %.1f ms "
                 "without it), TPOT %.0f ms", 1000 * e.ttft_floor, 1000 * e.unfloored_ttft_slo(1),
                 1000 * e.tpot_slo)
        self.tokenizer = e.tokenizer
        self.limits = replace(self.limits, vocab_size=e.vocab_size,
                              max_prompt_chars=prompt_char_limit(e.tokenizer, a.max_model_len))
        self.client = EngineClient(e, max_queue=a.max_queue, on_finish=self.metrics.finished)
        self.warmup = "done"


def main(argv=None) -> int:
    started = time.monotonic()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tropical_jax").setLevel(logging.INFO)  # ours at INFO; libraries' chatter stays out
    args = parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if args.devices_needed > 1 and "xla_force_host_platform_device_count" not in flags:
        # On a CPU host, emulate the devices the workers need; other platforms ignore this flag.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices_needed}".strip()
    from ..cluster.distributed import initialize as init_distributed

    init_distributed(args.jax_distributed)  # before JAX starts its backend
    from ..api.app import create_app
    from ..api.wsgi_server import TrackResponses, make_server
    from ..runtime.map_budget import MappingBudgetError, startup_report

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
