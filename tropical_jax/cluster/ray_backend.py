"""Ray backend (`backend="ray"`): each cluster worker a Ray actor owning its devices and mesh.

The scheduler and the worker loops stay on the driver (engine/core.py); a RayWorker handle
forwards the loop's calls to its actor, which runs an InProcessWorker (model, KV pools, page
copies) in its own process and JAX runtime. What crosses: a step's padded int32 metadata and
sampling arrays (runtime.executor.StepInputs), the sampled ids, and on a KV handoff the request's
pages as host numpy arrays (per layer, only the pages used). A handoff passes the source actor's
result to the destination actor as an object ref, so the pages go actor to actor through Ray's
object store and never through the driver.

Devices: on a CPU-only Ray cluster each actor gets JAX_PLATFORMS=cpu and
--xla_force_host_platform_device_count=<its tp> (one emulated device per shard) and reserves no
CPUs (num_cpus=0): for trying layouts on one machine. On a cluster with GPUs an actor asks for
num_gpus=tp (Ray sets CUDA_VISIBLE_DEVICES); with TPUs, resources={"TPU": tp} (Ray sets
TPU_VISIBLE_CHIPS; cluster/distributed.py's "host" mode, from the raylet's environment, makes the
actor a one-process slice of those chips). Those two paths are written but have not been run (no
accelerators where this was built). The driver never touches devices: with no profile, the cost
model is measured on the first actor.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..config import EngineConfig
from ..model.loader import model_path
from ..runtime.executor import STEP_KINDS, StepInputs
from .workers import InProcessWorker, step_kinds


def import_ray():
    # Ray's native crash handler would take the SIGTERM a server drains on, print a bogus crash trace
    # and abort the process after the drain (exit -6, not 0). Read when ray is first imported.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        import ray
    except ImportError:
        raise ImportError("backend='ray' needs Ray: pip install 'tropical-jax[ray]'") from None
    return ray


def connect(address: str | None = None):
    """Ray, initialised: already (as a test or the user did), at `address`, at $RAY_ADDRESS, or a new
    local instance."""
    global _started_here
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="warning")
        _started_here = True
    return ray


_started_here = False  # connect() initialised Ray (so disconnect() may shut it down)


def disconnect() -> None:
    """Shut Ray down if connect() started it: a local Ray's processes must not outlive the server."""
    global _started_here
    if _started_here:
        import_ray().shutdown()
        _started_here = False


class WorkerActor:
    """The actor's body: an InProcessWorker on the first `tp` devices of the actor's process."""

    def __init__(self, model: str | None, dtype: str, engine_cfg: EngineConfig, tp: int, kinds=STEP_KINDS,
                 name: str = "worker"):
        import jax

        from .distributed import initialize

        # Before JAX starts its backend: $TROPICAL_JAX_DISTRIBUTED=host (set for `ray start` by the
        # deploy scripts) confines an actor on a multi-host TPU slice to the chips Ray gave it.
        initialize()
        devices = jax.devices()
        if len(devices) < tp:
            raise RuntimeError(f"this actor sees {len(devices)} device(s) ({devices}), its worker needs tp={tp}")
        self.worker = InProcessWorker(model, dtype, engine_cfg, devices[:tp], kinds, name)

    def where(self) -> dict:
        """The actor's process and devices (tests check that each worker has its own)."""
        import socket

        return {"host": socket.gethostname(), "pid": os.getpid(),
                "devices": [str(d) for d in self.worker.devices]}

    def warmup(self, progress: bool) -> None:
        self.worker.warmup(progress)

    def step(self, inputs: StepInputs) -> np.ndarray:
        return self.worker.step(inputs)

    def read_pages(self, pages: list[int]):
        return self.worker.host_pages(pages)

    def write_pages(self, pages: list[int], payload) -> None:
        self.worker.write_pages(pages, payload)

    def profile(self, progress: bool) -> dict:
        return self.worker.profile(progress)


def actor_platform(resources: dict) -> str:
    """The JAX platform actor_options gives the actors of a Ray cluster with these resources."""
    return "gpu" if resources.get("GPU", 0) > 0 else "tpu" if resources.get("TPU", 0) > 0 else "cpu"


def workers_platform(address: str | None = None) -> str:
    """The platform the workers' actors will run on (the driver's own devices may differ)."""
    return actor_platform(connect(address).cluster_resources())


def actor_options(tp: int, resources: dict, xla_flags: str | None = None) -> dict:
    """Ray options giving an actor the devices of a tp-way worker (see the module docstring)."""
    platform = actor_platform(resources)
    if platform == "gpu":
        return {"num_gpus": tp}
    if platform == "tpu":
        return {"resources": {"TPU": tp}}
    flags = xla_flags if xla_flags is not None else os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", flags).split()
    flags.append(f"--xla_force_host_platform_device_count={tp}")
    return {"num_cpus": 0, "runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}}}


class RayWorker:
    """The driver's handle on one WorkerActor: InProcessWorker's calls, forwarded."""

    def __init__(self, ray, actor, progress: bool):
        self.ray, self.actor = ray, actor
        self._warming = actor.warmup.remote(progress)  # queued behind the model load; actors warm in parallel

    def warmup(self, progress: bool = True) -> None:
        ref, self._warming = self._warming, None
        self.ray.get(ref if ref is not None else self.actor.warmup.remote(progress))

    def step(self, inputs: StepInputs) -> np.ndarray:
        return self.ray.get(self.actor.step.remote(inputs))

    def read_pages(self, pages):
        """An object ref to the pages' host arrays: write_pages hands it to the destination actor."""
        return self.actor.read_pages.remote([int(p) for p in pages])

    def write_pages(self, pages, payload) -> None:
        self.ray.get(self.actor.write_pages.remote([int(p) for p in pages], payload))

    def profile(self, progress: bool = True) -> dict:
        return self.ray.get(self.actor.profile.remote(progress))

    def where(self) -> dict:
        return self.ray.get(self.actor.where.remote())

    def close(self) -> None:
        self.ray.kill(self.actor)


def ray_workers(model, cluster, engine_cfg: EngineConfig, dtype, address: str | None = None,
                progress: bool = True, policy=None) -> dict[str, RayWorker]:
    """One actor per cluster worker, each loading the model from the same local path and compiling
    the steps of its role (each actor checks its own process's mapping budget at warmup)."""
    ray = connect(address)
    resources = ray.cluster_resources()
    remote = ray.remote(WorkerActor)
    path = str(model_path(model).resolve())  # actors need not share the driver's working directory
    dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return {w.name: RayWorker(ray, remote.options(**actor_options(w.tp, resources)).remote(
        path, dtype, engine_cfg, w.tp, step_kinds(w.role, policy), w.name), progress) for w in cluster.workers}
