"""Where does the simulator predict a win on this machine? A sweep of scaled workloads (docs/benchmarks.md, engine_slo).

    python -m bench.engine_slo.workloads --profile-from RUN.json --out SWEEP.json
        [--cvs 1,1.5,2,2.5,3] [--input-scales 0.015625,0.03125] [--tpot-scales 6] [--ttft-scale 10]

The real engine is slow to benchmark (bench.engine_slo: ~30 min a run on two CPU cores), the
simulator is not: this runs the simulator's goodput search for every policy on the calibrated profile a
real run measured (its `profile.used`; SLOs scaled from the profile as measured, as that run did), for each arrival burstiness (Gamma CV; CV 1 is Poisson), input
scale and TPOT-SLO scale, with the same scaled workload and policy knobs as bench.engine_slo. It
prints JSON and plots planned's and tropical's goodput over the best baseline's, so the workload a real
run is made on is chosen in the open, with the ones where no win is predicted beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .sim import ENGINE, policy_text, sim_goodput, slo_batch, tpot_slo_for
from .report import BASELINES, POLICIES, command_line

from tropical_jax.engine.build import engine_policy
from tropical_jax.config import EngineConfig
from tropical_jax.sched.cost_model import CostModel

def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def predict(args, cost, slo_cost, cfg, cv: float, input_scale: float, tpot_scale: float) -> dict:
    """Every policy's simulated goodput on one scaled workload, and the ratios to the best baseline."""
    wl = argparse.Namespace(**{**vars(args), "arrival": "poisson" if cv == 1 else "gamma", "cv": cv,
                               "input_scale": input_scale})
    tpot_slo, _ = tpot_slo_for(slo_cost, cfg, tpot_scale)
    gp = {name: sim_goodput(wl, cluster, engine_policy(policy_text(name, wl), cfg), cost, slo_cost, tpot_slo,
                            0.5, 4.0)[0]
          for name, cluster in POLICIES}
    best = max(BASELINES, key=gp.get)
    return {"cv": cv, "input_scale": input_scale, "tpot_scale": tpot_scale, "tpot_slo_s": tpot_slo,
            "goodput_sim": gp, "best_baseline": best,
            "ratio": {n: gp[n] / gp[best] if gp[best] else None for n in ("planned", "tropical")}}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({(p["input_scale"], p["tpot_scale"]) for p in out["predictions"]})
    for (scale, tpot), style in zip(groups, itertools.cycle(["-", "--", ":", "-."])):
        pts = sorted((p for p in out["predictions"] if (p["input_scale"], p["tpot_scale"]) == (scale, tpot)),
                     key=lambda p: p["cv"])
        label = f"inputs x 1/{round(1 / scale)}, TPOT SLO {tpot:g} x step"
        for name, color in (("planned", "C0"), ("tropical", "C1")):
            ax.plot([p["cv"] for p in pts], [p["ratio"][name] or 0 for p in pts], style, c=color, marker="o",
                    label=f"{name}, {label}")
    ax.axhline(1.3, ls=":", c="gray", lw=1)
    ax.set_xlabel("arrival burstiness: Gamma CV of inter-arrival times (1 = Poisson)")
    ax.set_ylabel("simulated goodput / best baseline's")
    ax.set_title("simulator on the calibrated CPU profile: where a win is predicted", fontsize=10)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_slo.workloads", description=__doc__.splitlines()[0])
    ap.add_argument("--profile-from", required=True,
                    help="a bench.engine_slo run's result (not a pooled one): its calibrated profile is simulated")
    ap.add_argument("--workload", default="mooncake-conversation")
    ap.add_argument("--cvs", default="1,1.5,2,2.5,3")
    ap.add_argument("--input-scales", default=f"{1 / 64},{1 / 32}")
    ap.add_argument("--tpot-scales", default="6")
    ap.add_argument("--ttft-scale", type=float, default=10.0)
    ap.add_argument("--output-scale", type=float, default=1 / 16)
    ap.add_argument("--max-output-len", type=int, default=48)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--sim-requests", type=int, default=1000)
    ap.add_argument("--sim-seeds", type=int, default=6)
    ap.add_argument("--prefill-seqs", type=int, default=1,
                    help="max_prefill_seqs of every policy (prompts packed into one prefill step), as bench.engine_slo")
    ap.add_argument("--out", required=True, help="write the sweep here (JSON, and a PNG beside it)")
    args = ap.parse_args(argv)
    args.shed, args.handoff_guard = True, False  # as bench.engine_slo runs them by default
    t0 = time.time()

    source = json.loads(Path(args.profile_from).read_text())
    cost = CostModel.from_json(source["profile"]["used"])
    slo_cost = CostModel.from_json(source["profile"]["measured_profile"])
    cfg = EngineConfig(**ENGINE)
    grid = list(itertools.product(floats(args.cvs), floats(args.input_scales), floats(args.tpot_scales)))
    preds = [predict(args, cost, slo_cost, cfg, *g) for g in tqdm(grid, desc="simulated workloads", unit="workload")]
    out = {"benchmark": "bench.engine_slo.workloads", "command": command_line("bench.engine_slo.workloads"),
           "profile_from": args.profile_from, "profile_machine": source["machine"],
           "workload": {"trace": args.workload, "output_scale": args.output_scale, "output_cap": args.max_output_len,
                        "input_cap": ENGINE["max_model_len"] - args.max_output_len - 1,
                        "requests_per_seed": args.sim_requests, "seeds": args.sim_seeds},
           "prefill_packing": args.prefill_seqs,
           "slo": {"ttft": f"{args.ttft_scale} x the request's isolated prefill time (measured profile)",
                   "tpot": f"tpot_scale x the measured decode step at batch {slo_batch(cfg)}"},
           "predictions": preds, "wall_s": round(time.time() - t0, 1)}
    path = Path(args.out)
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(json.dumps([{k: p[k] for k in ("cv", "input_scale", "tpot_scale", "best_baseline")}
                      | {n: round(p["ratio"][n] or 0, 2) for n in ("planned", "tropical")}
                      for p in preds], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
