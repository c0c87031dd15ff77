"""The scheduler: requests, cost model, monitor, dispatch policies, per-worker batching, metrics.

Pure Python; imports nothing from JAX (the real engine and the simulator both drive it).
"""

from tropical_jax.sched.config import ClusterSpec, PolicyConfig, WorkerSpec, parse_cluster
from tropical_jax.sched.cost_model import CostModel, ProfileError
from tropical_jax.sched.plan import Chunk, StepPlan, Transfer
from tropical_jax.sched.request import Request, RequestStatus
from tropical_jax.sched.scheduler import DecisionRecord, Scheduler

__all__ = ["Chunk", "ClusterSpec", "CostModel", "DecisionRecord", "PolicyConfig", "ProfileError", "Request",
           "RequestStatus", "Scheduler", "StepPlan", "Transfer", "WorkerSpec", "parse_cluster"]
