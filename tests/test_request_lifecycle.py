"""A request's life in the scheduler, hand-computed: its status at each step, the events the
listener gets (one path for every change), finish reasons, and abort wherever the request is
(waiting, queued with pages, decoding, inside a step in flight) freeing every page.

Cost model (ms): t_prefill(L) = 0.25 L + 10, decode steps 20; one colocated worker under the
chunked policy with a 64-token budget packing up to two prompts, first come first served, pages of
16 tokens, 64 pages.
"""

import pytest

from test_sched_decisions import COST
from tropical_jax.sched.config import PolicyConfig
from tropical_jax.sched.request import Request, RequestStatus
from tropical_jax.sched.scheduler import Scheduler


def make(**knobs):
    events = []
    policy = PolicyConfig(policy="chunked", token_budget=64, chunk_buckets=(64,), queue_order="fcfs",
                          max_prefill_seqs=2, **knobs)
    s = Scheduler("1C", policy, COST, kv_capacity_tokens=64 * 16, page_size=16,
                  listener=lambda kind, r, now: events.append((kind, r.id, round(now, 3))))
    return s, events


def pages(s):
    return s.workers["C0"].alloc.num_used


def test_statuses_events_and_finish_reasons_through_a_life():
    s, events = make()
    a = Request("a", 0.0, 100, 3, ttft_slo=10.0)  # 100 tokens: chunks of 64 then 36
    b = Request("b", 0.0, 10, 5, ttft_slo=10.0)
    s.submit(a, 0.0)
    s.submit(b, 0.0)
    assert a.status is b.status is RequestStatus.WAITING and events == []
    plan = s.next_step("C0", 0.0)  # the budget takes a's first 64 tokens only
    assert [(c.request.id, c.start, c.length) for c in plan.chunks] == [("a", 0, 64)]
    assert a.status is RequestStatus.PREFILLING and b.status is RequestStatus.WAITING
    assert events == [("scheduled", "a", 0.0)]
    s.step_done("C0", plan, 0.1)
    plan = s.next_step("C0", 0.1)  # a's last 36 and all of b pack into one chunk
    assert [(c.request.id, c.start, c.length) for c in plan.chunks] == [("a", 64, 36), ("b", 0, 10)]
    s.step_done("C0", plan, 0.2)
    assert a.status is b.status is RequestStatus.DECODING and a.n_out == b.n_out == 1
    plan = s.next_step("C0", 0.2)
    s.step_done("C0", plan, 0.3, finished=[b])  # the engine saw b's EOS
    assert b.status is RequestStatus.FINISHED and b.finish_reason == "stop"
    plan = s.next_step("C0", 0.3)
    s.step_done("C0", plan, 0.4)  # a's third token: max_tokens
    assert a.status is RequestStatus.FINISHED and a.finish_reason == "length" and a.n_out == 3
    assert events == [("scheduled", "a", 0.0), ("scheduled", "b", 0.1), ("finished", "b", 0.3),
                      ("finished", "a", 0.4)]
    assert pages(s) == 0 and s.live == 0


def test_shed_and_queue_timeout_are_rejections_with_their_reasons():
    s, events = make(shed=True, queue_timeout=1.0)
    hopeless = Request("h", 0.0, 400, 4, ttft_slo=0.05)  # its prefill alone takes 110 ms > 50 ms
    s.submit(hopeless, 0.0)
    assert hopeless.status is RequestStatus.REJECTED and hopeless.finish_reason == "rejected"
    assert "shed" in hopeless.status_reason and hopeless.done
    # A TTFT SLO the client never named (a server default) is held for ordering and attainment, never shed for.
    defaulted = Request("d", 0.0, 400, 4, ttft_slo=0.05, sheddable=False)
    s.submit(defaulted, 0.0)
    assert defaulted.status is RequestStatus.WAITING
    s.abort("d", 0.0)
    late = Request("l", 0.0, 10, 4, ttft_slo=10.0)
    s.submit(late, 0.0)
    assert s.next_timer() == pytest.approx(1.0)
    s.tick(1.0)  # never scheduled within the queue timeout
    assert late.status is RequestStatus.REJECTED and late.finish_reason == "queue_timeout"
    assert "queue_timeout" in late.status_reason
    assert events == [("rejected", "h", 0.0), ("aborted", "d", 0.0), ("rejected", "l", 1.0)]
    assert pages(s) == 0 and s.live == 0


def test_abort_frees_pages_wherever_the_request_is():
    s, events = make()
    reqs = {i: Request(i, 0.0, 40, 50, ttft_slo=10.0) for i in "abc"}
    for r in reqs.values():
        s.submit(r, 0.0)
    plan = s.next_step("C0", 0.0)  # a (40) and 24 tokens of b
    assert [(c.request.id, c.length) for c in plan.chunks] == [("a", 40), ("b", 24)]
    assert s.abort("b", 0.01)  # inside the step in flight: stopped when it ends
    assert reqs["b"].status is RequestStatus.PREFILLING and ("aborted", "b", 0.01) not in events
    assert s.abort("c", 0.02)  # queued, no pages yet: at once
    assert reqs["c"].status is RequestStatus.ABORTED and ("aborted", "c", 0.02) in events
    s.step_done("C0", plan, 0.1)
    assert reqs["b"].status is RequestStatus.ABORTED and reqs["b"].finish_reason == "abort"
    assert ("aborted", "b", 0.1) in events
    assert reqs["a"].status is RequestStatus.DECODING and pages(s) == 3  # a's 41 tokens
    assert s.abort("a", 0.2) and pages(s) == 0 and s.live == 0
    assert not s.abort("a", 0.3) and not s.abort("nobody", 0.3)  # ended or unknown: nothing to do
    assert s.counters["aborted"] == 3 and s.next_step("C0", 0.3) is None


def test_a_live_request_id_cannot_be_submitted_twice():
    s, _ = make()
    s.submit(Request("x", 0.0, 10, 2, ttft_slo=10.0), 0.0)
    with pytest.raises(ValueError, match="already live"):
        s.submit(Request("x", 0.0, 10, 2, ttft_slo=10.0), 0.0)
