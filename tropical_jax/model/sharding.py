"""Tensor-parallel shardings over a mesh's "model" axis.

Attention heads and FFN columns are split (column-parallel in, row-parallel out) so each device
holds whole heads; embeddings and norms are replicated (a lookup needs every row, and they are a
small share of the weights); the LM head is split on the vocabulary (each device scores its slice
and XLA gathers the logits). XLA (GSPMD) inserts the collectives from these annotations.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config import ModelConfig

AXIS = "model"

_COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"}
_ROW = {"o_proj", "down_proj"}


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    if cfg.num_heads % tp or cfg.intermediate_size % tp:
        raise ValueError(f"tensor parallelism {tp} must divide num_heads ({cfg.num_heads}) and "
                         f"intermediate_size ({cfg.intermediate_size})")


def _replicated_columns(cfg: ModelConfig, tp: int) -> set[str]:
    """Column-parallel layers that must stay whole on this mesh."""
    whole = set()
    if cfg.num_kv_heads % tp:
        # Splitting would cut a KV head across devices; the pools are replicated (kv_sharding), so
        # every device computes all K/V heads (cheap under GQA: kv_heads << heads).
        whole |= {"k_proj", "v_proj"}
    if cfg.vocab_size % tp:
        whole.add("lm_head")  # JAX shardings must divide the dimension evenly
    return whole


def _spec(names: set[str], ndim: int, whole: set[str]) -> P:
    if names & _COLUMN and not names & whole:
        # kernel [in, out] splits its output columns; a bias [out] splits likewise
        return P(None, AXIS) if ndim == 2 else P(AXIS)
    if names & _ROW:
        return P(AXIS, None) if ndim == 2 else P()
    return P()


def param_shardings(params, mesh: Mesh, cfg: ModelConfig):
    """A pytree of NamedShardings matching `params` (an nnx.State or its pure dict)."""
    whole = _replicated_columns(cfg, mesh.shape[AXIS])

    def one(path, leaf):
        names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
        return NamedSharding(mesh, _spec(names, len(leaf.shape), whole))

    return jax.tree_util.tree_map_with_path(one, params)


def kv_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """Pools [pages, page_size, kv_heads, head_dim] split on kv heads, like k_proj/v_proj."""
    if cfg.num_kv_heads % mesh.shape[AXIS]:
        # Fewer KV heads than devices (e.g. MQA) or an uneven split: keep pools whole on every device.
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(None, None, AXIS, None))


def make_mesh(devices) -> Mesh:
    return Mesh(np.asarray(devices), (AXIS,))
