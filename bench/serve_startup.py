"""How long the server takes to be ready, cold and warm, and what it compiles.

    python -m bench.serve_startup [--setups default,1P1M] [--timeout 1800]

For each setup (the default single worker; the 1P1M cluster under `planned` on two emulated CPU
devices, both with the default buckets; default-fine: the single worker with the fine buckets the
accelerators default to) the real server is started twice on a free loopback port:
cold (empty compilation and profile caches, in a temporary directory) and warm (the same caches
again). Measured from the spawn to the "(ready)" line, with the server's own report: executables
compiled or loaded, per worker, and the memory mappings it holds. One completion checks that it
serves. Prints the JSON and writes bench/results/serve_startup.{json,md}. Timings depend on what
else the machine runs: the load averages around each run are recorded with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from .machine import cpu_model
from .server_process import ServerNotReady, ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
SETUPS = {
    "default": ([], {}),
    "1P1M": (["--cluster", "1P1M", "--policy", "planned"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
    "default-fine": (["--bucket-set", "fine"], {}),  # the accelerators' buckets, on this CPU
}
READY = re.compile(r"ready in ([\d.]+) s: (\d+) executables compiled or loaded \((\d+) from the persistent "
                   r"compilation cache\)(?:; ([\d,]+) memory mappings of vm.max_map_count ([\d,]+))?")
WORKER = re.compile(r"(worker \w+|the engine): (\d+) step executables ready in ([\d.]+) s \((\d+) compiled, "
                    r"(\d+) loaded")


def start_once(flags, env, caches: Path, timeout: float) -> dict:
    """Start the server, wait for ready, send one completion, stop it; what it reported."""
    environ = dict(TROPICAL_JAX_PROFILE_CACHE=str(caches / "profiles"), **env)
    load_before = os.getloadavg()
    start = time.monotonic()
    try:
        server = ServerProcess("--compilation-cache-dir", str(caches / "xla"), *flags, timeout=timeout, env=environ)
    except ServerNotReady as e:
        return {"ready": False, "exit_code": e.exit_code, "wall_s": round(time.monotonic() - start, 1),
                "log_tail": e.lines[-20:]}
    try:
        log = "".join(server.lines)
        reply = server.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8})
        m = READY.search(log)
        return {
            "ready": True, "ready_s": round(server.ready_s, 1), "server_ready_s": float(m.group(1)),
            "executables": int(m.group(2)), "from_compilation_cache": int(m.group(3)),
            "memory_mappings": int(m.group(4).replace(",", "")) if m.group(4) else None,
            "max_map_count": int(m.group(5).replace(",", "")) if m.group(5) else None,
            "workers": {w.group(1).removeprefix("worker "): {"step_executables": int(w.group(2)),
                                                           "warmup_s": float(w.group(3)),
                                                           "compiled": int(w.group(4)), "loaded": int(w.group(5))}
                        for w in WORKER.finditer(log)},
            "profiled": "no cached profile fits" in log, "completion_ok": reply.status_code == 200,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
        }
    finally:
        server.stop(graceful=True)


def markdown(result: dict) -> str:
    rows = ["| setup | start | ready (s) | executables (per worker) | from cache | memory mappings | load |",
            "|---|---|---|---|---|---|---|"]
    for setup, runs in result["runs"].items():
        for kind, r in runs.items():
            if not r["ready"]:
                rows.append(f"| {setup} | {kind} | not ready (exit {r['exit_code']}) | | | | |")
                continue
            per = ", ".join(f"{n} {w['step_executables']}" for n, w in r["workers"].items())
            load = f"{r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f}"
            rows.append(f"| {setup} | {kind} | {r['ready_s']} | {r['executables']} ({per}) | "
                        f"{r['from_compilation_cache']} | {r['memory_mappings']:,} of {r['max_map_count']:,} | "
                        f"{load} |")
    m = result["machine"]
    return "\n".join([f"    {result['command']}", "",
                      f"Machine: {m['cpu']}, {m['cpus']} cores, vm.max_map_count {m['max_map_count']}. Load: the "
                      "1-minute load average before and after each start (other jobs make cold times noisy; the "
                      "JSON has all three).", "",
                      *rows, "",
                      "Ready: from the spawn to the `(ready)` line. Executables: steps of every worker plus page "
                      "copies and small helpers, compiled or loaded from the persistent compilation cache "
                      "(which costs the same memory mappings). The cluster times its profile on its warmed M "
                      "worker when none is cached (cold), then reuses it (warm).", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default="default,1P1M", help=f"comma-separated, of {', '.join(SETUPS)}")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each start")
    a = ap.parse_args(argv)
    command = "python -m bench.serve_startup" + ("" if a.setups == "default,1P1M" else f" --setups {a.setups}")
    limit = Path("/proc/sys/vm/max_map_count")
    result = {"command": command,
              "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(),
                          "max_map_count": int(limit.read_text()) if limit.exists() else None},
              "runs": {}}
    for setup in a.setups.split(","):
        flags, env = SETUPS[setup]
        with tempfile.TemporaryDirectory() as caches:
            result["runs"][setup] = {kind: start_once(flags, env, Path(caches), a.timeout) for kind in ("cold", "warm")}
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_startup.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "serve_startup.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
