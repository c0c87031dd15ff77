"""`planned` against `tropical` on settings outside bench/beyond_paper.py's matrix, and what evening out
planned's misses over prompt lengths costs (simulator).

    nice -n 10 python -m bench.beyond_matrix

Each comparison is one `sim goodput` search per policy (one seed, 1,000 requests, shedding on for both).
The sweep searches `planned:protect_tokens=N` on Mooncake conversation (inputs capped at 32k, seed 0, 2,000
requests, shedding on) and runs the found goodput again for its misses by prompt length. The simulator is
deterministic: the command regenerates bench/results/beyond_matrix.{md,json,png} with the same numbers on
any machine.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from bench.machine import cpu_model
from tropical_jax.sim.cli import build_parser, cmd_goodput, cmd_run

MOONCAKE = ["--workload", "mooncake-conversation", "--profile", "a100-internlm2.5-20b-tp2"]
LLAMA70 = ["--profile", "a100-llama2-70b-tp4"]
# name -> the flags of `sim goodput` beside the policies and the shared ones below
SETTINGS = {
    "humaneval, Llama-2-70B": ["--workload", "humaneval", *LLAMA70],
    "mooncake-synthetic, InternLM2.5-20B, seed 0": ["--workload", "mooncake-synthetic", *MOONCAKE[2:]],
    "mooncake-synthetic, InternLM2.5-20B, seed 1": ["--workload", "mooncake-synthetic", *MOONCAKE[2:], "--seed", "1"],
    "mooncake-synthetic, InternLM2.5-20B, seed 3": ["--workload", "mooncake-synthetic", *MOONCAKE[2:], "--seed", "3"],
    "mooncake-synthetic, Llama-2-70B, inputs <= 4096": ["--workload", "mooncake-synthetic", *LLAMA70,
                                                        "--max-input-len", "4096"],
    "azure-conv, Llama-2-70B, the trace's arrival times": ["--workload", "azure-conv", *LLAMA70, "--arrival", "trace"],
    "mooncake-conversation <= 32k, Gamma CV 4": [*MOONCAKE, "--max-input-len", "32768", "--arrival", "gamma",
                                                 "--cv", "4"],
}
SHARED = ["--num-requests", "1000", "--shed", "--jobs", "1", "--json"]
SWEEP = ["none", "32768", "24576", "16384", "8192"]
SWEEP_FLAGS = [*MOONCAKE, "--max-input-len", "32768", "--shed", "--cluster", "1P1M", "--json"]


def compare(flags: list[str]) -> dict:
    out = cmd_goodput(build_parser().parse_args(["goodput", *flags, *SHARED, "--policies", "tropical,planned"]))
    return {p: r["goodput"] for p, r in out["policies"].items()}


def sweep_point(protect: str) -> dict:
    policy = f"planned:protect_tokens={protect}"
    found = cmd_goodput(build_parser().parse_args(["goodput", *SWEEP_FLAGS, "--policies", policy, "--rate-lo", "0.4",
                                                   "--rate-hi", "1.2", "--early-stop", "--jobs", "1"]))
    rate = found["policies"][policy]["goodput"]
    run = cmd_run(build_parser().parse_args(["run", *SWEEP_FLAGS, "--policy", policy, "--rate", str(rate)]))
    return {"protect_tokens": protect, "goodput": rate, "attainment": run["attainment"],
            "miss_rate_by_length": {k: v["miss_rate"] for k, v in run["misses_by_length"].items()}}


def markdown(out: dict) -> str:
    lines = ["    nice -n 10 python -m bench.beyond_matrix", "", "# `planned` beyond the matrix (simulator)", "",
             f"Machine: {out['machine']} (the simulator's results do not depend on it). One seed, 1,000 requests, "
             "shedding on for both policies; goodput = highest rate with SLO attainment >= 90%.", "",
             "| setting | planned (req/s) | tropical (req/s) | planned / tropical |", "|---|---|---|---|"]
    for name, g in out["settings"].items():
        lines.append(f"| {name} | {g['planned']:.3f} | {g['tropical']:.3f} | {g['planned'] / g['tropical']:.2f} |")
    lines += ["", "What evening out planned's misses over prompt lengths costs: `planned:protect_tokens=N` on "
              "mooncake-conversation (inputs <= 32k, InternLM2.5-20B TP2, seed 0, 2,000 requests, shedding on), "
              "its goodput and the misses by prompt length when run at it.", "",
              "| protect_tokens | goodput (req/s) | misses <2k / 2-8k / 8-16k / >=16k |", "|---|---|---|"]
    for p in out["sweep"]:
        misses = " / ".join(f"{100 * p['miss_rate_by_length'][c]:.0f}%" for c in p["miss_rate_by_length"])
        lines.append(f"| {p['protect_tokens']} | {p['goodput']:.3f} | {misses} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["settings"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ratios = [out["settings"][n]["planned"] / out["settings"][n]["tropical"] for n in names]
    ax.barh(range(len(names)), ratios)
    ax.axvline(1.0, c="gray", ls="--", lw=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("goodput, planned / tropical")
    ax.set_title("planned against the paper's rules beyond the matrix (simulator)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="bench/results", help="output folder")
    a = ap.parse_args(argv)
    out = {"command": "nice -n 10 python -m bench.beyond_matrix", "machine": f"{cpu_model()}, {platform.platform()}",
           "settings": {}, "sweep": []}
    for name, flags in SETTINGS.items():
        out["settings"][name] = compare(flags)
        print(name, out["settings"][name], flush=True)
    for protect in SWEEP:
        out["sweep"].append(sweep_point(protect))
        print(out["sweep"][-1], flush=True)
    results = Path(a.results)
    (results / "beyond_matrix.json").write_text(json.dumps(out, indent=1) + "\n")
    (results / "beyond_matrix.md").write_text(markdown(out))
    plot(out, results / "beyond_matrix.png")


if __name__ == "__main__":
    main()
