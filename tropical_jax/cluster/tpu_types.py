"""Cloud TPU accelerator types: how many chips a slice has, how they sit on hosts, and their memory.

Stdlib only, so the deployment scripts can ask it on a laptop without JAX. Naming (as gcloud takes
it): v4-N and v5p-N count TensorCores (2 per chip: v4-8 is 4 chips on one host); v5litepod-N and
v6e-N count chips (1 core each). Multi-host slices have 4 chips per host (machine types ct4p/ct5p/
ct5lp/ct6e-...-4t); v5e and v6e also come as single hosts of 1, 4 or 8 chips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _Generation:
    cores_per_chip: int        # what the number in the type name counts, per chip
    single_host_chips: tuple   # chip counts that fit one host
    max_chips: int
    hbm_gib: float             # HBM per chip
    runtime_version: str       # default TPU VM software version
    pow2_slices: bool = False  # multi-host slices come only in powers of two (v5e, v6e: 16 ... 256)


GENERATIONS = {
    "v4": _Generation(2, (4,), 4096, 32, "tpu-ubuntu2204-base"),
    "v5p": _Generation(2, (4,), 6144, 95, "v2-alpha-tpuv5"),
    "v5litepod": _Generation(1, (1, 4, 8), 256, 16, "v2-alpha-tpuv5-lite", pow2_slices=True),
    "v6e": _Generation(1, (1, 4, 8), 256, 32, "v2-alpha-tpuv6e", pow2_slices=True),
}
ALIASES = {"v5e": "v5litepod"}  # the marketing name; gcloud wants v5litepod
MULTI_HOST_CHIPS_PER_HOST = 4
EXAMPLES = "v5litepod-8 (alias v5e-8), v5litepod-16, v6e-8, v6e-16, v4-8, v4-16, v5p-8"


@dataclass(frozen=True)
class TpuSlice:
    accelerator_type: str   # as gcloud takes it, e.g. "v5litepod-8"
    generation: str
    chips: int
    chips_per_host: int
    hbm_gib_per_chip: float
    runtime_version: str

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host


def tpu_slice(accelerator_type: str) -> TpuSlice:
    """'v5litepod-16' -> TpuSlice(chips=16, chips_per_host=4, ...). ValueError for unknown types."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type.strip().lower())
    name = ALIASES.get(m.group(1), m.group(1)) if m else None
    if name not in GENERATIONS:
        raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}; expected one of the forms {EXAMPLES}")
    gen, count = GENERATIONS[name], int(m.group(2))
    chips, rest = divmod(count, gen.cores_per_chip)
    multi_host = chips > max(gen.single_host_chips) and chips % MULTI_HOST_CHIPS_PER_HOST == 0 and (
        not gen.pow2_slices or chips & (chips - 1) == 0)
    if rest or chips > gen.max_chips or not (chips in gen.single_host_chips or multi_host):
        raise ValueError(f"{accelerator_type!r} is not a {name} slice size gcloud offers; expected e.g. {EXAMPLES}")
    per_host = chips if chips in gen.single_host_chips else MULTI_HOST_CHIPS_PER_HOST
    return TpuSlice(f"{name}-{count}", name, chips, per_host, gen.hbm_gib, gen.runtime_version)
