"""Load weights: Hugging Face safetensors directories and our own orbax checkpoints.

No network, ever: paths are local directories. `load_model` tells the two apart (an orbax
checkpoint of ours has a `params/` directory beside `config.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from ..config import ModelConfig
from .checkpoint import OURS_CONFIG, restore_params
from .llama import build_model
from .sharding import check_tensor_parallel, param_shardings

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "default"


def abstract_state(cfg: ModelConfig, dtype):
    """(graphdef, State of ShapeDtypeStructs) without allocating weights."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, dtype)))
    return graphdef, state


def _hf_tensors(path: Path) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def hf_to_pure_dict(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Map HF parameter names onto our module tree; HF Linear weights are [out, in]."""

    def take(name):
        try:
            return tensors[name]
        except KeyError:
            raise ValueError(f"checkpoint is missing tensor {name!r}") from None

    def linear(prefix, bias):
        d = {"kernel": take(prefix + ".weight").T}
        if bias:
            d["bias"] = take(prefix + ".bias")
        return d

    layers = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = {n: linear(p + "self_attn." + n, cfg.attention_bias and n != "o_proj")
                for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        layers[i] = {
            "input_layernorm": {"weight": take(p + "input_layernorm.weight")},
            "post_attention_layernorm": {"weight": take(p + "post_attention_layernorm.weight")},
            "self_attn": attn,
            "mlp": {n: linear(p + "mlp." + n, False) for n in ("gate_proj", "up_proj", "down_proj")},
        }
    pure = {"embed_tokens": {"embedding": take("model.embed_tokens.weight")}, "layers": layers,
            "norm": {"weight": take("model.norm.weight")}}
    if not cfg.tie_word_embeddings:
        pure["lm_head"] = linear("lm_head", False)
    return pure


def _place(pure: dict, state, mesh, dtype, cfg: ModelConfig):
    """Put a host pure dict onto devices with the target shardings (replicated if no mesh)."""
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: np.asarray(a), pure))
    if mesh is None:
        return jax.tree.map(lambda a: jnp.asarray(a, dtype), state)
    shardings = param_shardings(state, mesh, cfg)
    return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a, dtype), s), state, shardings)


def load_tokenizer(path: Path):
    """The directory's tokenizer, or None if it ships none (token-id prompts still work)."""
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def is_orbax_checkpoint(path: Path) -> bool:
    return (path / OURS_CONFIG).exists() and (path / "params").is_dir()


def model_path(path=None) -> Path:
    """The checkpoint directory load_model reads: `path`, or the embedded default."""
    if path is None and not DEFAULT_CHECKPOINT.is_dir():
        # checkpoints/ sits beside the package in the source tree; only an editable install sees it.
        raise FileNotFoundError(f"the embedded default model is not at {DEFAULT_CHECKPOINT}: install from a "
                                "clone with `pip install -e .`, or pass a model directory")
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a directory (only local paths are loaded)")
    return path


def read_config(path=None) -> ModelConfig:
    """The model's shape without its weights (orbax or Hugging Face directory)."""
    path = model_path(path)
    if is_orbax_checkpoint(path):
        return ModelConfig.from_dict(json.loads((path / OURS_CONFIG).read_text()))
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has neither {OURS_CONFIG} (orbax) nor config.json (Hugging Face)")
    return ModelConfig.from_hf(json.loads(cfg_file.read_text()))


def load_model(path=None, dtype=jnp.float32, mesh=None, with_tokenizer: bool = True):
    """-> (ModelConfig, graphdef, params, tokenizer or None) from an HF dir or our orbax dir."""
    path = model_path(path)
    dtype = jnp.dtype(dtype)
    cfg = read_config(path)
    if mesh is not None:
        check_tensor_parallel(cfg, mesh.shape["model"])
    graphdef, state = abstract_state(cfg, dtype)
    if is_orbax_checkpoint(path):
        params = restore_params(path / "params", state, mesh, dtype, cfg)
    else:
        params = _place(hf_to_pure_dict(cfg, _hf_tensors(path)), state, mesh, dtype, cfg)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return cfg, graphdef, params, tokenizer
