"""The accelerator check's summary: accelerator_check.json (everything) and accelerator_check.md (to read)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.check_parts import MODELS, param_count


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"
    return str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows] + [""]


def _results(summary: dict, part: str) -> dict:
    return summary["parts"].get(part, {}).get("results", {})


def _environment(summary) -> list[str]:
    env = _results(summary, "environment")
    return ["## Environment", "", environment_lines(env), ""] if env.get("device") else []


def environment_lines(env: dict) -> str:
    """The devices, the peaks assumed for them, and the versions that matter, as markdown lines."""
    d, v = env["device"], env.get("versions", {})
    memory = f"{d['memory_bytes'] / 2**30:.1f} GiB" if d["memory_bytes"] else "unknown"
    lines = [f"{d['num_devices']} x {d['device_kind']} ({d['platform']}), memory per device {memory}.", ""]
    if d["chip"]:
        lines += [f"Peaks assumed for {d['chip']}: HBM {d['hbm_bytes_per_s'] / 1e12:g} TB/s, "
                  f"bf16 {d['bf16_flops'] / 1e12:g} TFLOP/s (dense).", ""]
    else:
        lines += ["No peak figures for this device: % of peak is not reported.", ""]
    lines += ["Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x)]
    return "\n".join(lines)


def _kernels(summary) -> list[str]:
    k = _results(summary, "kernels")
    if not k:
        return []
    lines = ["## Kernels", ""]
    if k.get("setup", {}).get("interpreted"):
        lines += ["Interpreted (no GPU/TPU): the speeds below measure the Pallas interpreter, not hardware.", ""]
    lines += ["Against the jnp reference (poisoned inputs, bf16):", ""]
    rows = [[name, r.get("max_abs_error", r.get("reference")), r.get("tolerance"), r.get("ok")]
            for section in ("decode", "ragged") for name, r in k.get(section, {}).items()]
    lines += _table(["case", "max abs error", "tolerance", "ok"], rows)
    speed = [[name, r["speed"]["seconds"] * 1e3, r["speed"]["kv_bytes_per_s"] / 1e9,
              _pct(r["speed"].get("fraction_of_hbm_peak")), _pct(r["speed"].get("fraction_of_bf16_peak"))]
             for name, r in k.get("ragged", {}).items() if "speed" in r]
    if speed:
        lines += ["Ragged steps (unique KV bytes; attention FLOPs):", ""]
        lines += _table(["case", "ms", "GB/s", "% HBM peak", "% bf16 peak"], speed)
    cells = [[c["batch"], c["context"], c["page_size"], c.get("kernel_bytes_per_s", 0) / 1e9,
              _pct(c.get("fraction_of_peak")), c.get("speedup_vs_reference"), c.get("skipped")]
             for c in k.get("decode_bandwidth", [])]
    if cells:
        lines += ["Paged decode over full-length sequences (bench/attention_bandwidth.py's cells):", ""]
        lines += _table(["batch", "context", "page", "GB/s", "% HBM peak", "x reference", "note"], cells)
    goal = k.get("decode_goal")
    if goal:
        lines += [f"Decode goal (batch {goal['batch']}, context {goal['context']}: {_pct(goal['fraction_of_peak'])} "
                  f"of HBM peak and {goal['speedup_vs_reference']}x the reference): {goal['result']}.", ""]
    w = k.get("kv_write")
    if w:
        lines += [f"KV write: {w['skipped']}" if "skipped" in w else
                  f"KV write, TPU kernel against the jnp scatter ({w['tokens']} tokens): "
                  f"{'exact' if w['exact'] else 'DIFFERENT'}, {w['kernel_seconds'] * 1e3:.3g} ms vs "
                  f"{w['scatter_seconds'] * 1e3:.3g} ms{' (interpreted)' if w['interpreted'] else ''}.", ""]
    return lines


def _engines(summary) -> list[str]:
    runs = {name: _results(summary, part) for name, part in (("tropical_jax pallas", "engine-pallas"),
                                                              ("tropical_jax reference", "engine-reference"),
                                                              ("transformers", "transformers"))}
    runs = {n: r for n, r in runs.items() if r}
    if not runs:
        return []
    prefill = sorted({k for r in runs.values() for k in r.get("prefill_tokens_per_s", {})}, key=int)
    batches = sorted({k for r in runs.values() for k in r.get("decode_tokens_per_s", {})}, key=int)
    header = ["engine"] + [f"prefill {n} tok/s" for n in prefill] + [f"decode b{b} tok/s" for b in batches] + \
        ["warmup s", "compiles after warmup"]
    rows = [[name] + [r.get("prefill_tokens_per_s", {}).get(n) for n in prefill] +
            [r.get("decode_tokens_per_s", {}).get(b) for b in batches] +
            [r.get("warmup", {}).get("seconds"), r.get("compiles_after_warmup")] for name, r in runs.items()]
    lines = ["## Engine", "", f"Model shape {summary['model']}, random bf16 weights, one device.", ""] + \
        _table(header, rows)
    device = _results(summary, "environment").get("device", {})
    if device.get("chip") and summary["model"] in MODELS:
        lines += _roofline(runs, MODELS[summary["model"]], device, prefill, batches)
    return lines


def _roofline(runs, cfg, device, prefill, batches) -> list[str]:
    """The same rates against the chip: prefill as matmul FLOPs (2 x weights a token, attention left out)
    over bf16 peak; decode as weight bytes read (once a step, KV left out) over HBM peak. Both are lower
    bounds of the hardware's real use."""
    matmul = param_count(cfg) - cfg["vocab_size"] * cfg["hidden_size"]  # the embedding is a lookup
    rows = [[name] + [_pct(r.get("prefill_tokens_per_s", {}).get(n, 0) * 2 * matmul / device["bf16_flops"])
                      for n in prefill] +
            [_pct(r.get("decode_tokens_per_s", {}).get(b, 0) / int(b) * 2 * param_count(cfg) /
                  device["hbm_bytes_per_s"]) for b in batches] for name, r in runs.items()]
    header = ["engine"] + [f"prefill {n}: % bf16 peak" for n in prefill] + \
        [f"decode b{b}: % HBM peak" for b in batches]
    return ["Against the chip's peaks (matmul FLOPs for prefill, weight bytes per step for decode):", ""] + \
        _table(header, rows)


