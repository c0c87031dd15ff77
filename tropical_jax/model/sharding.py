"""Tensor-parallel shardings over a mesh's "model" axis.

Attention heads and FFN columns are split (column-parallel in, row-parallel out) so each device
holds whole heads; embeddings and norms are replicated; the LM head is split on the vocabulary.
XLA (GSPMD) inserts the collectives from these annotations.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config import ModelConfig

AXIS = "model"

_COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"}
_ROW = {"o_proj", "down_proj"}


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    if cfg.num_heads % tp or cfg.intermediate_size % tp:
        raise ValueError(f"tensor parallelism {tp} must divide num_heads ({cfg.num_heads}) and "
                         f"intermediate_size ({cfg.intermediate_size})")


def _spec(path: tuple, ndim: int) -> P:
    names = {str(p) for p in path}
    if names & _COLUMN:
        # kernel [in, out] splits its output columns; a bias [out] splits likewise
        return P(None, AXIS) if ndim == 2 else P(AXIS)
    if names & _ROW:
        return P(AXIS, None) if ndim == 2 else P()
    return P()


def param_shardings(params, mesh: Mesh):
    """A pytree of NamedShardings matching `params` (an nnx.State or its pure dict)."""

    def one(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        return NamedSharding(mesh, _spec(keys, len(leaf.shape)))

    return jax.tree_util.tree_map_with_path(one, params)


def kv_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    tp = mesh.shape[AXIS]
    if cfg.num_kv_heads % tp:
        # Fewer KV heads than devices (e.g. MQA): keep pools whole on every device.
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(None, None, AXIS, None))


def make_mesh(devices) -> Mesh:
    import numpy as np

    return Mesh(np.asarray(devices), (AXIS,))
