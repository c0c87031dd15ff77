"""One request inside an engine: its tokens, pages, progress and stop conditions."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

from ..kv.allocator import BlockTable
from ..sampling_params import SamplingParams

_ids = itertools.count()


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)
    on_output: object = None  # callable(seq, new_token_ids, new_text) for streaming; called on the engine thread
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in this sequence's pages
    block_table: BlockTable = field(default_factory=BlockTable)
    text: str = ""
    finish_reason: str | None = None
    num_preemptions: int = 0
    seed: int = 0

    def __post_init__(self):
        # An unseeded request still needs a key; draw one so its samples differ from others'.
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(32)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def in_prefill(self) -> bool:
        """True until every token but the last sampled one is cached (decode caches one per step)."""
        return self.num_cached < len(self.all_ids) - (1 if self.output_ids else 0)

    @property
    def prefill_remaining(self) -> int:
        return len(self.all_ids) - self.num_cached
