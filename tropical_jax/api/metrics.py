"""Prometheus metrics of the server (its own registry, so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("tropical_ttft_seconds", "Time to first token", registry=r, buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("tropical_tpot_seconds", "Time per output token after the first", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.queueing = Histogram("tropical_queueing_seconds", "Arrival to first scheduled step", registry=r,
                                  buckets=_LATENCY_BUCKETS)
        self.transfer = Histogram("tropical_kv_transfer_seconds", "KV handoff time (multi-worker clusters)",
                                  registry=r, buckets=_LATENCY_BUCKETS)
        self.requests = Counter("tropical_requests", "Finished requests by SLO outcome", ["outcome"], registry=r)
        self.dispatch = Counter("tropical_dispatch", "Dispatch decisions by path", ["path"], registry=r)
        self.tokens = Counter("tropical_generated_tokens", "Generated tokens", registry=r)
        labels = ["worker", "role"]
        self.queue = Gauge("tropical_worker_queue", "Requests waiting", labels, registry=r)
        self.running = Gauge("tropical_worker_running", "Requests running", labels, registry=r)
        self.pages = Gauge("tropical_worker_kv_pages_used", "KV pages in use", labels, registry=r)
        self.slack = Gauge("tropical_worker_min_slack_seconds", "Smallest banked TPOT slack", labels, registry=r)

    def finished(self, handle, reason: str) -> None:
        if reason in ("queue_timeout", "rejected"):
            self.requests.labels("rejected").inc()
            return
        if reason in ("abort", "error"):
            self.requests.labels(reason).inc()
            return
        if handle.ttft is not None:
            self.ttft.observe(handle.ttft)
            if handle.n_out > 1:
                self.tpot.observe(handle.tpot)
        self.tokens.inc(handle.n_out)
        self.requests.labels("attained" if handle.slo_met else "missed").inc()

    def render(self, state: dict) -> bytes:
        for w in state["workers"]:
            key = (w["name"], w["role"])
            self.queue.labels(*key).set(w["queue"])
            self.running.labels(*key).set(w["running"])
            self.pages.labels(*key).set(w["kv_pages_used"])
        return generate_latest(self.registry)
