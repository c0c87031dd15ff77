"""What the benchmarks assume about the chip they run on: peak HBM bandwidth and dense bf16 FLOP/s.

Figures are the vendors' data-sheet numbers per JAX device (one GPU, one TPU chip; v4 and v5p
chips are one megacore device), dense (no 2:4 sparsity). A chip is found by the first pattern
that matches `jax.devices()[0].device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...), so the
more specific patterns come first; an unlisted chip gets None and the reports say so.
"""

from __future__ import annotations

import importlib.metadata
import re

# (pattern on device_kind, name, HBM bytes/s, dense bf16 FLOP/s)
PEAKS = [
    (r"H200 NVL", "H200 NVL", 4.8e12, 835e12),
    (r"H200", "H200 SXM", 4.8e12, 989e12),
    (r"H100 NVL", "H100 NVL", 3.9e12, 835e12),
    (r"H100 PCIe", "H100 PCIe", 2.0e12, 756e12),
    (r"H100", "H100 SXM", 3.35e12, 989e12),
    (r"A100.*40GB", "A100 40GB", 1.555e12, 312e12),
    (r"A100.*PCIe", "A100 80GB PCIe", 1.935e12, 312e12),
    (r"A100", "A100 80GB SXM", 2.039e12, 312e12),
    (r"\bL4\b", "L4", 0.3e12, 121e12),
    (r"^TPU v4$", "TPU v4", 1.2e12, 275e12),
    (r"^TPU v5( lite|e)$", "TPU v5e", 0.819e12, 197e12),
    (r"^TPU v5p?$", "TPU v5p", 2.765e12, 459e12),
    (r"^TPU v6( lite|e)$", "TPU v6e", 1.64e12, 918e12),
]
# Distributions whose versions say which JAX backend (plugin) and kernels' compilers ran.
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "libtpu", "libtpu-nightly", "flax",
            "triton", "torch", "transformers", "openai")


def peaks_for(device_kind: str) -> dict:
    """{"chip", "hbm_bytes_per_s", "bf16_flops"} for a device kind; None values if it is not listed."""
    for pattern, name, bandwidth, flops in PEAKS:
        if re.search(pattern, device_kind):
            return {"chip": name, "hbm_bytes_per_s": bandwidth, "bf16_flops": flops}
    return {"chip": None, "hbm_bytes_per_s": None, "bf16_flops": None}


def versions() -> dict:
    """Installed versions of PACKAGES (None: not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def memory_bytes(device) -> int | None:
    """The device's memory as its allocator sees it (None where there are no memory stats: CPU)."""
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # CPU devices raise instead of returning None
        return None


def device_info() -> dict:
    """The devices JAX sees and the peaks assumed for the first."""
    import jax

    devices = jax.devices()
    first = devices[0]
    return {"platform": first.platform, "device_kind": first.device_kind, "num_devices": len(devices),
            "devices": [str(d) for d in devices], "memory_bytes": memory_bytes(first),
            **peaks_for(first.device_kind)}


def peak_table() -> list[dict]:
    """Every chip the benchmarks know, for printing."""
    return [{"chip": name, "matches": pattern, "hbm_TB_per_s": bandwidth / 1e12, "bf16_TFLOP_per_s": flops / 1e12}
            for pattern, name, bandwidth, flops in PEAKS]
