"""One command for everything that needs a real GPU or TPU: kernels, engine, transformers, server.

    python -m bench.accelerator_check [--out DIR] [--parts kernels,server] [--model llama-3-8b]
    python -m bench.accelerator_check --smoke      # tiny version of every part, on any machine (CI)
    bench/accelerator_check.sh ...                 # the same from anywhere

Runs each part below in its own process under its own time limit (a part that fails, or is killed at
its limit, is recorded and the rest still run; the whole run stops starting parts at the total budget:
8 minutes, 2 for --smoke). Writes accelerator_check.json and accelerator_check.md (a summary starting
with the command) to --out, else $OUT, else bench/results; each part's own results and log go to
accelerator_check_parts/ beside them, and are kept up to date while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUDGET_S = {"full": 475, "smoke": 120}  # the last part gets what is left
NEED_WEIGHTS = {"engine-pallas", "engine-reference", "transformers", "server"}  # parts that load the checkpoints


@dataclass(frozen=True)
class Part:
    name: str
    limit_s: int  # full run
    smoke_limit_s: int
    what: str


PARTS = [
    Part("environment", 20, 30, "devices, jax/jaxlib/plugin versions, the chip's assumed peaks (HBM bytes/s, "
                                "bf16 FLOP/s) and the table of known chips"),
    Part("kernels", 70, 45, "every Pallas kernel against its jnp reference on poisoned inputs (bf16, head dim "
                            "128, GQA 8x4, pages of 16/32, contexts to 32k): max error; decode bandwidth as % "
                            "of HBM peak and speedup over the reference; ragged steps' % of HBM and bf16 peak"),
    Part("weights", 40, 15, "random bf16 checkpoints: the largest real shape that fits (Llama-3-8B on >= 40 GB "
                            "of device memory) and the server part's small model"),
    Part("engine-pallas", 150, 40, "tropical_jax.LLM with attention_backend='pallas': warmup, prefill tokens/s "
                                   "(2k, 8k prompts), steady decode tokens/s (batch 1, 32, 128), compiles "
                                   "after warmup (must be 0)"),
    Part("engine-reference", 100, 30, "the same with attention_backend='reference'"),
    Part("transformers", 40, 20, "transformers (torch, bf16) on the same checkpoint and shapes, where torch sees "
                                 "a GPU (skipped otherwise; on the CPU in smoke runs)"),
    Part("server", 60, 60, "python -m tropical_jax.serve --cluster on these devices, a burst of completions "
                           "through the openai client, /metrics naming every worker and counting the burst"),
]


def run_environment(settings: dict, record) -> None:
    from bench.accelerators import device_info, peak_table, versions

    info = device_info()
    record["device"] = info
    record["versions"] = versions()
    record["known_chips"] = peak_table()
    if info["chip"] is None and info["platform"] in ("gpu", "tpu"):
        record["note"] = f"unknown chip {info['device_kind']!r}: no peak figures, so no % of peak is reported"
    if info["platform"] not in ("gpu", "tpu") and not settings["smoke"]:
        record.fail(f"JAX sees no GPU or TPU (platform {info['platform']}): install .[cuda] or .[tpu] "
                    "(docs/hardware.md), or run --smoke")


def no_accelerator(results: dict, smoke: bool) -> bool:
    """A full run found only a CPU: its parts would run for hours, so the rest is not started."""
    device = results.get("environment", {}).get("results", {}).get("device", {})
    return not smoke and device.get("platform") not in (None, "gpu", "tpu")


def part_function(name: str):
    """The function that runs a part: fn(settings, record)."""
    if name == "environment":
        return run_environment
    if name == "kernels":
        from bench.check_kernels import run
        return run
    from bench import check_engine

    if name == "weights":
        return check_engine.run_weights
    if name.startswith("engine-"):
        return lambda settings, record: check_engine.run_engine(settings, record, name.split("-", 1)[1])
    if name == "transformers":
        return check_engine.run_transformers
    from bench.check_server import run
    return run


def run_part_here(name: str, settings_path: str) -> int:
    """Inside a part's process: run it, recording into its results file."""
    from bench.check_parts import Record, Skipped, load_settings

    settings = load_settings(settings_path)
    record = Record(Path(settings["parts_dir"]) / f"{name}.json")
    try:
        part_function(name)(settings, record)
    except Skipped as e:
        record.skip(str(e))
    return 1 if record.data["failures"] else 0


