"""Cost-model executor: how long the simulator says a step or a KV transfer takes, and when requests stop.

Step time = the cost model's prediction for the step's shape (packed chunk C on ctx cached tokens, B decodes
reading T KV tokens) times an optional multiplicative noise factor, lognormal with mean 1:
exp(noise·z − noise²/2), z ~ N(0, 1). KV transfer = latency + tokens · kv_bytes_per_token / bandwidth
(the profile's model shape gives the bytes per token); each transfer has its own link (no contention).
A step that starts while another worker runs one takes the profile's contention factor x longer
(workers sharing one host's cores; 1 on separate accelerators).
A request stops when it has produced min(output_len, max_tokens) tokens; only this executor reads
output_len — the scheduler never does.
"""

from __future__ import annotations

import math
import random

from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.plan import StepPlan, Transfer
from tropical_jax.sched.request import Request


class CostModelExecutor:
    def __init__(self, cost: CostModel, noise: float = 0.0, seed: int = 0, transfer_failure_rate: float = 0.0):
        if noise < 0 or not 0 <= transfer_failure_rate <= 1:
            raise ValueError("noise must be >= 0 and transfer_failure_rate in [0, 1]")
        self.cost = cost
        self.noise = noise
        self.transfer_failure_rate = transfer_failure_rate
        self.rng = random.Random(seed)

    def _factor(self) -> float:
        if not self.noise:
            return 1.0
        return math.exp(self.noise * self.rng.gauss(0.0, 1.0) - self.noise * self.noise / 2)

    def step_time(self, plan: StepPlan, shared: bool = False, predicted_by: CostModel | None = None) -> float:
        """shared: another worker runs a step while this one starts. predicted_by: the model that
        predicted plan.predicted (when it is this executor's, that prediction is the step's time)."""
        t = plan.predicted if predicted_by is self.cost else self.cost.t_plan(plan)
        return t * self._factor() * (self.cost.contention if shared else 1.0)

    @property
    def exact(self) -> bool:
        """Does a decode step take exactly the cost model's t_decode (no noise, no contention)?"""
        return not self.noise and self.cost.contention == 1.0

    @staticmethod
    def tokens(r: Request) -> int:
        """Tokens r produces in all (only this executor reads output_len)."""
        return r.max_tokens if r.output_len is None else min(r.output_len, r.max_tokens)

    @classmethod
    def stops(cls, r: Request) -> bool:
        """Does r stop at its next token? (r.n_out counts tokens produced before it.)"""
        return r.n_out + 1 >= cls.tokens(r)

    def finished(self, plan: StepPlan) -> list[Request]:
        """Requests whose token from this step is their last (call before step_done updates n_out)."""
        out = [r for r in plan.decodes  # stops(r), inlined: the hottest check of a simulated run
               if r.n_out + 1 >= (r.max_tokens if r.output_len is None or r.output_len > r.max_tokens else r.output_len)]
        if plan.chunks:
            out += [c.request for c in plan.chunks if c.last and not c.recompute and self.stops(c.request)]
        return out

    def steps_left(self, decodes: list[Request]) -> int:
        """How many decode steps of this batch, the one in flight included, end before one of its
        requests gets its last token."""
        return min([(r.max_tokens if r.output_len is None or r.output_len > r.max_tokens else r.output_len) - r.n_out
                    for r in decodes]) - 1  # tokens(r), inlined as in finished()

    def transfer(self, t: Transfer) -> tuple[float, bool]:
        """(duration, succeeded) of a KV handoff. A failure is noticed after the full transfer time."""
        ok = not (self.transfer_failure_rate and self.rng.random() < self.transfer_failure_rate)
        return self.cost.t_transfer(t.tokens) * self._factor(), ok
