"""The simulator core: invariants over randomized runs of every policy, determinism, and an M/D/1 check."""

import math
import random

import pytest

from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.request import Request
from tropical_jax.sim.simulator import simulate

# InternLM2.5-20B TP2-like numbers (ms), small enough KV capacity that memory pressure happens.
PROFILE = {"units": "ms", "prefill": {"c2": 1.8e-6, "c1": 0.095, "c0": 19.0},
           "decode": {"d0": 22.0, "d1": 0.16, "d2": 5e-5}, "kv_bytes_per_token": 196608,
           "transfer": {"bandwidth_GBps": 25.0, "latency_ms": 2.0}}
COST = CostModel.from_json(PROFILE)

POLICIES = [
    ("tropical", "1P1M"), ("tropical:prefer=multiplex,queue_order=edf", "2P2M"),
    ("tropical:queue_timeout=3,max_multiplex_tokens=none", "1P2M"),
    ("planned", "1P1M"), ("planned:shed=false", "2P2M"), ("chunked:shed=true", "2C"),
    ("colocated", "2C"), ("colocated:token_budget=2048,queue_order=fcfs", "1C"),
    ("chunked:token_budget=512", "2C"), ("disaggregated", "1P1D"), ("disaggregated:queue_order=fcfs", "2P1D"),
    # Packed prefills (several prompts a step):
    ("planned:max_prefill_seqs=4", "2P2M"), ("chunked:token_budget=2048,max_prefill_seqs=4", "2C"),
    ("colocated:token_budget=4096,max_prefill_seqs=4", "1C"), ("disaggregated:max_prefill_seqs=4,max_pack_pages=300", "1P1D"),
]


def workload(n, rate, seed, max_len=12_000, mean_out=60, slo_scale=None):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        L = min(max_len, int(rng.lognormvariate(math.log(1500), 1.0)) + 1)
        o = max(1, int(rng.expovariate(1 / mean_out)))
        out.append(Request(i, t, L, o + rng.randint(0, 3), None if slo_scale is None else slo_scale, 0.1, o))
    return out


class Checker:
    """Observer asserting, as the run goes, that no request is in two steps at once, that decodes
    run only on the request's decode worker, that the clock never goes back, and that every
    worker's pages are exactly those of its block tables."""

    def __init__(self):
        self.active = {}
        self.last = -math.inf
        self.sched = None
        self.steps = 0

    def __call__(self, event, now, *payload):
        assert now >= self.last
        self.last = now
        if event == "start":
            (self.sched,) = payload
        elif event == "step_start":
            worker, plan = payload
            rs = list(plan.decodes) + [c.request for c in plan.chunks]
            for r in rs:
                assert id(r) not in self.active, f"request {r.id} on {worker} and {self.active[id(r)]}"
                self.active[id(r)] = worker
            for r in plan.decodes:
                assert r.decode_worker == worker and r.first_token_time is not None
            for c in plan.chunks:
                assert worker == (c.request.decode_worker if c.recompute else c.request.prefill_worker)
        elif event == "step_end":
            worker, plan = payload
            for r in list(plan.decodes) + [c.request for c in plan.chunks]:
                assert self.active.pop(id(r)) == worker
            self.steps += 1
            if self.steps % 97 == 0:
                for w in self.sched.workers.values():
                    assert w.alloc.num_used == sum(len(t.pages) for t in w.tables.values())


def _outcome(res):
    return [(r.id, r.first_scheduled, r.first_token_time, r.finish_time, r.n_out, r.rejected, r.path,
             r.prefill_worker, r.decode_worker) for r in res.requests]