def launch(part: Part, settings: dict, parts_dir: Path, seconds: float) -> dict:
    """Run one part in a new process group, killed with its children (a server) at `seconds`."""
    settings_path = parts_dir / f"{part.name}.settings.json"
    settings_path.write_text(json.dumps({**settings, "limit_s": seconds}))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = parts_dir / f"{part.name}.log"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.accelerator_check", "--run-part", part.name,
                                 "--settings", str(settings_path)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            rc = None
        try:  # the part and whatever it left behind (a server holding the device)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    result_file = parts_dir / f"{part.name}.json"
    data = json.loads(result_file.read_text()) if result_file.exists() else {"results": {}, "failures": []}
    status = ("timed out" if rc is None else "skipped" if data.get("skipped") else
              "passed" if rc == 0 and not data["failures"] else "failed")
    tail = log.read_text(errors="replace")[-3000:]
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "limit_s": round(seconds, 1),
            "exit_code": rc, **data, "log_tail": tail if status in ("failed", "timed out") else ""}


def build_parser() -> argparse.ArgumentParser:
    parts = "\n".join(f"  {p.name:17s} {p.limit_s:4d} s ({p.smoke_limit_s} s with --smoke): {p.what}" for p in PARTS)
    p = argparse.ArgumentParser(prog="python -m bench.accelerator_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"parts, in order, with their time limits:\n{parts}\n"
                                       f"total budget: {BUDGET_S['full']} s ({BUDGET_S['smoke']} s with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: proves every part runs (CPU, CI)")
    p.add_argument("--out", help="directory for the summary (default $OUT, else bench/results)")
    p.add_argument("--parts", help="comma-separated subset of the parts (default: all)")
    p.add_argument("--model", help="model shape for the engine parts (default: the largest that fits the "
                                   "device: llama-3-8b, llama-3.2-3b, llama-3.2-1b)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply every time limit and the budget (for slow or shared machines; default 1)")
    p.add_argument("--run-part", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_part:
        return run_part_here(args.run_part, args.settings)
    from bench.check_parts import MODELS, pick_model
    from bench.check_summary import environment_lines, write_summary

    mode = "smoke" if args.smoke else "full"
    chosen = set(args.parts.split(",") if args.parts else [p.name for p in PARTS])
    if chosen & NEED_WEIGHTS:
        chosen.add("weights")
    unknown = chosen - {p.name for p in PARTS}
    if unknown or (args.model and args.model not in MODELS):
        build_parser().error(f"unknown part(s) {sorted(unknown)}" if unknown else
                             f"unknown --model {args.model!r}; choose from {sorted(MODELS)}")
    out = Path(args.out or os.environ.get("OUT") or HERE / "results").resolve()
    parts_dir = out / "accelerator_check_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="accelerator_check_")
    settings = {"smoke": args.smoke, "work_dir": work, "parts_dir": str(parts_dir), "model": args.model}
    start = time.monotonic()
    deadline = start + BUDGET_S[mode] * args.time_scale
    results = {}
    try:
        for part in (p for p in PARTS if p.name in chosen):
            if part.name != "environment" and settings["model"] is None:
                device = results.get("environment", {}).get("results", {}).get("device", {})
                settings["model"] = pick_model(device.get("memory_bytes"), args.smoke)
            left = deadline - time.monotonic()
            limit = (part.smoke_limit_s if args.smoke else part.limit_s) * args.time_scale
            if left < 1 or no_accelerator(results, args.smoke):
                reason = "no GPU or TPU" if left >= 1 else "the total budget was spent"
                results[part.name] = {"status": "not run", "reason": reason, "limit_s": limit}
                continue
            print(f"[accelerator_check] {part.name} (limit {min(limit, left):.0f} s) ...", flush=True)
            results[part.name] = launch(part, settings, parts_dir, min(limit, left))
            print(f"[accelerator_check] {part.name}: {results[part.name]['status']} "
                  f"in {results[part.name]['seconds']} s", flush=True)
            if part.name == "environment" and results[part.name]["results"].get("device"):
                print(environment_lines(results[part.name]["results"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = shlex.join(["python", "-m", "bench.accelerator_check", *(argv if argv is not None else sys.argv[1:])])
    summary = {"check": "python -m bench.accelerator_check", "command": command, "mode": mode,
               "model": settings["model"],
               "seconds": round(time.monotonic() - start, 1), "budget_s": BUDGET_S[mode] * args.time_scale,
               "passed": all(r["status"] in ("passed", "skipped") for r in results.values()), "parts": results}
    paths = write_summary(summary, out)
    print(paths[1].read_text(), flush=True)
    print(f"[accelerator_check] {'passed' if summary['passed'] else 'FAILED'} in {summary['seconds']} s; "
          f"wrote {', '.join(map(str, paths))}", flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
