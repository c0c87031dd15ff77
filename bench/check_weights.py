"""Random-weight Hugging Face Llama checkpoints at a real model's shape, written fast enough for a timed check.

Values are bf16 of random sign and mantissa in +-[2^-7, 2^-6) (std ~0.012, like an initialised model's
0.02), norms 1. Drawing 16 GB of random numbers takes minutes on one core, so one 64 MiB block is drawn
and every tensor repeats it from its own random offset (the period is prime, so rows of a matrix are not
copies of each other). Speed does not depend on the values; nothing here is meant to be a good model.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from bench.check_parts import MAX_POSITIONS, param_count

BLOCK = 33_554_393  # a prime number of bf16 values, ~64 MiB


def _random_bits(rng) -> np.ndarray:
    bits = rng.integers(0, 1 << 16, BLOCK, dtype=np.uint16)
    return (bits & 0x807F) | 0x3C00  # sign and mantissa random, exponent 2^-7


class _Filler:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.block = _random_bits(self.rng)

    def __call__(self, *shape) -> np.ndarray:
        left, at, pieces = int(np.prod(shape)), int(self.rng.integers(0, BLOCK)), []
        while left:  # the block from `at` on, wrapping around as often as the tensor needs
            take = min(left, BLOCK - at)
            pieces.append(self.block[at:at + take])
            left, at = left - take, 0
        return np.concatenate(pieces).view(ml_dtypes.bfloat16).reshape(shape)


def _layer(fill, cfg: dict, i: int) -> dict[str, np.ndarray]:
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    ones = np.ones(d, ml_dtypes.bfloat16)
    return {p + "self_attn.q_proj.weight": fill(q, d), p + "self_attn.k_proj.weight": fill(kv, d),
            p + "self_attn.v_proj.weight": fill(kv, d), p + "self_attn.o_proj.weight": fill(d, q),
            p + "mlp.gate_proj.weight": fill(inter, d), p + "mlp.up_proj.weight": fill(inter, d),
            p + "mlp.down_proj.weight": fill(d, inter),
            p + "input_layernorm.weight": ones, p + "post_attention_layernorm.weight": ones}


def write_checkpoint(cfg: dict, path: str | Path, seed: int = 0) -> dict:
    """A HF Llama directory (config.json, one safetensors file per layer and an index) that both
    tropical_jax and transformers load. -> {"params", "bytes"}."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**cfg, max_position_embeddings=MAX_POSITIONS, eos_token_id=None,
                                      bos_token_id=None, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    config.save_pretrained(path)
    fill = _Filler(seed)
    d, vocab = cfg["hidden_size"], cfg["vocab_size"]
    weight_map, total = {}, 0

    def save(name, tensors):  # file by file: a 16 GB model never sits in host memory whole
        nonlocal total
        save_file(tensors, path / name, metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = name
            total += value.nbytes

    embed = {"model.embed_tokens.weight": fill(vocab, d), "model.norm.weight": np.ones(d, ml_dtypes.bfloat16)}
    if not cfg.get("tie_word_embeddings"):
        embed["lm_head.weight"] = fill(vocab, d)
    save("model-embed.safetensors", embed)
    for i in range(cfg["num_hidden_layers"]):
        save(f"model-layer{i:03d}.safetensors", _layer(fill, cfg, i))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert total == 2 * param_count(cfg), (total, param_count(cfg))
    return {"params": param_count(cfg), "bytes": total}
