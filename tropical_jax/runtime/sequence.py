"""A request's tokens inside the engine: prompt, sampled ids, text, and the block table of the
worker running its step. The request itself (identity, status, timings) is its sched.Request, which
keys this state (engine/core.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..kv.allocator import BlockTable
from ..sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_table: BlockTable = field(default_factory=BlockTable)  # the scheduler's, on the worker stepping it
    text: str = ""
    seed: int = 0
    # Incremental detokenization: output_ids[prefix_offset:read_offset] is the window last decoded.
    prefix_offset: int = 0
    read_offset: int = 0
    num_streamed: int = 0  # characters of text already returned as new text
    stop_ids: frozenset = frozenset()  # params.stop_token_ids as a set: checked on every token

    def __post_init__(self):
        # An unseeded request still needs a key; draw one so its samples differ from others'.
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(32)
        self.stop_ids = frozenset(self.params.stop_token_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]


def append_token(seq: Sequence, token: int, tokenizer, eos_token_ids, max_model_len: int) -> tuple[str | None, str]:
    """Record a sampled token; returns (finish reason or None, new text to stream).

    EOS (unless ignore_eos) and stop token ids finish with "stop", so do stop strings (the text is cut
    before them); max_tokens or a full context finish with "length". While stop strings may still
    match, the last len(longest stop) - 1 characters are held back, so no part of a stop string is
    ever streamed."""
    seq.output_ids.append(token)
    sp = seq.params
    reason = None
    if (token in eos_token_ids and not sp.ignore_eos) or token in seq.stop_ids:
        reason = "stop"
    elif len(seq.output_ids) >= sp.max_tokens or seq.num_tokens >= max_model_len:
        reason = "length"
    if tokenizer is None:
        return reason, ""
    text = seq.text + _new_text(seq, tokenizer, flush=reason is not None)
    longest = max(map(len, sp.stop), default=0)
    if longest:  # only an occurrence that reaches into the new text can be new
        start = max(0, len(seq.text) - longest + 1)
        cut = min((i for i in (text.find(s, start) for s in sp.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
    seq.text = text
    hold = 0 if reason is not None else max(longest - 1, 0)
    end = max(seq.num_streamed, len(text) - hold)
    new_text, seq.num_streamed = text[seq.num_streamed:end], end
    return reason, new_text


def _new_text(seq: Sequence, tokenizer, flush: bool) -> str:
    """The text the newest token adds, decoding only a short window of tokens (decoding the whole
    output on every token costs O(n^2)). The window starts a few tokens back, so a tokenizer that
    drops a leading space at the start of a decode drops it from both strings compared. A trailing
    partial UTF-8 character is held back until its bytes complete, or the sequence ends (flush)."""
    ids = seq.output_ids
    before = _decode(tokenizer, ids[seq.prefix_offset:seq.read_offset])
    after = _decode(tokenizer, ids[seq.prefix_offset:])
    if len(after) <= len(before) or (after.endswith("\ufffd") and not flush):
        return ""
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    return after[len(before):]


def _decode(tokenizer, ids) -> str:
    """tokenizer.decode(ids, skip_special_tokens=True); through the Rust tokenizer directly when
    transformers would add nothing (no space clean-up): its Python wrapper costs ~30 us a call, two
    calls a token, 2 ms a step at batch 32."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids, skip_special_tokens=True)
