"""Scheduler test helpers: requests put on a worker by hand, as if dispatched there earlier."""

from tropical_jax.sched.request import Request

ids = iter(range(10**9))  # submission order (Monitor.seq) of the requests tests put by hand, and request ids


def queued(s, worker, r):
    """Put r in worker's local prefill queue (as if dispatched there earlier)."""
    w = s.workers[worker]
    s.mon.track(r, next(ids))
    if w.role == "M":
        assert w.reserve(r, r.prompt_len + 1)
    w.queue.append(r)
    w.rem[r] = s.mon.remaining_time(w, r)
    s.live += 1
    return r


def decoding(sched, worker, L, slack, now, tpot=0.1, n_out=5, max_tokens=1000):
    """A request in `worker`'s decode batch with `slack` seconds banked at `now`."""
    r = Request(f"d{L}-{slack}", 0.0, L, max_tokens, ttft_slo=100.0, tpot_slo=tpot, output_len=max_tokens)
    r.n_out = n_out
    r.first_token_time = now + slack - tpot * n_out
    r.last_token_time = now
    r.path = "inline"
    w = sched.workers[worker]
    sched.mon.track(r, 10**6 + len(sched.mon.seq))
    assert w.reserve(r, L + n_out - 1)
    w.decoding.append(r)
    sched.live += 1
    return r
