"""What the scheduler hands a worker to run: one device step (StepPlan), and KV handoffs (Transfer).

A step is a shape the engine's device step runs: prefill chunks of one or more sequences, packed
back to back into one chunk of the engine (it costs what one chunk of their total length on their
total cached context costs), plus a decode batch. Executors (the simulator's cost model, the real JAX
runtime) run it and report back with Scheduler.step_done.
"""

from __future__ import annotations

from dataclasses import dataclass

from tropical_jax.sched.request import Request


STEP_KINDS = ("prefill", "decode", "mixed")


@dataclass
class Chunk:
    request: Request
    start: int        # tokens of this sequence already cached (first position of the chunk)
    length: int       # tokens in this chunk
    last: bool        # the chunk completes the prefill
    recompute: bool   # re-prefill of lost KV (failed transfer / preemption): its last chunk emits no token


def packed_shape(chunks: list[Chunk]) -> tuple[int, int]:
    """(C, ctx) of segments packed into one chunk: their new tokens, and the cached tokens they read
    besides their own (the cost model's chunk shape)."""
    return sum(c.length for c in chunks), sum(c.start for c in chunks)


@dataclass
class StepPlan:
    worker: str
    chunks: list[Chunk]    # packed prefill segments, the first one the worker's choice; [] if none
    decodes: list[Request]
    decode_tokens: int     # T: KV tokens the decode batch reads (sum over decodes of their context)
    predicted: float       # predicted duration, s (cost model, without the safety factor)
    start: float

    @property
    def kind(self) -> str:
        """One of STEP_KINDS: prefill chunks only, decodes only, or both (a mixed step)."""
        return "mixed" if self.chunks and self.decodes else ("prefill" if self.chunks else "decode")

    @property
    def end(self) -> float:
        """Predicted end of the step."""
        return self.start + self.predicted

    def emitting(self) -> list[Request]:
        """Requests that receive a token when this step completes."""
        return list(self.decodes) + [c.request for c in self.chunks if c.last and not c.recompute]


@dataclass
class Transfer:
    """Move a request's KV (`tokens` tokens) from worker src to worker dst. Both block tables are in
    the scheduler (Scheduler.block_table); the destination's pages are allocated before the copy."""
    request: Request
    src: str
    dst: str
    tokens: int
    start: float
