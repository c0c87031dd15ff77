"""How far could faster attention take batch-32 decode against transformers on this machine?

    python -m bench.decode_bound [--configs default-5M,llama-55M] [--out bench/results/F.json]

For each shape, on the same random weights in one process, each round runs all three after one another
(the best of the rounds is kept): transformers' greedy decode step at batch 32 (generate(1 + 64 tokens) -
generate(1), over 64: 32-token prompts, so the context runs 33-96 tokens), and two executors of ours
(best of reps): the batch-32 decode step as the engine runs it, and the same step with attention skipped
(its output replaced by the queries; projections, MLP, norms, KV writes, logits and sampling all kept).
The skipped step bounds every attention design from below, so transformers' step over it bounds the ratio
any attention could reach (device steps only: the engine loop's host work, about 0.5 ms a step, comes on
top of both of ours).
Our steps run at 40, 64 and 88 tokens of context, the mean standing for the 33-96 of transformers'.
Prints JSON stating the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from bench.machine import describe
from bench.steps import CONFIGS, SHAPES, context_pages, executor, hf_generate_s, mean_ms, save_hf
from tropical_jax.model import attention as engine_attention

BATCH, PROMPT, NEW_TOKENS, CONTEXTS = 32, 32, 64, (40, 64, 88)


def skip_attention(q, k, v, k_pool, v_pool, batch):
    """The step without attention: K/V still written, the output the queries themselves."""
    k_pool, v_pool = engine_attention.write_kv(k_pool, v_pool, k, v, batch)
    return q, k_pool, v_pool


SKIPPED = types.SimpleNamespace(get_backend=lambda _name: skip_attention)


def measure(path, hf, vocab: int, rounds: int, reps: int) -> dict:
    """Best ms of each decode step over rounds in which all of them run, one after another: transformers'
    (a generate pair per round) and ours at each context, with the engine's attention and skipped."""
    exs = {"engine": executor(path, engine_attention), "attention_skipped": executor(path, SKIPPED)}
    # executor() compiles its steps under the given attention for SHAPES, whose
    # batch-32 decode shares its context bucket with ours: a step of another bucket would trace the engine's.
    p = context_pages(exs["engine"], SHAPES["decode_b32_ctx84"][2])
    assert all(context_pages(ex, t) == p for t in CONTEXTS for ex in exs.values())
    tokens = [ex.time_step(0, BATCH, p, CONTEXTS[0]) for ex in exs.values()]
    assert not np.array_equal(*tokens), "the skipped executor samples what the engine does: attention was not skipped"
    prompts = np.random.default_rng(0).integers(0, vocab, (BATCH, PROMPT)).tolist()
    best = {who: {t: float("inf") for t in CONTEXTS} for who in exs}
    first = full = float("inf")
    for _ in range(rounds):
        first = min(first, hf_generate_s(hf, prompts, 1))
        full = min(full, hf_generate_s(hf, prompts, 1 + NEW_TOKENS))
        for t in CONTEXTS:
            for who, ex in exs.items():
                ex.time_step(0, BATCH, p, t)  # the other executor ran last: warm this one's pools again
                best[who][t] = min(best[who][t], mean_ms(ex, 0, BATCH, p, t, reps))
    ours = {who: {"by_context": {str(t): round(v, 3) for t, v in ms.items()},
                  "mean": round(float(np.mean(list(ms.values()))), 3)} for who, ms in best.items()}
    return {"transformers": round((full - first) / NEW_TOKENS * 1000, 3), **ours}


def bound(name: str, rounds: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        hf, n_params = save_hf(CONFIGS[name], d)
        ms = measure(d, hf, CONFIGS[name]["vocab_size"], rounds, reps)
    theirs, engine, skipped = ms["transformers"], ms["engine"]["mean"], ms["attention_skipped"]["mean"]
    row = {"params": n_params, "step_ms": ms, "attention_share_of_step": round(1 - skipped / engine, 3),
           "ratio_vs_transformers": round(theirs / engine, 2),
           "ratio_bound_attention_free": round(theirs / skipped, 2)}
    print(json.dumps({name: row}), file=sys.stderr, flush=True)
    return row


def plot(result: dict, path: str) -> None:
    """Step ms per shape: transformers', ours, ours without attention (the bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.8), squeeze=False)
    for ax, (name, row) in zip(axes[0], configs.items()):
        ms = row["step_ms"]
        bars = [ms["transformers"], ms["engine"]["mean"], ms["attention_skipped"]["mean"]]
        ax.bar(["transformers", "tropical_jax", "tropical_jax,\nattention skipped"], bars,
               color=["tab:orange", "tab:blue", "tab:gray"])
        ax.axhline(ms["transformers"] / 2, color="k", ls=":", lw=1, label="2x transformers")
        ax.set(title=f"{name}: {row['ratio_vs_transformers']}x now, at most {row['ratio_bound_attention_free']}x",
               ylabel="batch-32 decode step, ms")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu']}, {result['machine']['cpus']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(prog="python -m bench.decode_bound", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="default-5M,llama-55M")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"benchmark": "bench.decode_bound", "machine": describe(), "batch": BATCH,
              "note": "device steps of ours vs transformers' decode step, best of rounds that run all "
                      "of them in turn; ratio_bound_attention_free: transformers' step over ours "
                      "with attention skipped, the most any attention design could reach",
              "configs": {name: bound(name, args.rounds, args.reps) for name in args.configs.split(",")}}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        plot(result, str(Path(args.out).with_suffix(".png")))


if __name__ == "__main__":
    main()
