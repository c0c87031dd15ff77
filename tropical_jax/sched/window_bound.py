"""The window bound (docs/policies.md, The bound): the most requests any policy could serve within SLO
on one given trace, from a linear program over time.

The work bounds (bound.py) charge each request its cost and ignore time. Here every served request's
work must also fit in the time it may run in, on the given number of workers:

- its prefill, at least a2·L² + a1·L of worker time (the cheapest the profile allows: whole, chunked
  or packed with others), runs between its arrival and its TTFT deadline (arrival + ttft_scale x its
  isolated prefill time), on one worker at a time (no faster than the clock);
- its n_out − 1 decode tokens, at least t1 + t2·ctx each (ctx = its prompt plus the tokens before),
  run between its arrival and its last allowed token, deadline + (n_out − 1)·TPOT SLO;
- those tokens come from n_out − 1 distinct steps in that span, each with a fixed cost of at least
  `fixed` (shared by every request decoding in the step);
- each worker runs one step at a time.

Time is cut at every arrival and deadline; decode work and step overheads are placed in blocks of
`block_s` seconds (a block counts for a request if it meets the request's span: coarser blocks only
loosen the bound). Relaxed to x_j in [0, 1] (request j served) and work divisible in time, this is a
linear program whose maximum Σx/n is at least the SLO attainment of every schedule the simulator can
run on that trace with these step costs (noise 0). With `class_floor` each prompt-length class must be
served at least that fraction (no class above 1 − class_floor misses); infeasible counts as 0.
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
        p, k, d, m = cost.prefill, cost.chunk, cost.decode, cost.mixed
        # Chunks C_i after ctx_i = C_1 + .. + C_{i-1} tokens sum to Σ C_i² + 2·C_i·ctx_i = L², so any
        # split of a prompt costs at least min(k2, kx/2)·L²; packing prompts together only adds.
        quad = [p["c2"], k["k2"], k["kx"] / 2] + ([m["mc2"], m["mcx"] / 2] if m else [])
        lin = [p["c1"], k["k1"]] + ([m["mc1"]] if m else [])
        tok, ctx = [d["d1"]] + ([m["mb"]] if m else []), [d["d2"]] + ([m["mt"]] if m else [])
        # A derived mixed step's fixed part is k0 + d0 − min(c0, d0); a fitted one's m0.
        fixed = [d["d0"], m["m0"] if m else k["k0"] + d["d0"] - min(p["c0"], d["d0"])]
        return cls(*(max(0.0, min(v)) * 1e-3 for v in (quad, lin, tok, ctx, fixed)))


def served_fraction(requests, cost: CostModel, num_workers: int, ttft_scale: float = 5.0, tpot_slo: float = 0.1,
                    block_s: float = 5.0, class_floor: float | None = None) -> float:
    """The linear program's most requests served within SLO, as a fraction of the trace (0 if a class
    floor cannot be met). `requests`: anything with arrival, prompt_len and output_len (sched Requests)."""
    if not requests:
        raise ValueError("the window bound needs at least one request")
    a = np.array([r.arrival for r in requests], float)
    L = np.array([r.prompt_len for r in requests], np.int64)
    n_out = np.maximum(np.array([r.output_len for r in requests], np.int64), 1)
    n = len(a)
    f = StepFloor.of(cost)
    Lf, tokens = L.astype(float), (n_out - 1).astype(float)
    prefill = f.prefill2 * Lf * Lf + f.prefill1 * Lf
    decode = tokens * (f.token1 + f.token_ctx * Lf) + f.token_ctx * tokens * (tokens + 1) / 2
    deadline = a + ttft_scale * np.array([cost.t_prefill(int(x)) for x in L])
    last = deadline + tokens * tpot_slo

    t0, end = a.min(), last.max()
    block_edges = t0 + block_s * np.arange(math.ceil((end - t0) / block_s))
    block_edges = np.append(block_edges[block_edges < end], end)
    block_width = np.diff(block_edges)
    cuts = np.unique(np.concatenate([a, deadline, block_edges]))
    width = np.diff(cuts)                                   # the pieces of time
    piece_block = np.searchsorted(block_edges, cuts[:-1], side="right") - 1
    m, nb = len(width), len(block_width)

    # Variables: x (n), prefill work per (request, piece), decode work per (request, block), overhead per block.
    first, stop = np.searchsorted(cuts, a), np.searchsorted(cuts, deadline)
    p_req, p_piece = _spans(first, stop)
    b_first = np.searchsorted(block_edges, a, side="right") - 1
    b_stop = np.minimum(np.searchsorted(block_edges, last, side="left"), nb)
    decoding = tokens > 0
    d_req, d_block = _spans(b_first[decoding], b_stop[decoding], np.flatnonzero(decoding))
    o_req, o_block = d_req, d_block                         # the blocks a request's decode steps may fall in
    ny, nz = len(p_req), len(d_req)
    x_at, y_at, z_at, o_at = 0, n, n + ny, n + ny + nz
    nvar = o_at + nb

    # Equalities: each request's prefill and decode work, scaled by x.
    served_rows = np.arange(n)
    eq = _matrix([(served_rows, x_at + served_rows, -prefill), (p_req, y_at + np.arange(ny), 1.0),
                  (n + served_rows[decoding], x_at + served_rows[decoding], -decode[decoding]),
                  (n + d_req, z_at + np.arange(nz), 1.0)], 2 * n, nvar)
    # Inequalities: each block's capacity, then each request's share of step overheads.
    rows = [(piece_block[p_piece], y_at + np.arange(ny), 1.0), (d_block, z_at + np.arange(nz), 1.0),
            (np.arange(nb), o_at + np.arange(nb), 1.0),
            (nb + served_rows[decoding], x_at + served_rows[decoding], f.fixed * tokens[decoding]),
            (nb + o_req, o_at + o_block, -1.0)]
    rhs = [num_workers * block_width, np.zeros(n)]
    nrows = nb + n
    if class_floor is not None:
        for name, lo, hi in LENGTH_CLASSES:
            members = np.flatnonzero((L >= lo) & (L < hi))
            if len(members):
                rows.append((np.full(len(members), nrows), x_at + members, -1.0))
                rhs.append([-class_floor * len(members)])
                nrows += 1
    ub = _matrix(rows, nrows, nvar)
    # Fine pieces bound the prefill alone (arrivals and deadlines cut them): the pieces' capacity, and
    # one request's prefill no faster than the clock.
    fine = _matrix([(p_piece, y_at + np.arange(ny), 1.0)], m, nvar)
    bounds = np.zeros((nvar, 2))
    bounds[:, 1] = np.inf
    bounds[x_at:y_at, 1] = 1.0
    bounds[y_at:z_at, 1] = width[p_piece]
    bounds[z_at:o_at, 1] = block_width[d_block]
    c = np.zeros(nvar)
    c[x_at:y_at] = -1.0
    res = linprog(c, A_ub=sparse.vstack([ub, fine]).tocsr(), b_ub=np.concatenate(rhs + [num_workers * width]),
                  A_eq=eq, b_eq=np.zeros(2 * n), bounds=bounds, method="highs")
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
