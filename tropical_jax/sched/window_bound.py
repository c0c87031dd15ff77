"""The window bound (docs/policies.md, The bound): the most requests any policy could serve within SLO
on one given trace, from a linear program over time.

The work bounds (bound.py) charge each request its cost and ignore time. Here every served request's
work must also fit in the time it may run in, on the given number of workers:

- its prefill, at least a2·L² + a1·L of worker time (StepFloor: the cheapest the profile allows,
  however chunked or packed with others), runs between its arrival and its TTFT deadline (arrival +
  ttft_scale x its isolated prefill time), on one worker at a time (no faster than the clock);
- its n_out − 1 decode tokens, at least t1 + t2·ctx each (ctx = its prompt plus the tokens before),
  run between its arrival and its last allowed token, deadline + (n_out − 1)·TPOT SLO;
- those tokens come from n_out − 1 distinct steps in that span, each with a fixed cost of at least
  `fixed` (shared by every request decoding in the step);
- each worker runs one step at a time.

Time is cut at every arrival, TTFT deadline and last-token deadline (and every `block_s` seconds).
Prefill and the steps' fixed costs are placed piece by piece; decode work in blocks of `block_s`
seconds (a block counts for a request if it meets the request's time: coarser blocks only loosen the
bound). Relaxed to x_j in [0, 1] (request j served) and work divisible in time, this is a linear
program whose maximum Σx/n is at least the SLO attainment of every schedule the simulator can run on
that trace with these step costs (noise 0). KV memory, transfers, which worker holds a request and
whole requests (x_j 0 or 1) are left out, which only loosens it. With `class_floor` each
prompt-length class must be served at least that fraction (no class above 1 − class_floor misses);
infeasible counts as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from .cost_model import CostModel
from .metrics import LENGTH_CLASSES, goodput


@dataclass(frozen=True)
class StepFloor:
    """Lower bounds (s) on what a step spends on each thing, whatever form the step takes."""
    prefill2: float   # per prompt token squared
    prefill1: float   # per prompt token
    token1: float     # per decode token
    token_ctx: float  # per decode token, per context token it reads
    fixed: float      # per step that decodes anything

    @classmethod
    def of(cls, cost: CostModel) -> "StepFloor":
        """The cheapest of the forms the simulator runs a step in (CostModelExecutor: t_chunk, t_decode
        or t_mixed; never t_prefill, which only sets the TTFT deadline)."""
        k, d, m = cost.chunk, cost.decode, cost.mixed
        used = [*k.values(), *d.values(), *(m.values() if m else ())]
        if min(used) < 0:  # a negative term makes a step cheaper than its other terms: no floor holds
            raise ValueError("the window bound needs a profile whose chunk, decode and mixed coefficients are >= 0")
        # Chunks C_i after ctx_i = C_1 + .. + C_{i-1} tokens sum to Σ C_i² + 2·C_i·ctx_i = L², so any
        # split of a prompt costs at least min(k2, kx/2)·L²; packing prompts together only adds.
        quad = [k["k2"], k["kx"] / 2] + ([m["mc2"], m["mcx"] / 2] if m else [])
        lin = [k["k1"]] + ([m["mc1"]] if m else [])
        tok, ctx = [d["d1"]] + ([m["mb"]] if m else []), [d["d2"]] + ([m["mt"]] if m else [])
        # A derived mixed step's fixed part is k0 + d0 − min(c0, d0); a fitted one's m0.
        fixed = [d["d0"], m["m0"] if m else k["k0"] + d["d0"] - min(cost.prefill["c0"], d["d0"])]
        return cls(*(min(v) * 1e-3 for v in (quad, lin, tok, ctx, fixed)))

def served_fraction(requests, cost: CostModel, num_workers: int, ttft_scale: float = 5.0, tpot_slo: float = 0.1,
                    block_s: float = 5.0, class_floor: float | None = None) -> float:
    """The linear program's most requests served within SLO, as a fraction of the trace (0 if a class
    floor cannot be met). `requests`: anything with arrival, prompt_len and output_len (sched Requests)."""
    if not requests:
        raise ValueError("the window bound needs at least one request")
    if class_floor is not None and not 0 <= class_floor <= 1:
        raise ValueError(f"the class floor is a fraction of each class, in [0, 1] (got {class_floor})")
    arrival = np.array([r.arrival for r in requests], float)
    prompt = np.array([r.prompt_len for r in requests], np.int64)
    tokens = np.maximum(np.array([r.output_len for r in requests], np.int64) - 1, 0).astype(float)  # decoded
    n = len(arrival)
    floor, length = StepFloor.of(cost), prompt.astype(float)
    prefill = floor.prefill2 * length * length + floor.prefill1 * length
    decode = tokens * (floor.token1 + floor.token_ctx * length) + floor.token_ctx * tokens * (tokens + 1) / 2
    deadline = arrival + ttft_scale * np.array([cost.t_prefill(int(x)) for x in prompt])
    last = deadline + tokens * tpot_slo

    start, end = arrival.min(), last.max()
    block_edges = start + block_s * np.arange(math.ceil((end - start) / block_s))
    block_edges = np.append(block_edges[block_edges < end], end)
    cuts = np.unique(np.concatenate([arrival, deadline, last, block_edges]))
    width, block_width = np.diff(cuts), np.diff(block_edges)  # piece k is [cuts[k], cuts[k + 1]]
    block_cut = np.searchsorted(cuts, block_edges)
    num_pieces, num_blocks = len(width), len(block_width)
    pieces, blocks = np.arange(num_pieces), np.arange(num_blocks)

    # Variables: served (x, one per request), prefill work per (request, piece of its TTFT time),
    # decode work per (request, block meeting its time), and the steps' fixed cost summed up to each cut
    # (what lies between two cuts is the difference of two of them).
    pre_req, pre_piece = _spans(np.searchsorted(cuts, arrival), np.searchsorted(cuts, deadline))
    decoding = np.flatnonzero(tokens > 0)
    first_block = np.searchsorted(block_edges, arrival[decoding], side="right") - 1
    dec_req, dec_block = _spans(first_block, np.minimum(np.searchsorted(block_edges, last[decoding]), num_blocks),
                                decoding)
    pre_var = n + np.arange(len(pre_req))
    dec_var = n + len(pre_req) + np.arange(len(dec_req))
    fixed_var = n + len(pre_req) + len(dec_req)  # + k: the fixed cost of all steps before cut k
    num_vars = fixed_var + num_pieces + 1
    served_work = _matrix([(np.arange(n), np.arange(n), -prefill), (pre_req, pre_var, 1.0),  # x_j times its work
                           (n + decoding, decoding, -decode[decoding]), (n + dec_req, dec_var, 1.0)], 2 * n, num_vars)
    piece_block = np.searchsorted(block_cut, pieces, side="right") - 1
    rows = _Rows(num_vars)
    rows.add(num_workers * block_width,                   # each block: all the work in it, on the workers
             (piece_block[pre_piece], pre_var, 1.0), (dec_block, dec_var, 1.0),
             (blocks, fixed_var + block_cut[1:], 1.0), (blocks, fixed_var + block_cut[:-1], -1.0))
    rows.add(num_workers * width, (pre_piece, pre_var, 1.0),  # each piece: its prefill and fixed costs
             (pieces, fixed_var + pieces + 1, 1.0), (pieces, fixed_var + pieces, -1.0))
    rows.add(np.zeros(num_pieces), (pieces, fixed_var + pieces, 1.0), (pieces, fixed_var + pieces + 1, -1.0))  # grows
    each = np.arange(len(decoding))                       # a request's steps, each a fixed cost, inside its time
    rows.add(np.zeros(len(decoding)), (each, decoding, floor.fixed * tokens[decoding]),
             (each, fixed_var + np.searchsorted(cuts, last[decoding]), -1.0),
             (each, fixed_var + np.searchsorted(cuts, arrival[decoding]), 1.0))
    for _, lo, hi in LENGTH_CLASSES if class_floor is not None else ():
        members = np.flatnonzero((prompt >= lo) & (prompt < hi))
        if len(members):
            rows.add([-class_floor * len(members)], (np.zeros(len(members), int), members, -1.0))
    bounds = np.zeros((num_vars, 2))                      # the fixed cost before the first cut stays 0
    bounds[:n, 1] = 1.0
    bounds[pre_var, 1] = width[pre_piece]                 # one request's prefill no faster than the clock
    bounds[dec_var, 1] = block_width[dec_block]
    bounds[fixed_var + 1:, 1] = np.inf
    most_served = np.zeros(num_vars)
    most_served[:n] = -1.0
    res = linprog(most_served, A_ub=rows.matrix(), b_ub=rows.rhs(), A_eq=served_work, b_eq=np.zeros(2 * n),
                  bounds=bounds, method="highs-ipm")  # interior point: several times faster here than simplex
    if res.status == 2:  # infeasible: the class floor cannot be met
        return 0.0
    if res.status != 0:
        raise RuntimeError(f"window bound: the linear program failed ({res.message})")
    return float(-res.fun) / n


def _spans(first, stop, owners=None):
    """(owner, index) for every index in [first_i, stop_i) of every i."""
    counts = np.maximum(stop - first, 0)
    owner = np.repeat(np.arange(len(first)) if owners is None else owners, counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(first, counts) + offset


class _Rows:
    """Inequality rows (≤ rhs), added in groups: (row within the group, column, value) triples."""

    def __init__(self, ncols: int):
        self.ncols, self.parts, self.rhs_parts, self.count = ncols, [], [], 0

    def add(self, rhs, *parts):
        self.parts += [(np.asarray(r) + self.count, c, v) for r, c, v in parts]
        self.rhs_parts.append(np.asarray(rhs, float))
        self.count += len(self.rhs_parts[-1])

    def matrix(self):
        return _matrix(self.parts, self.count, self.ncols)

    def rhs(self):
        return np.concatenate(self.rhs_parts)


def _matrix(parts, nrows, ncols):
    rows = np.concatenate([np.asarray(r) for r, _, _ in parts])
    cols = np.concatenate([np.asarray(c) for _, c, _ in parts])
    vals = np.concatenate([np.broadcast_to(np.asarray(v, float), np.shape(r)) for r, _, v in parts])
    return sparse.coo_matrix((vals, (rows, cols)), shape=(nrows, ncols)).tocsr()


def window_bound(requests_at, cost: CostModel, num_workers: int, *, ttft_scale: float = 5.0, tpot_slo: float = 0.1,
                 target: float = 0.9, lo: float, hi: float, rel_tol: float = 0.01, class_floor: float | None = None,
                 block_s: float = 5.0) -> dict:
    """The highest rate at which the linear program serves `target` of `requests_at(rate)` (the trace
    at that rate), searched as the simulator's goodput is. `bound_rps` is the lowest rate tried above
    it where even the program misses the target."""
    def attainment(rate):
        return served_fraction(requests_at(rate), cost, num_workers, ttft_scale, tpot_slo, block_s, class_floor)

    rate, curve = goodput(attainment, lo=lo, hi=hi, target=target, rel_tol=rel_tol)
    above = [r for r, v in curve if r > rate and v < target]
    return {"bound_rps": min(above, default=rate), "met_rps": rate, "target_attainment": target,
            "class_floor": class_floor, "block_s": block_s, "curve": curve}
