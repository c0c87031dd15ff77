"""The work bound (docs/algorithm.md, The work bound): the most requests per second any policy could serve within SLO.

A request costs at least its prefill compute, c2·L² + c1·L (the fixed per-step overhead c0 can be
shared), plus its share of decode steps at the largest batch B* whose step still fits the TPOT SLO:
(n_out − 1) · t_decode(B*, B*·ctx) / B*, with ctx the mean KV a decoding request reads (its prompt
plus half its output, averaged over the workload); the first token comes from the prefill.
bound = workers / mean cost. KV memory is not a limit here (it would only lower the bound).

A tighter bound (`step_bound_rps`) charges the decode step's fixed cost where it is paid: a request
must get a token every TPOT, and a step gives each request at most one, so while anything decodes some
worker runs a step at least every TPOT, each costing at least d0 however large its batch (a prefill
chunk in the same step shares it). That takes d0 / TPOT of one worker's time, and a token then costs
only its own share, d1 + d2·ctx. It assumes some request is decoding at every moment (true near
saturation) and holds for every policy.

Goodput at a target attainment a (90%) needs only a of the requests served: a policy may leave the
most expensive 1 - a unserved (shed, or let them miss). The `_at_target` bounds charge only the
cheapest a of the requests, which is what bounds such a goodput.
"""

from __future__ import annotations

import math

import numpy as np

from .cost_model import CostModel


def work_bound(prompt_lens, output_lens, cost: CostModel, num_workers: int, tpot_slo: float = 0.1,
               max_batch: int = 4096, attainment: float = 0.9) -> dict:
    L = np.asarray(prompt_lens, float)
    out = np.asarray(output_lens, float)
    if len(L) == 0 or len(L) != len(out):
        raise ValueError("need equally many prompt and output lengths (at least one)")
    p = cost.prefill
    prefill_s = (p["c2"] * L * L + p["c1"] * L) * 1e-3
    ctx = float(np.mean(L + out / 2))
    if cost.t_decode(1, int(ctx)) > tpot_slo:
        raise ValueError(f"even one decode ({cost.t_decode(1, int(ctx)) * 1e3:.1f} ms) misses the TPOT SLO")
    lo, hi = 1, max_batch  # largest B with t_decode(B, B·ctx) <= tpot_slo (monotone in B)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost.t_decode(mid, int(mid * ctx)) <= tpot_slo else (lo, mid - 1)
    per_token = cost.t_decode(lo, int(lo * ctx)) / lo
    decode_s = np.maximum(out - 1, 0) * per_token
    mean_cost = float(np.mean(prefill_s + decode_s))
    fixed = cost.decode["d0"] * 1e-3  # s: a decode step's fixed cost
    own = (cost.t_decode(lo, int(lo * ctx)) - fixed) / lo  # d1 + d2·ctx: one token's own share
    step_costs = prefill_s + np.maximum(out - 1, 0) * own
    step_capacity = num_workers - fixed / tpot_slo
    return {"bound_rps": num_workers / mean_cost, "step_bound_rps": step_capacity / float(np.mean(step_costs)),
            "target_attainment": attainment,
            "bound_rps_at_target": num_workers / _cheapest(prefill_s + decode_s, attainment),
            "step_bound_rps_at_target": step_capacity / _cheapest(step_costs, attainment),
            "mean_prefill_s": float(prefill_s.mean()), "mean_decode_s": float(decode_s.mean()), "decode_batch": lo,
            "mean_decode_ctx": ctx, "num_workers": num_workers, "tpot_slo": tpot_slo}


def _cheapest(costs: np.ndarray, attainment: float) -> float:
    """Work per arriving request when only the cheapest `attainment` of them are served (s)."""
    kept = np.sort(costs)[:math.ceil(round(attainment * len(costs), 9))]
    return float(kept.sum()) / len(costs)
