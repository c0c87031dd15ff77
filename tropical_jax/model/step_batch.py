"""The fixed-shape metadata of one device step: a prefill chunk plus a decode batch.

The chunk packs up to N segments, each a run of one sequence's prompt tokens on top of what that
sequence has cached, back to back: several short prompts prefill in one step."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class StepBatch(NamedTuple):
    chunk_tokens: jnp.ndarray  # int32[C]   the segments' prompt tokens back to back, padded after them
    chunk_starts: jnp.ndarray  # int32[N]   tokens of each segment's sequence already cached
    chunk_lens: jnp.ndarray  # int32[N]   tokens of each segment (0: unused slot; all 0: no chunk)
    chunk_block_tables: jnp.ndarray  # int32[N, P]
    dec_tokens: jnp.ndarray  # int32[B]   last sampled token of each decoding sequence
    dec_positions: jnp.ndarray  # int32[B]   its position (= tokens already cached)
    dec_block_tables: jnp.ndarray  # int32[B, P]
    dec_mask: jnp.ndarray  # bool[B]    False for padding rows

    @property
    def chunk_size(self) -> int:
        return self.chunk_tokens.shape[0]

    @property
    def batch_size(self) -> int:
        return self.dec_tokens.shape[0]
