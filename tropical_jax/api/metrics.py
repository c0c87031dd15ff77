"""Prometheus metrics of the server (its own registry, so tests can run several apps).

Per-request latencies are histograms observed when a request finishes. Engine state (per-worker
gauges, dispatch counts) is read at scrape time from the engine thread's latest snapshot, so a
scrape never touches the engine and a multi-worker cluster fills the same families, one label set
per worker.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Finish reasons that count as a refusal (the request never got a first token by design).
REJECTED = ("queue_timeout", "rejected", "queue_full")
# Finish reasons of a request that started but did not run to its end.
_CUT = ("abort", "error", "shutdown")


class _EngineState:
    """Collector over `state()` (the engine thread's snapshot, or None while warming up)."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        st = self.state() or {"workers": [], "dispatch": {}}
        labels = ["worker", "role"]
        families = {field: GaugeMetricFamily(name, doc, labels=labels) for field, name, doc in (
            ("queue", "tropical_worker_queue", "Prefills assigned to the worker, not finished"),
            ("running", "tropical_worker_running", "Requests decoding on the worker"),
            ("kv_pages_used", "tropical_worker_kv_pages_used", "KV cache pages in use"),
            ("kv_pages_total", "tropical_worker_kv_pages_total", "KV cache pages"),
            ("min_slack_s", "tropical_worker_min_slack_seconds",
             "Smallest banked TPOT slack in the decode batch (first token time + TPOT SLO x tokens - now)"),
        )}
        role = GaugeMetricFamily("tropical_worker_info", "Worker roles (value 1)", labels=labels)
        for w in st["workers"]:
            key = [w["name"], w["role"]]
            role.add_metric(key, 1)
            for field, fam in families.items():
                if w.get(field) is not None:
                    fam.add_metric(key, w[field])
        yield role
        yield from families.values()
        yield GaugeMetricFamily("tropical_dispatcher_waiting", "Requests not yet placed on a worker",
                                value=st.get("waiting", 0))
        yield GaugeMetricFamily("tropical_requests_in_flight", "Requests admitted and not finished",
                                value=st.get("in_flight", 0))
        dispatch = CounterMetricFamily("tropical_dispatch", "Scheduler decisions by path (prefill, inline, "
                                       "colocated, waited, rejected, late, transfers, recomputes, preemptions)",
                                       labels=["path"])
        for path, n in sorted(st["dispatch"].items()):
            dispatch.add_metric([path], n)
        yield dispatch
        factors = GaugeMetricFamily("tropical_step_time_factor", "Real / profiled step time the scheduler plans "
                                    "with, by kind of step (running recalibration; absent when it is off)",
                                    labels=["kind"])
        for kind, f in sorted(st.get("step_time_factors", {}).items()):
            factors.add_metric([kind], f)
        yield factors


class ServerMetrics:
    def __init__(self, state=lambda: None):
        r = self.registry = CollectorRegistry()

        def hist(name, doc):
            return Histogram(name, doc, registry=r, buckets=_LATENCY_BUCKETS)

        self.ttft = hist("tropical_ttft_seconds", "Time to first token")
        self.tpot = hist("tropical_tpot_seconds", "Time per output token after the first")
        self.queueing = hist("tropical_queueing_seconds", "Arrival to the first scheduled prefill step")
        self.transfer = hist("tropical_kv_transfer_seconds", "KV handoff time, prefill worker to decode worker")
        self.requests = Counter("tropical_requests", "Finished requests by outcome (attained/missed the SLO, "
                                "rejected, abort, error, shutdown: cut by a drain timeout)", ["outcome"], registry=r)
        self.tokens = Counter("tropical_generated_tokens", "Generated tokens", registry=r)
        for outcome in ("attained", "missed", "rejected", *_CUT):
            self.requests.labels(outcome)  # export zeros, so rates work from the first scrape
        r.register(_EngineState(state))

    def finished(self, handle, reason: str) -> None:
        self.tokens.inc(handle.n_out)
        if reason in REJECTED:
            self.requests.labels("rejected").inc()
            return
        if handle.queueing is not None:
            self.queueing.observe(handle.queueing)
        if handle.transfer is not None:
            self.transfer.observe(handle.transfer)
        if reason in _CUT:
            self.requests.labels(reason).inc()
            return
        if handle.ttft is not None:
            self.ttft.observe(handle.ttft)
            if handle.n_out > 1:
                self.tpot.observe(handle.tpot)
        self.requests.labels("attained" if handle.slo_met else "missed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
