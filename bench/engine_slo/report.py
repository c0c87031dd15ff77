"""How bench.engine_slo reports a run: its policy lineup, each policy's goodput from the real curve,
the summary against the best baseline and the simulator's errors, the plot. Works from a result's stored
runs alone (`python -m bench.engine_slo --resummarize FILE`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

POLICIES = [("tropical", "1P1M"), ("planned", "1P1M"), ("colocated", "2C"), ("chunked", "2C"),
            ("disaggregated", "1P1D"), ("planned-static", "1P1M")]
# Variants: a name -> (the policy it runs, the knobs it adds). planned-static plans with the profile as given.
VARIANTS = {"planned-static": ("planned", "recalibrate_steps=0")}
OURS = ("tropical", "planned", "planned-static")
BASELINES = ("colocated", "chunked", "disaggregated")


def command_line(module: str) -> str:
    """The command this process runs, as a result records it (and as its .md states it)."""
    return " ".join(["python -m", module, *sys.argv[1:]])


def p90s(s: dict) -> dict:
    return {k: s[k] for k in ("attainment", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "rejected",
                              "inline_fraction")}


def rel_err(sim, real):
    return None if sim is None or real in (None, 0) else (sim - real) / real


ERROR_KEYS = ("ttft_p90", "tpot_p90", "attainment")  # what the simulator's replay is compared on


def crossing(curve, target: float):
    """Goodput from a measured curve, as docs/algorithm.md (Metrics and goodput) defines it: the highest rate
    whose attainment meets the target, linearly interpolated toward the next rate (which misses it). None when
    no rate meets it. A real curve is not monotone (each rate draws its own bursts): a miss at a lower rate
    does not cap the goodput, it is reported beside it (`dips`)."""
    meets = [i for i, (_, a) in enumerate(curve) if a >= target]
    if not meets:
        return None
    i = meets[-1]
    (r0, a0), after = curve[i], curve[i + 1:]
    if not after:
        return r0
    r1, a1 = after[0]
    return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)


def label(g, rates) -> str:
    """A goodput as read off a curve: below the lowest rate tried, at least the highest, or its value."""
    return f"<{rates[0]}" if g is None else f">={rates[-1]}" if g == rates[-1] else f"{g:.2f}"


def ratio_spread(mine: dict, theirs: dict, seeds: list, rates: list, target: float, draws: int = 2000) -> dict:
    """The goodput ratio ours / theirs on curves averaged over the seeds, and how far it moves when the seeds are
    drawn again with replacement (the same draw for both policies: they served the same requests): 5th, 50th and
    95th percentiles. A goodput off the curve is taken at its bound on our side of the ratio: ours missing every
    rate as 0, theirs missing every rate as the lowest rate; ours meeting every rate as the highest (a lower
    bound). Theirs meeting every rate, or both missing every rate, bounds nothing: such draws are counted
    (`undetermined`), not ratios."""
    ours = np.array([[a for _, a in mine[s]] for s in seeds])
    base = np.array([[a for _, a in theirs[s]] for s in seeds])

    def ratio(rows):
        g_ours = crossing(list(zip(rates, ours[rows].mean(0))), target)
        g_base = crossing(list(zip(rates, base[rows].mean(0))), target)
        if g_base == rates[-1] or (g_ours is None and g_base is None):
            return None
        return (g_ours or 0.0) / (g_base or rates[0])

    rng = np.random.default_rng(0)
    drawn = [ratio(rng.integers(0, len(seeds), len(seeds))) for _ in range(draws)]
    kept = [r for r in drawn if r is not None]
    point = ratio(np.arange(len(seeds)))
    return {"ratio": None if point is None else float(point), "undetermined": draws - len(kept), "draws": draws,
            **({f"p{q:02d}": float(np.percentile(kept, q)) for q in (5, 50, 95)} if kept else {})}


def per_seed_curves(policy: dict) -> dict:
    """A policy's result -> seed: [(rate, attainment)] over its runs' per-seed records."""
    by_seed = {}
    for run in policy["runs"]:
        for x in run.get("per_seed", []):
            by_seed.setdefault(x["seed"], []).append((run["rate"], x["attainment"]))
    return by_seed


def paired(out: dict) -> dict:
    """Each of ours against each baseline seed by seed: at a seed and rate both served the same requests minutes
    apart (bench.engine_slo interleaves them), so the machine's drift over a run cancels out of their difference.
    Per pair: attainment ours - theirs at every seed x rate (mean, wins / ties / losses), each seed's goodput
    on its own curve, both policies', and the goodput ratio's spread over the seeds (ratio_spread). With the
    simulator's curves on other seeds drawn like the real runs' (`sim_window_curves`), also the ratio it expects
    over all of them and the spread of runs with as many seeds as the real one (runs_of)."""
    pol, rates, target = out["policies"], out["rates"], out["target"]
    res = {}
    for ours in (n for n in OURS if n in pol):
        mine = per_seed_curves(pol[ours])
        for base in (n for n in BASELINES if n in pol):
            theirs = per_seed_curves(pol[base])
            seeds = sorted(set(mine) & set(theirs))
            diffs = [a - b for s in seeds for (_, a), (_, b) in zip(mine[s], theirs[s])]
            if not diffs:
                continue
            res[f"{ours} vs {base}"] = {
                "attainment_diff_mean": float(np.mean(diffs)),
                "wins_ties_losses": [sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)],
                "goodput_per_seed": {str(s): [label(crossing(mine[s], target), rates),
                                              label(crossing(theirs[s], target), rates)] for s in seeds},
                "goodput_ratio_over_seeds": ratio_spread(mine, theirs, seeds, rates, target)}
            sims = [{int(k): list(zip(rates, c)) for k, c in pol[n].get("sim_window_curves", {}).items()}
                    for n in (ours, base)]
            if sims[0] and sims[1]:  # what the simulator expects of such a run, and its spread over as many seeds
                res[f"{ours} vs {base}"]["sim_windows"] = {
                    "seeds": len(sims[0]), "over_all_seeds": ratio_spread(*sims, sorted(sims[0]), rates, target),
                    f"runs_of_{len(seeds)}_seeds": runs_of(*sims, len(seeds), rates, target)}
    return res


def runs_of(mine: dict, theirs: dict, k: int, rates: list, target: float, draws: int = 500) -> dict:
    """The goodput ratio a run of k seeds would read off its seed-averaged curves, over `draws` sets of k seeds
    drawn from mine / theirs (seed -> [(rate, attainment)], without replacement; at most all of them): 5th, 50th,
    95th percentiles."""
    rng, seeds = np.random.default_rng(1), sorted(mine)
    k = min(k, len(seeds))
    got = [ratio_spread(mine, theirs, list(rng.choice(seeds, k, replace=False)), rates, target, draws=0)["ratio"]
           for _ in range(draws)]
    kept = [g for g in got if g is not None]
    return {"undetermined": draws - len(kept), "draws": draws,
            **({f"p{q:02d}": float(np.percentile(kept, q)) for q in (5, 50, 95)} if kept else {})}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {name: f"C{i}" for i, (name, _) in enumerate(POLICIES)}  # one colour a policy in every run's plot
    for name, p in out["policies"].items():
        xs = [r["rate"] for r in p["runs"]]
        ax.plot(xs, [r["real"]["attainment"] for r in p["runs"]], "o-", c=colors[name],
                label=f"{name} ({p['cluster']}) real: goodput {p['goodput_real_label']}")
        ax.plot(xs, [r["sim_replay"]["attainment"] for r in p["runs"]], "x--", c=colors[name], alpha=0.7)
        if p.get("sim_window_curves"):
            ax.plot(xs, np.mean(list(p["sim_window_curves"].values()), axis=0), ":", c=colors[name], alpha=0.7)
    ax.axhline(out["target"], ls=":", c="gray", lw=1)
    nominal = str(out.get("speed_blocks", "")).startswith("time")
    ax.set_xlabel("arrival rate (req/s" + (", nominal: at the profile's speed)" if nominal else ")"))
    ax.set_ylabel("SLO attainment (solid: real engine, dashed: simulator replay,\ndotted: simulator on other seeds)")
    ax.set_title(f"real CPU engine vs simulator: {out['workload']['trace']} scaled, default model", fontsize=10)
    lowest = min(min(r["real"]["attainment"], r["sim_replay"]["attainment"]) for p in out["policies"].values()
                 for r in p["runs"])
    ax.set_ylim(max(0.0, lowest - 0.05), 1.02)  # flat curves near the target stay readable
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summarize_result(out: dict) -> None:
    """Each policy's real goodput (with its label and the rates below it that missed the target) and the
    summary: ratios to the best baseline, real and simulated, and the simulator's errors. From the stored runs
    alone, so --resummarize can redo it on a result file."""
    rates, target, pol = out["rates"], out["target"], out["policies"]
    for p in pol.values():
        curve = [(r["rate"], r["real"]["attainment"]) for r in p["runs"]]
        g = crossing(curve, target)
        p["goodput_real"] = g
        p["goodput_real_label"] = label(g, rates)
        p["dips"] = [] if g is None else [r for r, a in curve if a < target and r < g]
    base = [n for n in pol if n in BASELINES]
    best_real = max(base, key=lambda n: pol[n]["goodput_real"] or 0.0, default=None)
    best_sim = max(base, key=lambda n: pol[n]["goodput_sim"], default=None)
    def errors(key):
        return [r[key] for p in pol.values() for r in p["runs"] if key in r]

    def median_abs(errs):
        return {k: float(np.median([abs(e[k]) for e in errs if e[k] is not None])) for k in ERROR_KEYS}

    def within_25pct(errs):
        return {k: sum(abs(e[k]) <= 0.25 for e in errs if e[k] is not None) for k in ERROR_KEYS}

    errs, own = errors("rel_error"), errors("rel_error_run_speed")
    out["summary"] = {
        "goodput_definition": "the highest rate meeting the target, interpolated toward the next "
                              "(docs/algorithm.md, Metrics and goodput)",
        "best_baseline_real": best_real, "best_baseline_sim": best_sim,
        "ratio_real": {n: (pol[n]["goodput_real"] / pol[best_real]["goodput_real"]
                           if best_real and pol[n]["goodput_real"] and pol[best_real]["goodput_real"] else None)
                       for n in OURS if n in pol},
        "ratio_sim": {n: pol[n]["goodput_sim"] / pol[best_sim]["goodput_sim"]
                      for n in OURS if n in pol and best_sim and pol[best_sim]["goodput_sim"]},
        "median_abs_rel_error": median_abs(errs),
        "median_abs_rel_error_uncalibrated": median_abs(errors("rel_error_uncalibrated")),
        "within_25pct": within_25pct(errs),
        **({"within_25pct_run_speed": within_25pct(own), "median_abs_rel_error_run_speed": median_abs(own)}
           if own else {}),
        "runs": len(errs),
        "paired": paired(out),
    }


def headline(out: dict) -> dict:
    return {"machine": out["machine"], "slo": out["slo"], "rates": out["rates"], "summary": out["summary"],
            "speed_blocks": out.get("speed_blocks"),
            "goodput": {n: {"real": p["goodput_real_label"], "dips": p["dips"], "sim": round(p["goodput_sim"], 3)}
                        for n, p in out["policies"].items()}, "wall_s": out.get("wall_s")}


def save(out: dict, path: Path) -> None:
    """The result as JSON, its plot beside it (PNG), and its headline on stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(json.dumps(headline(out), indent=1))
