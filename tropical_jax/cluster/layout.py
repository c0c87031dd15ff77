"""Default cluster layout for a machine or slice: how many workers, their roles and their TP size.

The deployment scripts call the CLI so the rule lives here, tested, and nowhere else:

    python -m tropical_jax.cluster.layout --accelerator-type v5litepod-8          # P:tp4,M:tp4
    python -m tropical_jax.cluster.layout --chips 8 --chips-per-host 8 --platform gpu  # 2P2M at TP2
    ... --format env   # KEY=VALUE lines (CLUSTER, TP, CHIPS, HOSTS, ...) for the scripts to read

Rules: a worker's mesh never spans hosts (TP all-reduces stay on ICI/NVLink; workers on different
hosts talk only through KV handoffs), so TP divides the chips of one host. Default TP: 4 on TPU
(a v5e chip has 16 GiB: four hold a 20B model in bfloat16 with room for KV), 2 on GPU (the paper's
A100-80GB setting), raised to what the model's weights need (--min-tp, or --model-dir with the
chip's memory). Workers split half prefill (P), half multiplexing (M); one worker is colocated (C).
Stdlib only, so it runs on a laptop without JAX.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .tpu_types import tpu_slice

DEFAULT_TP = {"tpu": 4, "gpu": 2, "cpu": 1}
TPU_TP_SIZES = (1, 2, 4, 8)  # chip groups one TPU process can own (TPU_CHIPS_PER_PROCESS_BOUNDS)
ROLE_SPLITS = ("PM", "PD", "C")  # tropical/planned, disaggregated, colocated/chunked
WEIGHT_FRACTION = 0.5  # weights may fill this much of a worker's memory; the rest is KV cache and buffers


def tp_sizes(chips_per_host: int, platform: str) -> list[int]:
    """TP sizes whose meshes tile one host exactly."""
    sizes = [t for t in range(1, chips_per_host + 1) if chips_per_host % t == 0]
    return [t for t in sizes if t in TPU_TP_SIZES] if platform == "tpu" else sizes


def min_tp_for_model(model_bytes: int, chip_bytes: int, weight_fraction: float = WEIGHT_FRACTION) -> int:
    """Fewest chips whose memory holds the weights within `weight_fraction` of it."""
    if model_bytes < 0 or chip_bytes <= 0:
        raise ValueError("model and chip sizes must be positive")
    return max(1, math.ceil(model_bytes / (chip_bytes * weight_fraction)))


def choose_layout(chips: int, chips_per_host: int | None = None, platform: str = "gpu", *, tp: int | None = None,
                  min_tp: int = 1, roles: str | None = None) -> str:
    """A cluster string parse_cluster accepts ("1P1M", "P:tp4,M:tp4", "1C", ...) for `chips` chips
    (GPUs or TPU chips) on hosts of `chips_per_host` (default: one host). `tp` forces the TP size;
    otherwise the platform's default, at least `min_tp`. `roles`: "PM" (default), "PD" or "C"."""
    if platform not in DEFAULT_TP:
        raise ValueError(f"unknown platform {platform!r}; choose from {sorted(DEFAULT_TP)}")
    if chips < 1:
        raise ValueError(f"need at least one chip, got {chips}")
    per_host = chips if chips_per_host is None else chips_per_host
    if per_host < 1 or chips % per_host:
        raise ValueError(f"{chips} chips do not fill hosts of {per_host} chips each")
    sizes = tp_sizes(per_host, platform)
    if tp is not None:
        tp = _check_tp(tp, per_host, sizes, platform)
        if tp < min_tp:
            raise ValueError(f"tp={tp} is below the {min_tp} chips the model needs")
    else:
        tp = _default_tp(chips, sizes, platform, min_tp, split_roles=roles != "C")
    workers = chips // tp
    split = roles or ("PM" if workers >= 2 else "C")
    if split not in ROLE_SPLITS:
        raise ValueError(f"unknown roles {roles!r}; choose from {ROLE_SPLITS}")
    if split != "C" and workers < 2:
        raise ValueError(f"roles {split} need two workers, but {chips} chip(s) at tp={tp} make one; "
                         "use a smaller tp or roles C")
    return format_cluster(split, workers, tp)


