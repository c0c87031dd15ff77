"""What coarse buckets cost at run time on CPU, beside the fine set, in one process.

    python -m bench.bucket_price [--reps 15] [--rounds 6]

A step is padded to its buckets: a decode batch of 3 runs as one of 8 under the coarse set (4 under the
fine), a 100-token prompt as a chunk of 256 (128), and every step compiles for the one 1024-token
context bucket (256, 512 or 1024). For each workload below, every bucket set's steps are timed on the
embedded default model with the engine's defaults (max-model-len 1024, max-num-seqs 32,
max-chunk-tokens 256): the steps the set pads the workload to, every decode row live
(runtime.executor.full_inputs: a padding row costs what a live one does) and the chunk holding the
prompt's tokens where they sit in the sequence, padding after them (attention reads the context the
chunk's tokens see, not the whole bucket), median of --reps calls, the fastest of --rounds rounds that
alternate the sets (so a drift of the machine's speed reaches all of them). Beside that, each set's
step executables and what compiling them costs here (the median compile of the steps timed, times their
number), and the machine's load averages before and after (other jobs skew timings). Prints the JSON and
writes bench/results/bucket_price.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# The sets compared: the engine's two, and alternatives to the coarse one (its other sizes kept).
SETS = {
    "fine": {"bucket_set": "fine"},
    "coarse": {"bucket_set": "coarse"},
    "coarse, chunks 32, 256": {"bucket_set": "coarse", "chunk_buckets": (32, 256)},
    "coarse, chunks 32, 128, 256": {"bucket_set": "coarse", "chunk_buckets": (32, 128, 256)},
    "coarse, batches 1, 2, 8, 32": {"bucket_set": "coarse", "batch_buckets": (1, 2, 8, 32)},
    "coarse, contexts 256, 1024": {"bucket_set": "coarse", "context_buckets": (256, 1024)},
}
# (prompt tokens prefilled in the workload, decode rows, their context in tokens): a prompt alone runs in
# chunks of the largest chunk bucket; with decode rows, it rides in one mixed step beside them.
WORKLOADS = [(0, b, 128) for b in (1, 2, 3, 4, 8, 16, 32)] + [(0, 1, 900), (0, 8, 900)] \
    + [(n, 0, 0) for n in (8, 40, 100, 256, 600)] + [(8, 4, 128), (40, 16, 128), (200, 30, 128)]
# One request alone, end to end: its prompt's steps, then this many decode steps of one row.
REQUEST = ((40, 0, 0), 100, (0, 1, 128))


def label(prompt: int, rows: int, context: int) -> str:
    parts = [f"{prompt}-token prompt"] if prompt else []
    return " + ".join(parts + ([f"decode {rows} x {context} tokens"] if rows else []))


def steps_of(cfg, prompt: int, rows: int, context: int) -> list[tuple]:
    """The (chunk bucket, batch bucket, context pages, decode tokens, chunk start, chunk tokens) steps
    `cfg` pads a workload to."""
    from tropical_jax.runtime.executor import prompt_steps, smallest_bucket

    pages = lambda tokens: smallest_bucket(cfg.context_pages, -(-tokens // cfg.page_size))  # noqa: E731
    batch = smallest_bucket(cfg.batch_sizes, rows) if rows else 0
    if not prompt:
        return [(0, batch, pages(context), context, 0, 0)]
    if rows:
        return [(smallest_bucket(cfg.chunk_sizes, prompt), batch, pages(max(prompt, context)), context, 0, prompt)]
    return [(c, 0, p, None, start, n) for c, p, (start, n) in prompt_steps(cfg, prompt)]


def run_step(ex, c, b, p, decode_tokens, chunk_start, chunk_tokens):
    """One step: decode rows as executor.full_inputs makes them, the chunk holding `chunk_tokens`
    tokens from `chunk_start` on."""
    return ex.time_step(c, b, p, decode_tokens, (chunk_start, chunk_tokens) if c else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed calls of each step (their median is kept)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds over every step (the fastest is kept)")
    a = ap.parse_args(argv)

    import jax.numpy as jnp

    from bench.machine import describe
    from tropical_jax.cluster.profile import median_ms
    from tropical_jax.config import EngineConfig
    from tropical_jax.model.loader import load_model
    from tropical_jax.runtime.executor import ModelExecutor, step_shapes

    configs = {name: EngineConfig(compilation_cache_dir=None, **sizes) for name, sizes in SETS.items()}
    model_cfg, graphdef, params, _ = load_model(None, jnp.float32, None, with_tokenizer=False)
    # One executor runs every set's steps: a shape outside its own buckets compiles when first run.
    ex = ModelExecutor(model_cfg, graphdef, params, configs["fine"])
    load_before = os.getloadavg()
    plans = {name: [steps_of(cfg, *w) for w in WORKLOADS] for name, cfg in configs.items()}
    steps = sorted({s for plan in plans.values() for w in plan for s in w}, key=str)
    compile_s = {}
    for s in steps:
        start = time.perf_counter()
        run_step(ex, *s)
        compile_s[s] = time.perf_counter() - start
    best = {s: float("inf") for s in steps}
    for _ in range(a.rounds):
        for s in steps:
            best[s] = min(best[s], median_ms(lambda: run_step(ex, *s), a.reps))
    per_compile = statistics.median(compile_s.values())
    result = {
        "command": "python -m bench.bucket_price" + (f" --reps {a.reps}" if a.reps != 15 else "")
                   + (f" --rounds {a.rounds}" if a.rounds != 6 else ""),
        "machine": describe(), "model": "the embedded default (4 layers x 256, float32)",
        "engine": {k: getattr(configs["fine"], k)
                   for k in ("max_model_len", "page_size", "max_num_seqs", "max_chunk_tokens")},
        "median_compile_s": round(per_compile, 2),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "sets": {name: {"chunk": list(cfg.chunk_sizes), "batch": list(cfg.batch_sizes),
                        "context_tokens": [p * cfg.page_size for p in cfg.context_pages],
                        "step_executables": len(step_shapes(cfg)),
                        "compile_s_estimate": round(len(step_shapes(cfg)) * per_compile, 1)}
                 for name, cfg in configs.items()},
        "workloads": [{"workload": label(*w),
                       **{name: {"steps": [list(s) for s in plans[name][i]],
                                 "ms": round(sum(best[s] for s in plans[name][i]), 2)} for name in configs}}
                      for i, w in enumerate(WORKLOADS)],
    }
    prompt, tokens, decode = (WORKLOADS.index(w) if isinstance(w, tuple) else w for w in REQUEST)
    result["workloads"].append({"workload": f"one request alone: {label(*REQUEST[0])}, then {tokens} tokens", **{
        name: {"ms": round(result["workloads"][prompt][name]["ms"] + tokens * result["workloads"][decode][name]["ms"],
                           1)} for name in configs}})
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bucket_price.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "bucket_price.md").write_text(markdown(result))
    return 0


def markdown(result: dict) -> str:
    names = list(result["sets"])
    head = ["| workload | " + " | ".join(f"{n} (ms)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    rows = []
    for w in result["workloads"]:
        fine = w["fine"]["ms"]
        rows.append(f"| {w['workload']} | " + " | ".join(
            f"{w[n]['ms']:.2f}" + ("" if n == "fine" else f" ({w[n]['ms'] / fine:.2f}x)") for n in names) + " |")
    sets = [f"- **{n}**: chunks {s['chunk']}, batches {s['batch']}, contexts {s['context_tokens']} tokens: "
            f"{s['step_executables']} step executables, about {s['compile_s_estimate']} s of compiling"
            for n, s in result["sets"].items()]
    m = result["machine"]
    return "\n".join([f"    {result['command']}", "",
                      "# The run-time price of coarse buckets (CPU)", "",
                      f"Machine: {m['cpu']}, {m['cpus']} cores, JAX {m['jax']} on {m['backend']}. Model: "
                      f"{result['model']}, the engine's default limits. Load averages (1, 5, 15 min) "
                      f"{', '.join(f'{x:.1f}' for x in result['load_average_before'])} before, "
                      f"{', '.join(f'{x:.1f}' for x in result['load_average_after'])} after. Each workload's "
                      "steps as each set pads them (every decode row live, a prompt's chunk holding its tokens "
                      "where they sit), median of the timed calls, fastest of the rounds (ratios: to the "
                      f"fine set). Compiling: the median compile of these steps here ({result['median_compile_s']}"
                      " s) times the set's step executables.", "", *sets, "", *head, *rows, ""])


if __name__ == "__main__":
    sys.exit(main())
