"""The process's budget of memory mappings, checked before compiling.

On the CPU backend every compiled XLA executable keeps its JIT-compiled kernels in their own
small mappings (about 250-350 for one of our steps, nearly independent of the model's depth,
since the layers share kernels; loading an executable from the persistent compilation cache costs
the same). Linux caps the mappings of a process at vm.max_map_count (65,530 by default), and a
compile that crosses the cap aborts the whole process inside LLVM ("Unable to allocate section
memory") after minutes of warmup. So before compiling, we predict what the executables will need
and refuse at once, with the fix, when it does not fit next to what the process already maps.

TROPICAL_JAX_MAX_MAP_COUNT overrides the limit read from /proc (to try the check, or to keep
headroom for other work in the process).
"""

from __future__ import annotations

import logging
import os
import threading

import jax

log = logging.getLogger(__name__)

LIMIT_FILE = "/proc/sys/vm/max_map_count"
# Measured on XLA:CPU (jax 0.10): 230-310 mappings for a prefill, decode or mixed step of a 1-layer
# model, about 6 more per layer. Rounded up: an estimate that errs low aborts the process.
BASE_PER_EXECUTABLE = 320
PER_LAYER = 6
# Room for what else the process maps while it serves: thread stacks, buffers, a few small jits.
HEADROOM = 2000


_counts_lock = threading.Lock()
_counts = {"/jax/core/compile/backend_compile_duration": 0, "/jax/compilation_cache/cache_hits": 0}


def _count(event, *_, **__):
    if event in _counts:
        with _counts_lock:
            _counts[event] += 1


jax.monitoring.register_event_duration_secs_listener(_count)
jax.monitoring.register_event_listener(_count)


def compile_count() -> int:
    """Executables JAX has compiled (or loaded from the persistent cache) in this process."""
    return _counts["/jax/core/compile/backend_compile_duration"]


def cache_hits() -> int:
    """Executables loaded from the persistent compilation cache in this process."""
    return _counts["/jax/compilation_cache/cache_hits"]


def startup_report(seconds: float) -> str:
    """The server's line once it is ready: how long, how many executables, how many mappings."""
    limit, used = max_map_count(), mappings_in_use()
    maps = f"; {used:,} memory mappings of vm.max_map_count {limit:,}" if limit and used else ""
    return (f"ready in {seconds:.1f} s: {compile_count()} executables compiled or loaded "
            f"({cache_hits()} from the persistent compilation cache){maps}")


class MappingBudgetError(RuntimeError):
    """The executables about to be compiled would not fit the process's memory-mapping limit."""


def mappings_in_use() -> int | None:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def max_map_count() -> int | None:
    override = os.environ.get("TROPICAL_JAX_MAX_MAP_COUNT")
    if override:
        return int(override)
    try:
        with open(LIMIT_FILE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def per_executable(num_layers: int) -> int:
    return BASE_PER_EXECUTABLE + PER_LAYER * num_layers


def on_cpu(devices=None) -> bool:
    """Only XLA:CPU keeps executables' code in host mappings; GPU and TPU code lives on the device."""
    return all(d.platform == "cpu" for d in (devices if devices is not None else jax.devices()[:1]))


def check(executables: int, num_layers: int, what: str, advice: str = "") -> None:
    """Raise MappingBudgetError unless `executables` more fit this process's mapping limit.
    `what` names them in the message ("the 1P1M cluster's 138 steps"); `advice` adds the ways out
    that fit the caller (its flags)."""
    limit, used = max_map_count(), mappings_in_use()
    if limit is None or used is None or not on_cpu():
        return
    need = executables * per_executable(num_layers)
    free = limit - used - HEADROOM
    if need <= free:
        log.info("mapping budget: %d executables need about %d memory mappings; %d in use of "
                 "vm.max_map_count %d", executables, need, used, limit)
        return
    fits = max(0, free // per_executable(num_layers))
    raise MappingBudgetError(
        f"{what}: {executables} compiled executables need about {need:,} memory mappings "
        f"(~{per_executable(num_layers)} each on the CPU backend), but this process already uses {used:,} "
        f"of its limit vm.max_map_count={limit:,}, leaving room for about {fits}. Compiling them would "
        f"abort the process inside LLVM ('Unable to allocate section memory'). Fix: compile fewer step "
        f"shapes{advice}; close engines this process no longer needs (LLM.close()); or raise the limit, "
        f"e.g. `sudo sysctl -w vm.max_map_count=262144`. See docs/startup.md.")
