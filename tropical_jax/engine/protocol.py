"""The engine as the api layer sees it: one small protocol, and the events it calls back with.

The api never touches scheduler queues, workers or token state: it submits, aborts, drives the
engine on its own thread when the engine asks for that (`inline`), and reads `snapshot()`. Every
change of a request reaches it as an EngineEvent through the one `on_event` callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..sampling_params import SamplingParams
from ..sched.request import Request

# Event kinds: "scheduled" (the prefill started); "token" (tokens came); "finished" (the request ended:
# the last tokens, if any, ride on it, and request.finish_reason is "stop" or "length"); "rejected"
# (refused: shed or queue timeout); "aborted" (the client left, or its step failed); "failed" (the
# engine can serve no more: request is None, text says why).


@dataclass
class EngineEvent:
    kind: str
    request: Request | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""


class ServingEngine(Protocol):
    on_event: Callable[[EngineEvent], None] | None  # called on whichever thread made the change
    inline: bool  # True: the owner's thread runs the steps (run_once); False: the engine's threads do

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    ttft_slo: float | None = None, tpot_slo: float | None = None,
                    arrival: float | None = None) -> Request:
        """Validate and submit (ValueError on bad input, nothing admitted). None SLOs: the defaults."""

    def abort(self, request_id: str) -> None:
        """Stop the request and free its pages (an "aborted" event follows); unknown ids are ignored."""

    def start(self) -> None:
        """Engines that are not inline start their own threads (once, before serving)."""

    def run_once(self) -> bool:
        """Inline engines: run the next step; False if none could run (wait for a request or the
        timer). Raises if the step failed; its requests have ended with finish_reason "error" by then."""

    def seconds_to_timer(self) -> float | None:
        """When the engine next needs run_once though nothing happens (a queue timeout): seconds, or None."""

    def snapshot(self) -> dict:
        """Workers (role, queue, running, KV pages, banked slack), policy, dispatch counts."""

    def close(self) -> None:
        """Stop the engine's threads and release its workers."""
