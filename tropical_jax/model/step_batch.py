"""The fixed-shape metadata of one device step: at most one prefill chunk plus a decode batch."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class StepBatch(NamedTuple):
    chunk_tokens: jnp.ndarray  # int32[C]   prompt tokens of the chunk, padded after chunk_len
    chunk_start: jnp.ndarray  # int32[]    tokens of that sequence already cached
    chunk_len: jnp.ndarray  # int32[]    valid tokens in the chunk (0: no chunk)
    chunk_block_table: jnp.ndarray  # int32[P]
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
