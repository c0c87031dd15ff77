"""What machine a benchmark ran on, recorded in every result (results of different CPUs must not be read as one)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with its family/model and the vector units that matter to matmuls
    (VMs often name only "Xeon")."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in info.get("flags", "").split()]
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}; " \
           f"{' '.join(units) or 'no avx2'})"


def describe() -> dict:
    """Platform, CPU, core count, JAX version and backend. Imports JAX: a benchmark that sets XLA_FLAGS calls
    this after setting them."""
    import jax

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()[:1]]}
