"""Pool several bench.engine_slo runs of one workload (other seeds) into one report.

    python -m bench.engine_slo.pool bench/results/A.json bench/results/B.json [--out bench/results/POOL.json]

A run of ~6 seeds takes 20 minutes on two CPU cores, and a goodput read off so few bursty (Gamma CV 2) seeds
moves by tens of percent from run to run. Runs that served the same workload — the same SLOs (so the same
measured profile), trace scaling, arrivals, target and policies — on disjoint seeds are one experiment cut in
pieces: this joins their per-seed curves at the rates they all tried and reports what report.py reports
for one run (each policy's curve averaged over the seeds and its goodput, beside the simulator's replays of the
same requests; ours against each baseline seed by seed, with the goodput ratio's spread over the seeds), the
simulator's replay errors summed over the runs, and a plot. Runs that differ in any of that are refused, with the
field named.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .report import BASELINES, ERROR_KEYS, OURS, command_line, crossing, label, paired, per_seed_curves

# What must agree between runs for their seeds to be samples of one workload.
SAME = ("slo", "target", "prefill_packing", "shed", "speed_blocks", "engine")
SAME_WORKLOAD = ("trace", "arrival", "input_scale", "output_scale", "input_cap", "output_cap",
                 "seconds_of_arrivals_per_run")


# Options of bench.engine_slo that choose which seeds and rates run, where the result goes and whether the profile is
# measured again (the SLOs, compared apart, say whether it changed): every other option must be the same. The runs
# are pooled at the rates they share.
PER_RUN_OPTIONS = {"--seeds": 1, "--first-seed": 1, "--rates": 1, "--out": 1, "--reprofile": 0}


def workload_options(command: str) -> list[str]:
    """bench.engine_slo's options without PER_RUN_OPTIONS (`--opt value` or `--opt=value`); what runs them (`python
    -m bench.engine_slo`, or a path to the script) is left out."""
    words = command.split()
    words, kept, i = words[next((j for j, w in enumerate(words) if w.startswith("--")), len(words)):], [], 0
    while i < len(words):
        name = words[i].split("=")[0]
        if name in PER_RUN_OPTIONS:
            i += 1 + (PER_RUN_OPTIONS[name] if "=" not in words[i] else 0)
            continue
        kept.append(words[i])
        i += 1
    return kept


def check_compatible(results: list[dict]) -> None:
    """Raise ValueError naming the first field in which a run differs from the first, or a seed two runs share."""
    first = results[0]
    for i, out in enumerate(results[1:], 1):
        if workload_options(out["command"]) != workload_options(first["command"]):
            raise ValueError(f"run {i} differs from run 0 in its options: {' '.join(workload_options(out['command']))}"
                             f" != {' '.join(workload_options(first['command']))}")
        for key in SAME:
            if out.get(key) != first.get(key):
                raise ValueError(f"run {i} differs from run 0 in {key!r}: {out.get(key)!r} != {first.get(key)!r}")
        for key in SAME_WORKLOAD:
            if out["workload"].get(key) != first["workload"].get(key):
                raise ValueError(f"run {i} differs from run 0 in workload {key!r}: "
                                 f"{out['workload'].get(key)!r} != {first['workload'].get(key)!r}")
        clusters = ({n: p["cluster"] for n, p in r["policies"].items()} for r in (out, first))
        if next(clusters) != next(clusters):
            raise ValueError(f"run {i} ran other policies or clusters than run 0")
    seen: dict[int, int] = {}
    for i, out in enumerate(results):
        for s in {x["seed"] for p in out["policies"].values() for run in p["runs"] for x in run.get("per_seed", [])}:
            if s in seen:
                raise ValueError(f"seed {s} is in run {seen[s]} and run {i}: pooled seeds must be distinct")
            seen[s] = i


def shared_rates(results: list[dict]) -> list[float]:
    """The rates every run tried (at least two: a goodput is read between them)."""
    rates = sorted(set.intersection(*(set(out["rates"]) for out in results)))
    if len(rates) < 2:
        raise ValueError(f"the runs share fewer than two rates ({rates}): " +
                         "; ".join(f"run {i}: {out['rates']}" for i, out in enumerate(results)))
    return rates


def ratio(a, b):
    return a / b if a and b else None


def pool(results: list[dict], sources: list[str]) -> dict:
    """One report over the runs' seeds (see the module docstring)."""
    check_compatible(results)
    first = results[0]
    rates, target = shared_rates(results), first["target"]
    policies = {}
    for name, p in first["policies"].items():
        at = [{run["rate"]: run for run in out["policies"][name]["runs"]} for out in results]
        runs = [{"rate": rate, "per_seed": [x for runs_at in at for x in runs_at[rate]["per_seed"]]} for rate in rates]
        curve = [(run["rate"], float(np.mean([x["attainment"] for x in run["per_seed"]]))) for run in runs]
        # The simulator's replays of the same requests, each run's weighted by the requests it served.
        replayed = [(rate, float(np.average([runs_at[rate]["sim_replay"]["attainment"] for runs_at in at],
                                            weights=[runs_at[rate]["requests"] for runs_at in at])))
                    for rate in rates]
        g, g_sim = crossing(curve, target), crossing(replayed, target)
        policies[name] = {"cluster": p["cluster"], "runs": runs, "attainment_seed_mean": [a for _, a in curve],
                          "goodput_real": g, "goodput_real_label": label(g, rates),
                          "attainment_sim_replay": [a for _, a in replayed],
                          "goodput_sim_replay": g_sim, "goodput_sim_replay_label": label(g_sim, rates),
                          "goodput_sim_per_run": [out["policies"][name]["goodput_sim"] for out in results]}
    within = {k: sum(out["summary"]["within_25pct"][k] for out in results) for k in ERROR_KEYS}
    errors = [abs(run["rel_error"][k]) for out in results for p in out["policies"].values() for run in p["runs"]
              for k in ERROR_KEYS if run["rel_error"][k] is not None]
    return {"benchmark": "bench.engine_slo.pool", "command": command_line("bench.engine_slo.pool"), "sources": sources,
            "seeds": sorted({s for p in policies.values() for s in per_seed_curves(p)}),
            "machine": first["machine"], "slo": first["slo"], "workload": first["workload"], "rates": rates,
            "rates_left_out": {src: [r for r in out["rates"] if r not in rates] for src, out in zip(sources, results)},
            "target": target, "policies": policies,
            "summary": {"paired": paired({"rates": rates, "target": target, "policies": policies}),
                        "goodput_ratio_real_vs_sim_replay": {
                            f"{ours} vs {base}": [ratio(policies[ours]["goodput_real"], policies[base]["goodput_real"]),
                                                  ratio(policies[ours]["goodput_sim_replay"],
                                                        policies[base]["goodput_sim_replay"])]
                            for ours in OURS if ours in policies for base in BASELINES if base in policies},
                        "sim_within_25pct": within,
                        "sim_points": sum(out["summary"]["runs"] for out in results),
                        "sim_median_abs_rel_error_all_keys": float(np.median(errors)) if errors else None}}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import POLICIES

    colors = {name: f"C{i}" for i, (name, _) in enumerate(POLICIES)}  # the colours of engine_slo's plots
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, p in out["policies"].items():
        by_seed = per_seed_curves(p)
        for curve in by_seed.values():  # each seed faint, so the spread the mean hides stays in view
            ax.plot(out["rates"], [a for _, a in curve], "-", c=colors[name], alpha=0.12, lw=1)
        ax.plot(out["rates"], p["attainment_seed_mean"], "o-", c=colors[name], lw=2,
                label=f"{name} ({p['cluster']}): goodput {p['goodput_real_label']} (mean of {len(by_seed)} seeds)")
    ax.axhline(out["target"], ls=":", c="gray", lw=1)
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("SLO attainment, real engine")
    ax.set_title(f"{len(out['sources'])} runs pooled: {out['workload']['trace']} scaled, default model", fontsize=10)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_slo.pool", description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="bench.engine_slo result files of one workload")
    ap.add_argument("--out", help="write the pooled report here (JSON, and a PNG beside it)")
    args = ap.parse_args(argv)
    out = pool([json.loads(Path(f).read_text()) for f in args.results], args.results)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        plot(out, Path(args.out).with_suffix(".png"))
    goodputs = {n: p["goodput_real_label"] for n, p in out["policies"].items()}
    print(json.dumps({"seeds": out["seeds"], "goodput": goodputs, **out["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
