"""The engine's steps with the attention code of another git revision against the working tree's, side by side.

    python -m bench.attention_ab --rev HEAD~1 [--configs default-5M,llama-55M] [--out bench/results/F.json]

Two executors on the same weights in one process: one with `tropical_jax/model/attention.py` as it is at
`--rev`, one with the working tree's. Their steps (decode at batch 8 and 32 with 84 tokens of context, a
128-token prefill chunk, a mixed step) are timed in alternation, rounds apart by milliseconds, so the
machine's drift cancels out of the ratio. Prints JSON (per shape: best ms of each, old / new) stating the
machine; the sampled tokens of both must agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from bench.machine import describe
from bench.steps import CONFIGS, SHAPES, context_pages, executor, mean_ms, save_hf

ROOT = Path(__file__).resolve().parents[1]


def attention_at(rev: str):
    """The attention module as it is at git revision `rev` (its imports resolve against the working tree)."""
    source = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{rev}:tropical_jax/model/attention.py"])
    module = types.ModuleType(f"tropical_jax.model.attention_at_{rev}")
    module.__package__ = "tropical_jax.model"
    exec(compile(source, f"{rev}:attention.py", "exec"), module.__dict__)
    return module


def compare(path, old_attention, new_attention, rounds: int, reps: int) -> dict:
    old, new = executor(path, old_attention), executor(path, new_attention)
    rows = {}
    for name, (c, b, tokens) in SHAPES.items():
        p = context_pages(old, tokens or c)
        best = {"old": float("inf"), "new": float("inf")}
        for _ in range(rounds):
            for who, ex in (("old", old), ("new", new)):
                best[who] = min(best[who], mean_ms(ex, c, b, p, tokens, reps))
        same = np.array_equal(old.time_step(c, b, p, tokens), new.time_step(c, b, p, tokens))
        rows[name] = {"old_ms": round(best["old"], 3), "new_ms": round(best["new"], 3),
                      "old_over_new": round(best["old"] / best["new"], 3), "same_tokens": bool(same)}
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(prog="python -m bench.attention_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="git revision whose attention.py is 'old'")
    ap.add_argument("--configs", default="default-5M,llama-55M")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import tropical_jax.model.attention as working_tree

    rev = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev], text=True).strip()
    old = attention_at(rev)
    result = {"benchmark": "attention_ab", "machine": describe(), "old": rev, "new": "working tree",
              "note": "best of rounds x reps calls, old and new alternating; full steps (every row live)",
              "configs": {}}
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as d:
            save_hf(CONFIGS[name], d)
            result["configs"][name] = compare(d, old, working_tree, args.rounds, args.reps)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
