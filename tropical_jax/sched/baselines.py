"""The baselines every comparison names, each for the system whose scheduling it models.

A name stands for a policy string (knobs: sched/config.py) and may take more knobs after a colon
("distserve:shed=true"). "The strongest baseline" of a report is the best of all of these under the
same shedding as the policy compared with them. What each models, and what it leaves out:
docs/policies.md.
"""

from __future__ import annotations

BASELINES = {
    # vLLM's default scheduler: each worker prefills and decodes; waiting prompts run whole, ahead of
    # the decodes (prefill priority), first come, first served.
    "vllm": "colocated:queue_order=fcfs",
    # The same with the shortest prompt first.
    "vllm-sjf": "colocated:queue_order=sjf",
    # Sarathi-Serve (vLLM's chunked prefill): each step carries the decodes plus prompt chunks up to a
    # 2,048-token budget, first come, first served.
    "sarathi": "chunked:queue_order=fcfs",
    "sarathi-sjf": "chunked:queue_order=sjf",
    # DistServe as published: a prefill worker runs whole prompts first come, first served and hands
    # the KV cache to a decode worker.
    "distserve": "disaggregated:queue_order=fcfs,chunk=whole",
    # A stronger disaggregated variant: prompts in 4,096-token chunks, the one with the least prefill
    # left picked at every chunk boundary (preemptive shortest-job-first).
    "distserve-srpt": "disaggregated:queue_order=sjf",
}


def resolve(text: str) -> str:
    """A baseline's name (with any extra knobs) -> its policy string; anything else unchanged."""
    name, colon, knobs = text.partition(":")
    base = BASELINES.get(name.strip())
    if base is None:
        return text
    return f"{base},{knobs}" if colon and knobs.strip() else base
