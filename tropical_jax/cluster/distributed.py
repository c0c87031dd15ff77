"""How a server or worker process takes its place among the chips of a machine (--jax-distributed).

    off    this process uses every device it sees (one host: the default).
    host   multi-host Cloud TPU slice, one process per worker mesh (the Ray backend): confine this
           process to its own host's chips. By default libtpu on a slice host builds the whole slice
           and waits for a process on every other host; our workers never share a mesh across hosts
           (cluster/layout.py), so each process declares itself a one-process slice of its chips
           (the variables JAX's own multi-process tests and Ray's TPU support set) and does NOT call
           jax.distributed.initialize. Must run before JAX initialises its backend.
    slice  jax.distributed.initialize(): every host runs one process of one JAX program, meshes may
           span hosts. Auto-detected on Cloud TPU (metadata), Slurm and Open MPI; elsewhere from
           JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Our server is one controller
           and does not use this yet; it is here for a process that joins such a program.

The mode comes from the argument or $TROPICAL_JAX_DISTRIBUTED, which the deploy scripts set for
`ray start`, so Ray actors (started by the raylet, with its environment) get it too.
"""

from __future__ import annotations

import glob
import os

ENV = "TROPICAL_JAX_DISTRIBUTED"
MODES = ("off", "host", "slice")
# TPU_CHIPS_PER_PROCESS_BOUNDS for a process owning n chips of a host (x,y,z chip grid).
CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
SLICE_BUILDER_PORT = 8476  # libtpu's default; processes sharing a host need distinct ones
_OLD_NAMES = ("TPU_HOST_BOUNDS", "TPU_CHIPS_PER_HOST_BOUNDS")  # what older Ray sets for 1-2 chip actors


def host_local_tpu_env(chips: list[int]) -> dict[str, str]:
    """Environment making a process a one-process TPU slice of these chips of its host."""
    if len(chips) not in CHIP_BOUNDS:
        raise ValueError(f"a TPU process owns 1, 2, 4 or 8 chips of a host, not {len(chips)} ({chips})")
    port = SLICE_BUILDER_PORT + min(chips)  # chip sets on a host are disjoint, so ports differ
    return {"TPU_PROCESS_BOUNDS": "1,1,1", "TPU_CHIPS_PER_PROCESS_BOUNDS": CHIP_BOUNDS[len(chips)],
            "TPU_VISIBLE_CHIPS": ",".join(map(str, chips)), "TPU_PROCESS_PORT": str(port),
            "TPU_PROCESS_ADDRESSES": f"localhost:{port}", "CLOUD_TPU_TASK_ID": "0",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def visible_tpu_chips(env=os.environ) -> list[int]:
    """The chips Ray gave this process ($TPU_VISIBLE_CHIPS), else every chip of the host."""
    if env.get("TPU_VISIBLE_CHIPS"):
        return [int(c) for c in env["TPU_VISIBLE_CHIPS"].split(",")]
    count = len(glob.glob("/dev/accel*")) or len([d for d in glob.glob("/dev/vfio/*") if d.split("/")[-1].isdigit()])
    return list(range(count))


def initialize(mode: str | None = None, env=os.environ) -> dict:
    """Apply `mode` (default: $TROPICAL_JAX_DISTRIBUTED, else off). Returns what it did: the variables
    set (host) or the arguments given to jax.distributed.initialize (slice)."""
    mode = mode or env.get(ENV) or "off"
    if mode not in MODES:
        raise ValueError(f"--jax-distributed must be one of {MODES}, got {mode!r}")
    env[ENV] = mode  # children (subprocesses, local Ray workers) inherit the choice
    if mode == "off":
        return {}
    if mode == "host":
        chips = visible_tpu_chips(env)
        if not chips:  # not a TPU host (GPU hosts: Ray's CUDA_VISIBLE_DEVICES already confines us)
            return {}
        for name in _OLD_NAMES:
            env.pop(name, None)
        values = host_local_tpu_env(chips)
        env.update(values)
        return values
    import jax

    kwargs = {}
    if env.get("JAX_NUM_PROCESSES"):
        kwargs = {"coordinator_address": env.get("JAX_COORDINATOR_ADDRESS"),
                  "num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
    jax.distributed.initialize(**kwargs)
    return kwargs