@pytest.mark.parametrize("i", range(len(POLICIES)))
def test_invariants_randomized(i):
    policy, cluster = POLICIES[i]
    reqs = workload(250, rate=3.0, seed=i)
    chk = Checker()
    # Small KV memory (preemptions happen), noisy steps, some failed transfers.
    kw = dict(noise=0.2, seed=3, kv_capacity_tokens=60_000, transfer_failure_rate=0.1)
    res = simulate(reqs, cluster, policy, COST, observer=chk, **kw)
    assert not chk.active
    for r, src in zip(res.requests, reqs):
        assert r.id == src.id and src.first_token_time is None  # inputs untouched
        assert r.rejected != (r.finish_time is not None)
        if r.rejected:
            assert r.path == "rejected" and r.n_out == 0
            continue
        assert r.n_out == min(r.output_len, r.max_tokens)
        assert r.arrival <= r.first_scheduled <= r.first_token_time <= r.last_token_time == r.finish_time
        assert r.ttft_slo > 0 and r.tpot is not None
    for w in res.scheduler.workers.values():
        assert w.alloc.num_free == w.alloc.num_pages and not w.tables
        assert not (w.queue or w.decoding or w.incoming or w.handoff or w.busy)
    c = res.counters
    assert c.get("rejected", 0) == sum(r.rejected for r in res.requests)
    if "disaggregated" in policy or "tropical" in policy or "planned" in policy:
        assert c.get("transfer_failures", 0) > 0 and c["transfers"] == sum(r.path == "prefill" and r.n_out > 1 for r in res.requests)
    if "queue_timeout" in policy:
        assert c.get("rejected", 0) > 0
    again = simulate(reqs, cluster, policy, COST, **kw)
    assert _outcome(again) == _outcome(res)
    other = simulate(reqs, cluster, policy, COST, **{**kw, "seed": 4})
    assert _outcome(other) != _outcome(res)


def test_preemption_under_memory_pressure_keeps_outputs_exact():
    reqs = workload(200, rate=4.0, seed=7, max_len=4000, mean_out=1000)
    res = simulate(reqs, "1C", "chunked", COST, kv_capacity_tokens=20_000)
    assert res.counters.get("preemptions", 0) > 0 and sum(r.recomputed for r in res.requests) > 0
    assert all(r.n_out == min(r.output_len, r.max_tokens) for r in res.requests)
    assert all(w.alloc.num_free == w.alloc.num_pages for w in res.scheduler.workers.values())


def test_tropical_inlines_and_beats_colocated_tpot():
    reqs = workload(400, rate=2.5, seed=1)
    trop = simulate(reqs, "1P1M", "tropical", COST, kv_capacity_tokens=400_000)
    col = simulate(reqs, "2C", "colocated", COST, kv_capacity_tokens=400_000)
    assert trop.counters["inline"] > 0 and trop.counters["prefill"] > 0
    p90 = lambda res: sorted(r.tpot for r in res.requests)[int(0.9 * len(res.requests))]
    assert p90(trop) < p90(col)
    # A decode on an M worker never falls behind because of an inline plan: TPOT within SLO for most.
    assert sum(r.tpot <= r.tpot_slo for r in trop.requests) >= 0.95 * len(reqs)


@pytest.mark.slow
def test_md1_mean_queueing():
    """One colocated worker, constant service D, no decode tokens, Poisson arrivals (rho = 0.5):
    mean queueing must match M/D/1, Wq = rho * D / (2 (1 - rho)), within 5%."""
    D, rho, n = 0.1, 0.5, 50_000
    cost = CostModel.from_json({**PROFILE, "prefill": {"c2": 0.0, "c1": 0.0, "c0": D * 1e3}})
    rng = random.Random(11)
    t, reqs = 0.0, []
    for i in range(n):
        t += rng.expovariate(rho / D)
        reqs.append(Request(i, t, 1 + rng.randint(0, 2000), 1, 1e9, 0.1, 1))
    res = simulate(reqs, "1C", "colocated:queue_order=fcfs", cost, kv_capacity_tokens=1_000_000)
    wq = sum(r.queueing for r in res.requests) / n
    expected = rho * D / (2 * (1 - rho))
    assert abs(wq - expected) / expected < 0.05, (wq, expected)
    assert all(r.first_token_time - r.first_scheduled == pytest.approx(D) for r in res.requests[:100])


