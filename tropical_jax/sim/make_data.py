"""Regenerate tropical_jax/data/ (compact workload traces) from the public traces.

    python -m tropical_jax.sim.make_data --source DIR

DIR holds the public files tropical_jax/data/README.md lists, laid out as mooncake/,
azure_llm_2023/, vidur/processed_traces/, humaneval/ and LICENSES/ (each source's licence file).

Keeps only what the simulator needs — arrival time (s), input and output lengths — as gzipped
CSV, and copies each source's licence; tropical_jax/data/README.md carries the attribution.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import shutil
from datetime import datetime
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data"


def _write(name: str, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arrival_s", "input_length", "output_length"])
    for t, i, o in rows:
        w.writerow([f"{t:.3f}" if t is not None else "", i, o])
    # mtime=0 keeps the file byte-identical across regenerations.
    with gzip.GzipFile(OUT / f"{name}.csv.gz", "wb", mtime=0) as f:
        f.write(buf.getvalue().encode())


def main():
    ap = argparse.ArgumentParser(description="Regenerate tropical_jax/data/ from the public traces.")
    ap.add_argument("--source", required=True, help="folder of the public trace files (see this module's docstring)")
    src = Path(ap.parse_args().source)
    OUT.mkdir(exist_ok=True)
    for name in ("conversation", "synthetic"):
        rows = [json.loads(l) for l in (src / "mooncake" / f"{name}_trace.jsonl").read_text().splitlines() if l]
        _write(f"mooncake_{name}", ((r["timestamp"] / 1000, r["input_length"], r["output_length"]) for r in rows))
    for name in ("code", "conv"):
        with open(src / "azure_llm_2023" / f"AzureLLMInferenceTrace_{name}.csv") as f:
            rows = list(csv.DictReader(f))
        t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
        _write(f"azure_{name}", (((datetime.fromisoformat(r["TIMESTAMP"][:26]) - t0).total_seconds(),
                                  int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in rows))
    with open(src / "vidur" / "processed_traces" / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv") as f:
        _write("arxiv_summarization", ((None, int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
                                       for r in csv.DictReader(f)))
    with gzip.open(src / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        problems = [json.loads(l) for l in f if l.strip()]
    # No Llama tokenizer offline: ~3 characters per token, the ratio of Llama/GPT-2 BPE on code (indentation and punctuation make code denser than prose's ~4).
    _write("humaneval", ((None, max(1, round(len(p["prompt"]) / 3)), max(1, round(len(p["canonical_solution"]) / 3)))
                         for p in problems))
    for lic in ("Mooncake-LICENSE-APACHE", "AzurePublicDataset-LICENSE-CC-BY-4.0", "vidur-LICENSE-MIT",
                "human-eval-LICENSE-MIT"):
        shutil.copyfile(src / "LICENSES" / lic, OUT / lic)


if __name__ == "__main__":
    main()
