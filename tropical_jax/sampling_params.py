"""Per-request sampling settings (the offline API's and the server's)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100, f"temperature must be in [0, 100], got {self.temperature!r}"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1), f"top_k must be -1 (off) or >= 1, got {self.top_k!r}"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32), f"seed must be None or an integer in [0, 2**32), got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"),
        ]
        for ok, message in checks:
            if not ok or isinstance(self.max_tokens, bool):
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
