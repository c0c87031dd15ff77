"""Our checkpoint format: OUT_DIR holds tropical_config.json (ModelConfig), params/ (orbax
StandardCheckpointer), and the tokenizer files copied from the source. Restore goes straight into
the target sharding. model/loader.py reads it; `python -m tropical_jax.checkpoint convert` writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from .sharding import param_shardings

OURS_CONFIG = "tropical_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_checkpoint(out_dir, cfg, params, tokenizer_dir=None) -> Path:
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / OURS_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out / "params", nnx.to_pure_dict(params), force=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copy(src, out / name)
    return out


def restore_params(params_dir: Path, abstract_state, mesh, dtype, cfg):
    """Restore into `abstract_state`'s structure, each array already on its target sharding."""
    pure = nnx.to_pure_dict(abstract_state)
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=sharding), pure)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                              pure, param_shardings(pure, mesh, cfg))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(Path(params_dir).resolve(), target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return abstract_state
