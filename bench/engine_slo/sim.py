"""What bench.engine_slo serves, and what the simulator says of it.

The workload: a real trace's requests scaled down to the embedded model (lengths x --input-scale /
--output-scale, capped to its context), SLOs scaled to the measured profile, the requests each run of a seed
serves at each rate; the engine's shapes and the policies' knobs scaled alike. The simulator's side: replays of
real runs, its goodput search, and its runs on other seeds drawn like the real ones. bench.engine_slo runs the
real engine on these; bench.engine_slo.workloads sweeps the simulator alone over them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tropical_jax.sched.config import PolicyConfig
from tropical_jax.sched.metrics import goodput, summarize
from tropical_jax.sched.request import Request
from tropical_jax.sim.simulator import simulate
from tropical_jax.sim.workloads import make_requests

from .report import VARIANTS

ENGINE = dict(max_model_len=512, page_size=16, max_num_seqs=16, max_chunk_tokens=128, chunk_buckets=[32, 128],
              batch_buckets=[4, 8, 16], context_buckets=[512])
RESULTS = Path(__file__).resolve().parents[1] / "results"
SIM_WINDOW_SEED0 = 1000


def slo_batch(cfg) -> int:
    """The batch whose decode step the TPOT SLO is scaled from: the middle batch bucket."""
    return cfg.batch_sizes[len(cfg.batch_sizes) // 2]


def tpot_slo_for(cost, cfg, tpot_scale: float) -> tuple[float, float]:
    """-> (TPOT SLO, the decode step it is scaled from) in seconds, on this profile."""
    step = cost.t_decode(slo_batch(cfg), slo_batch(cfg) * cfg.max_model_len)
    return tpot_scale * step, step


def policy_text(name: str, args) -> str:
    """The policy (or variant, report.VARIANTS) with its token-length knobs scaled like the prompts
    (x --input-scale): unscaled, a 512-token short-prompt exemption would exempt every prompt here from the
    slack check."""
    name, variant = VARIANTS.get(name, (name, None))
    knobs = [f"shed={'true' if args.shed else 'false'}", f"max_prefill_seqs={args.prefill_seqs}"]
    if getattr(args, "recalibrate_steps", None) is not None:
        knobs.append(f"recalibrate_steps={args.recalibrate_steps}")
    if name in ("tropical", "planned"):
        p = PolicyConfig(policy=name)
        knobs += [f"{k}={max(1, round(getattr(p, k) * args.input_scale))}"
                  for k in ("short_prompt_tokens", "max_multiplex_tokens", "jump_tokens") if getattr(p, k) is not None]
        knobs.append(f"handoff_guard={'true' if args.handoff_guard else 'false'}")
    return f"{name}:{','.join(knobs + ([variant] if variant else []))}"


def scaled_requests(args, n: int, rate: float, seed: int, slo_cost, tpot_slo: float, dilation: float = 1.0
                    ) -> list[Request]:
    """The trace's lengths scaled down to the model; Poisson (or Gamma, --arrival) arrivals at `rate`; each
    request's TTFT SLO --ttft-scale x its isolated prefill on `slo_cost` (the profile the SLOs are scaled from).
    dilation: arrival times and both SLOs x this (a machine that slowed down by it serves the same workload)."""
    reqs = make_requests(args.workload, n, rate, seed=seed, tpot_slo=tpot_slo * dilation, arrival=args.arrival,
                         cv=args.cv)
    out_cap = args.max_output_len
    in_cap = ENGINE["max_model_len"] - out_cap - 1
    for r in reqs:
        r.arrival *= dilation
        r.prompt_len = int(np.clip(round(r.prompt_len * args.input_scale), 1, in_cap))
        r.output_len = r.max_tokens = int(np.clip(round(r.output_len * args.output_scale), 1, out_cap))
        r.ttft_slo = args.ttft_scale * slo_cost.t_prefill(r.prompt_len) * dilation
    return reqs


def run_requests(args, seed: int, rate_index: int, rate: float, slo_cost, tpot_slo: float, dilation: float = 1.0
                 ) -> list[Request]:
    """The requests a run of `seed` serves at its rate_index-th rate: --duration s of arrivals at `rate`."""
    return scaled_requests(args, max(8, round(rate * args.duration)), rate, 100 + rate_index + 1000 * seed, slo_cost,
                           tpot_slo, dilation)


def sim_attainment(reqs: list[Request], cluster, policy, cost) -> float:
    return summarize(simulate(reqs, cluster, policy, cost, page_size=ENGINE["page_size"]).requests)["attainment"]


def sim_window_curves(args, cluster, policy, cost, slo_cost, tpot_slo, rates) -> dict:
    """The simulator on workloads drawn like the real runs' (--duration s of arrivals at each of `rates`, scaled
    alike) for seeds SIM_WINDOW_SEED0 on (--sim-window-seeds of them; the real runs use lower ones): per seed, its
    attainment at each rate. A run's goodputs read off a few bursty seeds move by tens of percent; these curves
    say what to expect of it, and how far it may stray."""
    return {s: [(rate, sim_attainment(run_requests(args, s, i, rate, slo_cost, tpot_slo), cluster, policy, cost))
                for i, rate in enumerate(rates)]
            for s in range(SIM_WINDOW_SEED0, SIM_WINDOW_SEED0 + args.sim_window_seeds)}


def replay(real: list[Request], cluster, policy, cost, page_size) -> list[Request]:
    """The same requests, at the times they really arrived, through the simulator."""
    t0 = min(r.arrival for r in real)
    reqs = [Request(i, r.arrival - t0, r.prompt_len, r.max_tokens, r.ttft_slo, r.tpot_slo, r.n_out or r.max_tokens)
            for i, r in enumerate(real)]
    return simulate(reqs, cluster, policy, cost, page_size=page_size).requests


def sim_goodput(args, cluster, policy, cost, slo_cost, tpot_slo, lo, hi):
    """The simulator's goodput search on `cost`, SLOs scaled from `slo_cost`."""
    def att(rate):
        vals = [sim_attainment(scaled_requests(args, args.sim_requests, rate, seed, slo_cost, tpot_slo), cluster,
                               policy, cost) for seed in range(args.sim_seeds)]
        return float(np.mean(vals))

    return goodput(att, lo=lo, hi=hi, target=args.target)
