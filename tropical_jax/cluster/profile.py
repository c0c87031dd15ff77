"""Profile this engine's own steps on its devices and fit the scheduler's cost model (DESIGN §5).

    python -m tropical_jax.profile --model PATH --out FILE.json [--max-model-len N ...]

Times every chunk bucket (prefill) and every batch x context bucket (decode) after warmup, plus a
KV page copy between two devices, and writes the CostModel JSON that both the scheduler and the
simulator accept. There is no mixed-step fit yet: the profile says so, and the cost model derives
mixed steps as t_chunk + t_decode - min(c0, d0).
"""

from __future__ import annotations

import time

from tqdm import tqdm


def _time(fn, reps: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000  # ms


def profile_executor(executor, progress: bool = True, name: str = "") -> dict:
    cfg = executor.cfg
    ps = cfg.page_size
    top = cfg.context_pages[-1]
    shapes = [("prefill", c, 0, top) for c in executor.chunk_sizes]
    shapes += [("decode", 0, b, p) for b in executor.batch_sizes for p in cfg.context_pages]
    prefill, decode = [], []
    for kind, c, b, p in tqdm(shapes, desc="profiling steps", disable=not progress, unit="step"):
        ms = _time(lambda: executor._run(c, b, p, None, []))
        if kind == "prefill":
            prefill.append([c, ms])
        else:
            decode.append([b, b * p * ps, ms])  # padded rows read the whole context bucket
    # Longer prompts run as several largest chunks: add those points so the fit spans them.
    cmax, tmax = prefill[-1]
    prefill += [[k * cmax, k * tmax] for k in (2, 4, 8) if k * cmax <= cfg.max_model_len]
    while len(prefill) < 3:
        prefill.append([prefill[-1][0] * 2, prefill[-1][1] * 2])
    decode_fit: dict = {"points": decode}
    if len(cfg.context_pages) == 1 or len(executor.batch_sizes) == 1:
        # One context (or batch) bucket: B and T move together, so fit d0 + d1*B and say d2 = 0.
        import numpy as np

        slope, icept = np.polyfit([b for b, _, _ in decode], [ms for _, _, ms in decode], 1) \
            if len(executor.batch_sizes) > 1 else (0.0, decode[0][2])
        decode_fit = {"d0": float(icept), "d1": float(slope), "d2": 0.0}
    mc = executor.model_cfg
    itemsize = 2 if cfg.dtype == "bfloat16" else 4
    return {
        "name": name or f"measured-{mc.architecture}-{mc.num_layers}x{mc.hidden_size}",
        "units": "ms",
        "source": ("measured by tropical_jax.cluster.profile on this machine's devices: chunk buckets (prefill), "
                   "batch x context buckets (decode); longer prompts extrapolated as several largest chunks; "
                   "no mixed-step data: t_mixed = t_chunk + t_decode - min(c0, d0)"),
        "prefill": {"points": prefill},
        "decode": decode_fit,
        "kv_bytes_per_token": mc.kv_bytes_per_token(itemsize),
        "transfer": {"bandwidth_GBps": 5.0, "latency_ms": 1.0},
        "kv_capacity_tokens": cfg.total_pages * ps,
    }