def _server(summary) -> list[str]:
    s = _results(summary, "server")
    if not s:
        return []
    lay, burst, m = s.get("layout", {}), s.get("burst", {}), s.get("metrics", {})
    return ["## Server", "", f"--cluster {lay.get('cluster')} ({lay.get('why')}); started in "
            f"{s.get('startup', {}).get('seconds')} s.", "",
            f"Burst: {burst.get('requests')} requests in {burst.get('seconds')} s, "
            f"completion tokens {burst.get('completion_tokens')}.",
            "", f"/metrics: workers {m.get('workers')}, generated tokens {m.get('generated_tokens')}, "
                f"finished requests {m.get('finished_requests')}.", ""]


def markdown(summary: dict) -> str:
    lines = [f"    {summary['command']}", "", f"# Accelerator check ({summary['mode']}): "
             f"{'passed' if summary['passed'] else 'FAILED'} in {summary['seconds']} s", ""]
    rows = [[name, r["status"], r.get("seconds"), r.get("limit_s"), "; ".join(r.get("failures", []))
             or r.get("skipped") or r.get("reason")] for name, r in summary["parts"].items()]
    lines += _table(["part", "status", "seconds", "limit s", "notes"], rows)
    for section in (_environment, _kernels, _engines, _server):
        lines += section(summary)
    return "\n".join(lines)


def write_summary(summary: dict, out: Path) -> list[Path]:
    paths = [out / "accelerator_check.json", out / "accelerator_check.md"]
    paths[0].write_text(json.dumps(summary, indent=1, default=str))
    paths[1].write_text(markdown(summary))
    return paths
