"""Adapters between the server's engine thread (engine_client.py) and the two engines.

Both offer the same calls, all made on the engine thread except `default_ttft_slo`:
    add(handle, client)        admit a validated request; its tokens go to client.deliver
    abort(request_id, client)  stop it and free its pages
    run_once(client)           make progress (a device step, or a scheduler tick) and report events
    busy() -> bool             more work is ready now (else the loop sleeps up to poll_interval)
    snapshot() -> dict         workers (role, queue, running, KV pages, banked slack), dispatch counts
    recover(client, error)     run_once raised: fail what it involved; returns why the engine cannot
                               serve any more, or None
    default_ttft_slo(prompt_len) -> s   ttft_scale x isolated prefill time (pure Python: HTTP threads)
"""

from __future__ import annotations

import time

from ..runtime.sequence import Sequence

ROLE_NAMES = {"P": "prefill", "M": "multiplexing", "D": "decode", "C": "colocated"}


def _min_slack(decoding, now) -> float | None:
    """DESIGN §3 banked slack, smallest over a decode batch: first + tpot_slo x n_out - now.
    Items: (first_token_time, tpot_slo, n_out)."""
    slacks = [first + tpot * n - now for first, tpot, n in decoding if first is not None]
    return round(min(slacks), 6) if slacks else None


class LocalWorker:
    """The single-worker continuous-batching engine (tropical_jax.runtime.engine), shown as worker C0."""

    poll_interval = 0.25
    MAX_CONSECUTIVE_FAILURES = 3  # then the device state (donated KV pools) is assumed lost

    def __init__(self, engine, prefill_seconds: dict[int, float], ttft_scale: float, queue_timeout: float | None):
        self.engine = engine
        self.prefill_seconds = prefill_seconds  # chunk bucket -> measured isolated step time (s)
        self.ttft_scale = ttft_scale
        self.queue_timeout = queue_timeout
        self.live: dict[str, tuple[Sequence, object]] = {}  # request id -> (sequence, handle)
        self.admitted = 0
        self._abort_pending = False
        self._failures = 0
        self._step_start = time.monotonic()

    def default_ttft_slo(self, prompt_len: int) -> float:
        """The prompt's chunks at their measured bucket times, x ttft_scale."""
        sizes = sorted(self.prefill_seconds)
        total, left = 0.0, prompt_len
        while left > 0:
            bucket = next((s for s in sizes if s >= left), sizes[-1])
            total += self.prefill_seconds[bucket]
            left -= bucket
        return self.ttft_scale * total

    def add(self, handle, client) -> None:
        def on_output(seq, token_ids, text):
            if handle.first_scheduled is None:  # its whole prefill ran in this step
                client.scheduled(handle, self._step_start)
            if token_ids:
                self._failures = 0  # a device step worked
            if seq.finished:
                self.live.pop(seq.request_id, None)
            client.deliver(seq.request_id, token_ids, text, seq.finish_reason)

        seq = self.engine.add_request(handle.prompt_ids, handle.params, request_id=handle.request_id,
                                      on_output=on_output)
        self.live[handle.request_id] = (seq, handle)
        handle.path = "colocated"
        self.admitted += 1

    def abort(self, request_id, client) -> None:
        self.engine.abort(request_id)  # the engine ends it ("abort", pages freed) at its next step
        self._abort_pending = True

    def busy(self) -> bool:
        return self._abort_pending or self.engine.has_work()

    def run_once(self, client) -> None:
        self._expire(client)
        if not self.busy():
            return
        self._abort_pending = False
        self._step_start = time.monotonic()
        self.engine.step()
        for rid in list(client.unscheduled):  # prompts whose first chunks ran in this step
            seq, handle = self.live.get(rid, (None, None))
            if seq is not None and seq.num_cached:
                client.scheduled(handle, self._step_start)

    def _expire(self, client) -> None:
        """queue_timeout: a request whose prefill has not started in time is refused (429)."""
        if self.queue_timeout is None:
            return
        now = time.monotonic()
        for rid in list(client.unscheduled):
            h = client.handles.get(rid)
            if h is not None and now - h.arrival > self.queue_timeout:
                self.abort(rid, client)
                client.end(rid, "queue_timeout")

    def recover(self, client, error) -> str | None:
        e = self.engine
        for seq in list(e.running) + list(e.prefilling):
            self.abort(seq.request_id, client)
            client.end(seq.request_id, "error")
        self._failures += 1
        if self._failures >= self.MAX_CONSECUTIVE_FAILURES:
            return f"{self._failures} engine steps failed in a row (last: {type(error).__name__}: {error})"
        return None

    def snapshot(self) -> dict:
        e, now = self.engine, time.monotonic()
        decoding = []
        for seq in list(e.running):
            _, h = self.live.get(seq.request_id, (None, None))
            if h is not None:
                decoding.append((h.first_token_time, h.tpot_slo, h.n_out))
        return {
            "cluster": "single worker", "policy": "continuous batching", "backend": "local",
            "workers": [{
                "name": "C0", "role": "colocated", "queue": len(e.waiting), "running": e.num_active,
                "kv_pages_used": e.allocator.num_used, "kv_pages_total": e.allocator.num_pages,
                "min_slack_s": _min_slack(decoding, now),
            }],
            "waiting": len(e.waiting),
            "dispatch": {"colocated": self.admitted, "preemptions": e.num_preemptions},
        }