def test_contention_slows_only_steps_that_start_beside_another():
    """Two colocated workers, prefill-only requests of constant time D, contention factor 1.5: a
    step that starts while the other worker runs one takes 1.5 D, one that starts alone D (of two
    arriving together, the first starts alone)."""
    D = 0.1
    prof = {**PROFILE, "prefill": {"c2": 0.0, "c1": 0.0, "c0": D * 1e3}, "contention": {"factor": 1.5}}
    cost = CostModel.from_json(prof)
    assert CostModel.from_json(cost.to_dict()).contention == 1.5
    reqs = [Request(0, 0.0, 10, 1, 1e9, 0.1, 1), Request(1, 1.0, 10, 1, 1e9, 0.1, 1),
            Request(2, 1.0, 10, 1, 1e9, 0.1, 1), Request(3, 2.0, 10, 1, 1e9, 0.1, 1),
            Request(4, 2.05, 10, 1, 1e9, 0.1, 1)]
    res = simulate(reqs, "2C", "colocated", cost, kv_capacity_tokens=1_000_000)
    took = [r.first_token_time - r.first_scheduled for r in sorted(res.requests, key=lambda r: r.id)]
    assert took == pytest.approx([D, D, 1.5 * D, D, 1.5 * D])
    plain = simulate(reqs, "2C", "colocated", CostModel.from_json(PROFILE | {"prefill": prof["prefill"]}),
                     kv_capacity_tokens=1_000_000)
    assert all(r.first_token_time - r.first_scheduled == pytest.approx(D) for r in plain.requests)
    with pytest.raises(ValueError, match="contention"):
        CostModel.from_json({**PROFILE, "contention": {"factor": 0}})


def test_max_misses_stops_only_runs_below_target():
    reqs = workload(300, rate=6.0, seed=2, slo_scale=None)
    for rate_reqs, cluster, policy in ((reqs, "1P1M", "tropical"), (workload(300, 1.0, 2), "2C", "colocated")):
        full = simulate(rate_reqs, cluster, policy, COST, kv_capacity_tokens=400_000)
        att = sum(r.attained for r in full.requests) / len(rate_reqs)
        cut = simulate(rate_reqs, cluster, policy, COST, kv_capacity_tokens=400_000, max_misses=30)
        assert cut.stopped_early == (att < 0.9)
        if cut.stopped_early:
            assert cut.steps < full.steps
        else:
            assert _outcome(cut) == _outcome(full)


def test_scheduler_driven_by_threads_with_a_wall_clock():
    """The real engine's shape: one thread per worker, a transfer thread, arrivals from another
    thread, a wall clock. Every request completes exactly, failed handoffs included."""
    import threading
    import time

    from tropical_jax.sched.scheduler import Scheduler
    from tropical_jax.sim.clock import WallClock
    from tropical_jax.sim.executor import CostModelExecutor

    fast = CostModel.from_json({**PROFILE, "prefill": {"c2": 0.0, "c1": 0.0005, "c0": 0.2},
                                "decode": {"d0": 0.3, "d1": 0.0, "d2": 0.0}})
    sched = Scheduler("1P2M", "tropical:queue_order=fcfs", fast, kv_capacity_tokens=500_000)
    clock = WallClock()
    stop = threading.Event()
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # surfaced by the assertion below
                errors.append(e)
                stop.set()
        return run

    def worker(name):
        while not stop.is_set():
            plan = sched.next_step(name, clock.now())
            if plan is None:
                time.sleep(0.0002)
                continue
            time.sleep(plan.predicted)
            sched.step_done(name, plan, clock.now(), [r for r in plan.emitting() if CostModelExecutor.stops(r)])

    def transfers():
        while not stop.is_set():
            for t in sched.take_transfers():
                sched.transfer_done(t, clock.now(), ok=t.request.id % 5 != 0)
            sched.tick(clock.now())
            time.sleep(0.0002)

    threads = [threading.Thread(target=guard(lambda n=n: worker(n))) for n in sched.workers]
    threads.append(threading.Thread(target=guard(transfers)))
    for t in threads:
        t.start()
    rng = random.Random(0)
    reqs = [Request(i, 0.0, rng.randint(1, 3000), rng.randint(1, 12), None, 0.1, rng.randint(1, 12)) for i in range(120)]
    for r in reqs:
        r.arrival = clock.now()
        sched.submit(r, r.arrival)
        time.sleep(0.0003)
    deadline = time.monotonic() + 30
    while sched.live and time.monotonic() < deadline and not errors:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and sched.live == 0
    assert all(r.n_out == min(r.output_len, r.max_tokens) for r in reqs)
    assert sched.counters["transfer_failures"] > 0
    assert all(w.alloc.num_free == w.alloc.num_pages for w in sched.workers.values())
