"""A request as the scheduler sees it: what arrived, its SLOs, and what happened to it.

Times are seconds on the scheduler's clock (virtual in the simulator, wall time in the engine).
Decisions may read the prompt, `max_tokens`, the SLOs and the recorded history; they must never
read `output_len`, which only the simulator's executor uses to decide when a request stops (a
server does not know it). Metrics (sched/metrics.py) read the recorded outcome.

A request's life (`status`): WAITING (submitted, or preempted and waiting to be recomputed) ->
PREFILLING (a chunk of its prompt ran) -> DECODING (its first token came) -> FINISHED, with
`finish_reason` "stop" (the engine saw EOS or a stop sequence) or "length" (max_tokens). It may end
early instead: REJECTED (finish_reason "rejected": shed, or no worker can hold it; "queue_timeout":
not started in time) or ABORTED (finish_reason "abort": the client went away). `status_reason` says
why, in words, for the last two.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    REJECTED = "rejected"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.REJECTED, RequestStatus.ABORTED)


# Where a request's prefill ran ("path"):
PATH_PREFILL = "prefill"      # on a prefill (P) worker, then KV handed to a multiplexing/decode worker
PATH_INLINE = "inline"        # inline on a multiplexing (M) worker, in mixed steps
PATH_COLOCATED = "colocated"  # on a colocated (C) worker (policies colocated and chunked)
PATH_REJECTED = "rejected"    # never served (queue_timeout passed, or shed)


@dataclass(eq=False)
class Request:
    id: int | str
    arrival: float            # s
    prompt_len: int
    max_tokens: int
    ttft_slo: float | None = None   # s; None -> filled at submit: ttft_scale x cost_model.t_prefill(prompt_len)
    tpot_slo: float = 0.1           # s
    output_len: int | None = None   # simulator only: tokens this request will generate (1 <= output_len)
    prompt_token_ids: list[int] | None = field(default=None, repr=False)  # real engine only
    sheddable: bool = True  # False: its TTFT SLO is a server default the client never asked for: not shed for it

    # ---- recorded outcome (written by the scheduler) ----
    first_scheduled: float | None = None   # first time any of its prefill ran
    first_token_time: float | None = None  # TTFT ends here
    last_token_time: float | None = None
    n_out: int = 0                          # tokens generated, the first included
    transfer_time: float = 0.0              # KV handoff P -> M (s), 0 for inline/colocated
    finish_time: float | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None        # stop | length | rejected | queue_timeout | abort
    status_reason: str = ""                 # why it was rejected or aborted
    path: str | None = None                 # PATH_* above
    prefill_worker: str | None = None       # worker name, e.g. "P0", "M1", "C0"
    decode_worker: str | None = None
    late: bool = False                      # dispatched best effort: its deadline could no longer be met
    recomputed: bool = False                # a failed KV transfer made the decode worker redo the prefill

    # ---- scheduler bookkeeping (not outcome) ----
    prefilled: int = field(default=0, repr=False)      # tokens of the current prefill already in a KV cache
    recompute_len: int = field(default=0, repr=False)  # > 0 while a recompute (lost KV) is pending: tokens to redo
    # an inline planned ahead of queued inlines (docs/algorithm.md, The short-prompt lane)
    jumped: bool = field(default=False, repr=False)

    @property
    def prefill_target(self) -> int:
        """Tokens the current prefill must bring into the cache (the prompt, or the lost KV)."""
        return self.recompute_len or self.prompt_len

    @property
    def deadline(self) -> float:
        """Latest time for the first token: arrival + ttft_slo."""
        return self.arrival + self.ttft_slo

    @property
    def rejected(self) -> bool:
        return self.status is RequestStatus.REJECTED

    @property
    def done(self) -> bool:
        return self.status.terminal

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def tpot(self) -> float | None:
        """(last - first) / (n_out - 1); a request with one output token has TPOT 0 (met)."""
        if self.first_token_time is None:
            return None
        if self.n_out <= 1:
            return 0.0
        return (self.last_token_time - self.first_token_time) / (self.n_out - 1)

    @property
    def queueing(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def attained(self) -> bool:
        """Both SLOs met (docs/algorithm.md, Metrics and goodput). Rejected or unfinished requests never attain."""
        if self.rejected or self.finish_time is None:
            return False
        return self.ttft <= self.ttft_slo and self.tpot <= self.tpot_slo

    @property
    def ttft_attained(self) -> bool:
        return not self.rejected and self.ttft is not None and self.ttft <= self.ttft_slo

    @property
    def tpot_attained(self) -> bool:
        return not self.rejected and self.finish_time is not None and self.tpot <= self.tpot_slo