class ClusterWorkers:
    """The multi-worker engine (tropical_jax.cluster.engine): its worker threads run the steps; this
    adapter's loop ticks the scheduler, reports rejections and start times, and cleans up."""

    poll_interval = 0.02

    def __init__(self, cluster):
        self.cluster = cluster
        self.sched = cluster.scheduler
        self.live: dict[str, tuple[object, Sequence]] = {}  # request id -> (sched Request, sequence)
        cluster.start()

    def default_ttft_slo(self, prompt_len: int) -> float:
        return self.sched.cfg.ttft_scale * self.sched.cost.t_prefill(prompt_len)

    def _offset(self) -> float:
        """Scheduler clock -> time.monotonic()."""
        return time.monotonic() - self.cluster.now()

    def add(self, handle, client) -> None:
        rid = handle.request_id

        def on_output(seq, token_ids, text):  # on a worker thread
            r = self.live.get(rid, (None,))[0]
            if r is not None and handle.first_scheduled is None and r.first_scheduled is not None:
                client.scheduled(handle, r.first_scheduled + self._offset())
            if seq.finish_reason is not None and r is not None:
                handle.path = r.path
                handle.transfer = r.transfer_time if r.path == "prefill" and r.n_out >= 1 else None
            client.deliver(rid, token_ids, text, seq.finish_reason)

        seq = Sequence(handle.prompt_ids, handle.params, request_id=rid, on_output=on_output)
        self.live[rid] = (None, seq)
        r = self.cluster.submit(seq, handle.ttft_slo, handle.tpot_slo)
        self.live[rid] = (r, seq)
        if r.rejected:
            client.end(rid, "rejected")

    def abort(self, request_id, client) -> None:
        r, _ = self.live[request_id]
        # The scheduler has no abort: cap the request at the tokens it has, so it ends at its next
        # token and its pages are freed. One still queued runs its prefill first.
        r.max_tokens = max(1, r.n_out)
        client.end(request_id, "abort")

    def busy(self) -> bool:
        return False  # the cluster's own worker threads run the steps

    def run_once(self, client) -> None:
        errors = getattr(self.cluster, "_errors", None)  # a worker thread died (cluster/engine.py)
        if errors:
            raise RuntimeError(f"a cluster worker failed: {errors[0]!r}")
        self.sched.tick(self.cluster.now())
        offset = self._offset()
        timeout = self.sched.cfg.queue_timeout
        for rid, (r, seq) in list(self.live.items()):
            h = client.handles.get(rid)
            if h is not None:
                if r.first_scheduled is not None and h.first_scheduled is None:
                    client.scheduled(h, r.first_scheduled + offset)
                if r.rejected:
                    late = timeout is not None and self.cluster.now() >= r.arrival + timeout
                    client.end(rid, "queue_timeout" if late else "rejected")
                elif r.done and seq.finish_reason is None:
                    client.end(rid, "length")  # the scheduler enforced max_tokens first
            if r.done:
                del self.live[rid]
                # ClusterEngine keeps every Sequence it was given; drop finished ones here so a
                # long-running server does not grow without bound.
                self.cluster.seqs.pop(r, None)

    def recover(self, client, error) -> str:
        for rid in list(client.handles):
            client.end(rid, "error")
        return str(error)

    def snapshot(self) -> dict:
        now = self.cluster.now()
        workers = []
        for name, w in self.sched.workers.items():
            decoding = [(r.first_token_time, r.tpot_slo, r.n_out) for r in list(w.decoding)]
            workers.append({
                "name": name, "role": ROLE_NAMES[w.role], "queue": len(w.queue), "running": len(decoding),
                "incoming": len(w.incoming), "kv_pages_used": w.alloc.num_used,
                "kv_pages_total": w.alloc.num_pages, "min_slack_s": _min_slack(decoding, now),
            })
        return {"cluster": str(self.sched.cluster), "policy": self.sched.cfg.policy,
                "backend": self.cluster.backend, "workers": workers,
                "waiting": len(self.sched.waiting), "dispatch": dict(self.sched.counters),
                "step_time_factors": dict(rec.factors) if (rec := self.sched.recalibrator) else {}}
