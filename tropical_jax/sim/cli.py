"""`python -m tropical_jax.sim`: simulate serving a workload, or search each policy's goodput.

    run     --workload W --profile P --cluster 1P1M --policy tropical --rate R --num-requests N [--json]
            [--requests-out FILE.jsonl] [--decisions-out FILE.jsonl]          (per-request outcomes, decision log)
    bound   --workload W --profile P --cluster 2C [--max-input-len L] [--json]     (the work bound, docs/algorithm.md)
            [--window [--class-floor 0.8]]       (and the window bound on this very trace, docs/policies.md)
    goodput --workload W --profile P --policies planned,baselines
            [--cluster tropical=1P1M,colocated=2C] [--target 0.9] [--seeds 1] [--json] [--plot FILE.png]
            [--early-stop] [--jobs N]
    every command: [--shed | --no-shed] for all policies in the call alike

Policies: tropical, planned, colocated, chunked, disaggregated with knobs after a colon, or a named
baseline (vllm, vllm-sjf, sarathi, sarathi-sjf, distserve, distserve-srpt: sched/baselines.py);
'baselines' in --policies stands for all of them.

Profiles: a name in tropical_jax/profiles (a100-llama2-70b-tp4, a100-internlm2.5-20b-tp2) or a
JSON path (e.g. written by the engine's profiler). Times in the JSON output are seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path

from ..sched.baselines import BASELINES, resolve
from ..sched.bound import work_bound
from ..sched.config import PolicyConfig, parse_cluster
from ..sched.cost_model import CostModel, ProfileError
from ..sched.metrics import goodput, mean_sd, miss_breakdown, record, summarize
from .rate_pool import RatePool
from .simulator import simulate
from .workloads import ARRIVALS, make_requests

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
DEFAULT_CLUSTER = {"tropical": "1P1M", "planned": "1P1M", "colocated": "2C", "chunked": "2C", "disaggregated": "1P1D"}


def load_profile(name: str) -> CostModel:
    path = PROFILES / f"{name}.json"
    if not path.exists():
        path = Path(name)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.json")))
        raise ProfileError(f"no profile {name!r}: give a JSON path or one of {known}")
    return CostModel.from_json(path)


def split_policies(text: str) -> list[str]:
    """'tropical,chunked:token_budget=512,queue_order=fcfs' -> ['tropical', 'chunked:token_budget=512,queue_order=fcfs'];
    the word 'baselines' stands for every named baseline (sched/baselines.py)."""
    out: list[str] = []
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        if "=" in tok and ":" not in tok and out and ":" in out[-1]:
            out[-1] += "," + tok  # another knob of the previous policy
        elif tok == "baselines":
            out.extend(BASELINES)
        else:
            out.append(tok)
    return out


def cluster_for(policy: str, cluster_arg: str | None) -> str:
    name = resolve(policy).split(":")[0]
    if cluster_arg and "=" not in cluster_arg:
        return cluster_arg
    mapping = dict(DEFAULT_CLUSTER)
    for item in filter(None, (cluster_arg or "").split(",")):
        k, _, v = item.partition("=")
        mapping[k.strip()] = v.strip()
    return mapping.get(policy, mapping.get(name, "2C"))


def _requests(args, rate, seed):
    return make_requests(args.workload, args.num_requests, rate, arrival=args.arrival, cv=args.cv, seed=seed,
                         max_input_len=args.max_input_len, tpot_slo=args.tpot_slo_ms / 1000)


def _policy(args, text):
    extra = {} if args.shed is None else {"shed": args.shed}
    return PolicyConfig.parse(text, ttft_scale=args.ttft_scale, **extra)


def bound_for(args, cluster: str, cost: CostModel) -> dict:
    reqs = _requests(args, 1.0, args.seed)
    return work_bound([r.prompt_len for r in reqs], [r.output_len for r in reqs], cost,
                      len(parse_cluster(cluster).workers), args.tpot_slo_ms / 1000, attainment=args.target)


def cmd_bound(args) -> dict:
    if args.class_floor is not None and not args.window:
        raise ValueError("--class-floor is a condition of the window bound: add --window")
    cluster, cost = args.cluster or "2C", load_profile(args.profile)
    out = {"workload": args.workload, "profile": args.profile, "cluster": cluster,
           "max_input_len": args.max_input_len, **bound_for(args, cluster, cost)}
    if args.window:
        from ..sched.window_bound import window_bound  # here: its scipy takes longer to import than a run takes

        workers = len(parse_cluster(cluster).workers)
        out["window"] = window_bound(lambda rate: _requests(args, rate, args.seed), cost, workers,
                                     ttft_scale=args.ttft_scale, tpot_slo=args.tpot_slo_ms / 1000,
                                     target=args.target, lo=0.5 * out["bound_rps"], hi=out["bound_rps_at_target"],
                                     class_floor=args.class_floor)
    return out


def run_once(args, policy_text, cluster, rate, seed, cost, max_misses=None, progress=False, record_decisions=False):
    policy = _policy(args, policy_text)
    return simulate(_requests(args, rate, seed), cluster, policy, cost, seed=seed, noise=args.noise,
                    max_misses=max_misses, progress=progress, record_decisions=record_decisions)


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def cmd_run(args) -> dict:
    cost = load_profile(args.profile)
    cluster = cluster_for(args.policy, args.cluster)
    res = run_once(args, args.policy, cluster, args.rate, args.seed, cost, progress=not args.json,
                   record_decisions=bool(args.decisions_out))
    if args.requests_out:
        _write_jsonl(args.requests_out, map(record, res.requests))
    if args.decisions_out:
        _write_jsonl(args.decisions_out, map(dataclasses.asdict, res.decisions))
    return {"policy": args.policy, "cluster": cluster, "workload": args.workload, "profile": args.profile,
            "rate": args.rate, "arrival": args.arrival, "max_input_len": args.max_input_len, "seed": args.seed,
            **summarize(res.requests), "misses": miss_breakdown(res.requests), "counters": res.counters,
            "sim_wall_s": round(res.wall_s, 3)}


@functools.lru_cache(maxsize=4)
def _cached_profile(name: str) -> CostModel:
    return load_profile(name)  # once per process: goodput's rates may run in worker processes


def rate_attainment(args, policy_text, cluster, budget, rate) -> tuple[float, int, bool]:
    """(mean attainment over the seeds, runs, whether a run stopped early) at one rate. --early-stop
    ends a rate's runs once the seeds together have certainly missed the target (more misses than
    `budget`): the search is the same, but the curve then holds only a lower bound of the attainment
    there. The budget is shared across seeds, since one seed below the target does not put their mean
    below it."""
    cost = _cached_profile(args.profile)
    values, missed, stopped = [], 0, False
    for s in range(args.seeds):
        res = run_once(args, policy_text, cluster, rate, args.seed + s, cost,
                       max_misses=max(0, budget - missed) if args.early_stop else None)
        values.append(summarize(res.requests)["attainment"])
        missed += sum(not r.attained for r in res.requests)
        stopped |= res.stopped_early
    return mean_sd(values)[0], len(values), stopped


def cmd_goodput(args) -> dict:
    from tqdm import tqdm  # here: a run needs no progress bar, and every run starts by importing this module

    target = args.target
    budget = math.floor(round((1 - target) * args.num_requests * args.seeds, 6))  # (1 - 0.9) * 240 = 23.99..
    results = {}
    for text in split_policies(args.policies):
        cluster = cluster_for(text, args.cluster)
        bar = tqdm(desc=f"goodput {text} on {cluster}", unit="run", disable=args.json, leave=False)
        stopped: list[float] = []

        def attainment(rate):
            value, runs, stopped_early = pool(rate)
            if stopped_early:
                stopped.append(rate)
            bar.update(runs)
            return value

        with RatePool(functools.partial(rate_attainment, args, text, cluster, budget), args.jobs) as pool:
            rate, curve = goodput(attainment, lo=args.rate_lo, hi=args.rate_hi, target=target, prefetch=pool.prefetch,
                                  progress=lambda r, a: bar.set_postfix(rate=f"{r:.3f}", attainment=f"{a:.3f}"))
        bar.close()
        bound = bound_for(args, cluster, _cached_profile(args.profile))["bound_rps"]
        results[text] = {"cluster": cluster, "goodput": rate, "fraction_of_bound": rate / bound, "bound_rps": bound,
                         "curve": curve}
        if args.early_stop:
            results[text]["curve_lower_bound_rates"] = sorted(stopped)
    out = {"workload": args.workload, "profile": args.profile, "target": target, "num_requests": args.num_requests,
           "seeds": args.seeds, "arrival": args.arrival, "max_input_len": args.max_input_len,
           "ttft_scale": args.ttft_scale, "tpot_slo_ms": args.tpot_slo_ms, "policies": results}
    if args.plot:
        plot_curves(out, args.plot)
    return out


def plot_curves(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in out["policies"].items():
        xs, ys = zip(*r["curve"])
        (line,) = ax.plot(xs, ys, "o-", ms=3, label=f"{name} ({r['cluster']}): {r['goodput']:.3f} req/s")
        low = [(x, y) for x, y in r["curve"] if x in r.get("curve_lower_bound_rates", ())]
        if low:  # runs stopped early: attainment at least this (hollow markers)
            ax.plot(*zip(*low), "o", ms=6, mfc="white", c=line.get_color())
    ax.axhline(out["target"], ls="--", c="gray", lw=1, label=f"target {out['target']:.0%}")
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_title(f"{out['workload']} on {out['profile']}")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tropical_jax.sim", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workload", required=True,
                        help="a named trace (mooncake-conversation, mooncake-synthetic, azure-code, azure-conv, "
                             "arxiv-summarization, humaneval) or a JSONL file with input_length, output_length "
                             "and optional timestamp (ms)")
    common.add_argument("--profile", required=True,
                        help="latency profile: a name in tropical_jax/profiles (a100-llama2-70b-tp4, "
                             "a100-internlm2.5-20b-tp2) or a JSON path")
    common.add_argument("--cluster", help="workers, e.g. 1P1M, 2C, 1P1D, or per policy: "
                                          "planned=1P1M,colocated=2C (default per policy: "
                                          + ", ".join(f"{k} {v}" for k, v in DEFAULT_CLUSTER.items()) + ")")
    common.add_argument("--num-requests", type=int, default=2000, help="requests per run (default 2000)")
    common.add_argument("--ttft-scale", type=float, default=5.0,
                        help="TTFT SLO = this x the request's isolated prefill time (default 5)")
    common.add_argument("--tpot-slo-ms", type=float, default=100.0, help="TPOT SLO in ms (default 100)")
    common.add_argument("--max-input-len", type=int, help="cut longer prompts to this many tokens (default: no cap)")
    common.add_argument("--arrival", choices=ARRIVALS, default="poisson",
                        help="arrival process: poisson, gamma (bursty, see --cv) or the trace's own timestamps "
                             "rescaled to the rate")
    common.add_argument("--cv", type=float, default=1.0,
                        help="coefficient of variation of gaps between Gamma arrivals (1 = Poisson-like)")
    common.add_argument("--noise", type=float, default=0.0,
                        help="lognormal sigma of a random factor (mean 1) on every step and transfer time")
    common.add_argument("--seed", type=int, default=0, help="seed of the requests' lengths and arrivals (and noise)")
    common.add_argument("--json", action="store_true", help="print one line of JSON, no progress bars")
    shed = common.add_mutually_exclusive_group()
    shed.add_argument("--shed", dest="shed", action="store_true", default=None,
                      help="every policy in the call rejects a request whose prefill has not started once it can "
                           "no longer meet its TTFT (counted as a miss)")
    shed.add_argument("--no-shed", dest="shed", action="store_false",
                      help="no policy in the call sheds (default: each policy's own default, on only for planned)")
    r = sub.add_parser("run", parents=[common], help="simulate one policy at one rate")
    r.add_argument("--policy", default="tropical",
                   help="a policy with optional knobs (planned, tropical:prefer=multiplex, ...) or a baseline's "
                        "name (" + ", ".join(BASELINES) + "); default tropical")
    r.add_argument("--rate", type=float, required=True, help="mean arrival rate (requests/s)")
    r.add_argument("--requests-out", metavar="FILE.jsonl", help="write every request's outcome, one JSON per line")
    r.add_argument("--decisions-out", metavar="FILE.jsonl", help="write every dispatch decision with its reason")
    b = sub.add_parser("bound", parents=[common], help="the most req/s any policy could serve within SLO")
    b.add_argument("--window", action="store_true",
                   help="also the window bound: the highest rate at which a linear program over this very trace "
                        "(--seed, --num-requests) serves --target of it within each request's TTFT and TPOT time "
                        "(tighter where arrivals bunch; a few seconds per rate tried)")
    b.add_argument("--class-floor", type=float, metavar="F",
                   help="with --window: every prompt-length class must be served at least this fraction (0.8: "
                        "no class above 20%% misses)")
    b.add_argument("--target", type=float, default=0.9, help="SLO attainment the bounds are for (default 0.9)")
    g = sub.add_parser("goodput", parents=[common], help="bisect each policy's goodput")
    g.add_argument("--policies", default="tropical,colocated,chunked,disaggregated",
                   help="comma-separated policies (knobs after a colon) or baseline names; 'baselines' adds "
                        "every named baseline")
    g.add_argument("--target", type=float, default=0.9, help="SLO attainment the goodput must reach (default 0.9)")
    g.add_argument("--seeds", type=int, default=1, help="average attainment over this many seeds per rate")
    g.add_argument("--rate-lo", type=float, default=0.1,
                   help="lower end of the rate bracket (req/s; halved while it misses the target)")
    g.add_argument("--rate-hi", type=float, default=1.0,
                   help="upper end of the rate bracket (req/s; doubled while it meets the target)")
    g.add_argument("--plot", metavar="FILE.png", help="attainment against rate, with the target line")
    g.add_argument("--early-stop", action="store_true",
                   help="stop runs that certainly miss the target (faster; the curve is then a lower bound there)")
    g.add_argument("--jobs", type=int, default=min(3, os.cpu_count() or 1),
                   help="processes: beside the rate the search asks for, run the rates it asks for next on either "
                        "outcome (same points and answer as one process, less wall time; default: the CPUs, at "
                        "most 3)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = {"run": cmd_run, "goodput": cmd_goodput, "bound": cmd_bound}[args.command](args)
    except (ProfileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    return 0