def _check_tp(tp: int, per_host: int, sizes: list[int], platform: str) -> int:
    if tp < 1:
        raise ValueError(f"tp must be positive, got {tp}")
    if tp > per_host:
        raise ValueError(f"tp={tp} needs {tp} chips on one host, but hosts have {per_host} "
                         "(a worker's mesh never spans hosts)")
    if tp not in sizes:
        detail = "TPU workers take 1, 2, 4 or 8 chips" if platform == "tpu" else "it must divide them"
        raise ValueError(f"tp={tp} does not tile the {per_host} chips of a host ({detail}); choose from {sizes}")
    return tp


def _default_tp(chips: int, sizes: list[int], platform: str, min_tp: int, split_roles: bool) -> int:
    fits = [t for t in sizes if t >= min_tp]
    if not fits:
        raise ValueError(f"the model needs tp>={min_tp}, but one host offers at most tp={sizes[-1]} "
                         "(a worker's mesh never spans hosts)")
    wanted = max(DEFAULT_TP[platform], min_tp)
    tp = next((t for t in fits if t >= wanted), fits[-1])
    # A P/M split needs two workers: shrink TP (never below what the model needs) until there are two.
    smaller = [t for t in fits if t < tp]
    while split_roles and chips // tp < 2 and smaller:
        tp = smaller.pop()
    return tp


def format_cluster(split: str, workers: int, tp: int) -> str:
    counts = {"C": {"C": workers}}.get(split) or {split[0]: workers // 2, split[1]: workers - workers // 2}
    if tp == 1:
        return "".join(f"{n}{role}" for role, n in counts.items())
    return ",".join(f"{role}:tp{tp}" for role, n in counts.items() for _ in range(n))


def model_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files in a checkpoint directory (safetensors, or everything for orbax)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"--model-dir {model_dir}: not a directory")
    files = list(root.rglob("*.safetensors")) or [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tropical_jax.cluster.layout", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--accelerator-type", help="a Cloud TPU type (v5litepod-8, v6e-16, v4-8, ...)")
    where.add_argument("--chips", type=int, help="GPUs or chips in all (with --chips-per-host and --platform)")
    p.add_argument("--chips-per-host", type=int, help="default: all chips on one host")
    p.add_argument("--platform", choices=sorted(DEFAULT_TP), default="gpu", help="with --chips (default gpu)")
    p.add_argument("--tp", type=int, help="force this TP size per worker")
    p.add_argument("--min-tp", type=int, default=1, help="the model needs at least this TP")
    p.add_argument("--model-dir", help="raise TP until the weights in this directory fit (needs chip memory)")
    p.add_argument("--chip-gib", type=float, help="memory per chip in GiB (TPU: known from the type)")
    p.add_argument("--roles", choices=ROLE_SPLITS, help="PM (default), PD or C")
    p.add_argument("--format", choices=("cluster", "env"), default="cluster",
                   help="the cluster string alone, or KEY=VALUE lines for shell scripts")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        info: dict[str, object] = {}
        if a.accelerator_type:
            s = tpu_slice(a.accelerator_type)
            chips, per_host, platform, chip_gib = s.chips, s.chips_per_host, "tpu", a.chip_gib or s.hbm_gib_per_chip
            info = {"ACCELERATOR_TYPE": s.accelerator_type, "RUNTIME_VERSION": s.runtime_version}
        else:
            chips, per_host, platform, chip_gib = a.chips, a.chips_per_host, a.platform, a.chip_gib
        min_tp = a.min_tp
        if a.model_dir:
            if not chip_gib:
                parser.error("--model-dir needs --chip-gib (the memory of one chip)")
            min_tp = max(min_tp, min_tp_for_model(model_bytes(a.model_dir), int(chip_gib * 2**30)))
        cluster = choose_layout(chips, per_host, platform, tp=a.tp, min_tp=min_tp, roles=a.roles)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.format == "cluster":
        print(cluster)
        return 0
    per_host = per_host or chips
    tp = int(cluster.split(":tp")[1].split(",")[0]) if ":tp" in cluster else 1
    info.update(CHIPS=chips, CHIPS_PER_HOST=per_host, HOSTS=chips // per_host, TP=tp, CLUSTER=cluster)
    print("\n".join(f"{k}={v}" for k, v in info.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
