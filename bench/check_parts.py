"""What every part of bench/accelerator_check.py shares: its settings, its progressive record, the model shapes.

A part runs in its own process and records each result as soon as it has it (the file is rewritten
whole, atomically), so a part killed at its time limit still leaves what it finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class Skipped(Exception):
    """A part that cannot run here (e.g. no GPU for torch): recorded with its reason, not a failure."""


class Record:
    """One part's results file: {"results": {...}, "failures": [...], "skipped": reason or None}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data = {"results": {}, "failures": [], "skipped": None}
        self.save()

    def __setitem__(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.save()
        print(json.dumps({key: value}), flush=True)

    def fail(self, message: str) -> None:
        self.data["failures"].append(message)
        self.save()
        print(f"FAILED: {message}", flush=True)

    def skip(self, reason: str) -> None:
        self.data["skipped"] = reason
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# Hugging Face Llama configs of real models (random weights are written at these shapes), largest first,
# and the tiny one the CPU smoke run uses. max_position_embeddings leaves room for an 8k prompt and its
# first token (Llama-3 itself says 8192).
MODELS = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, rope_theta=500000.0,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         tie_word_embeddings=True),
    # The server's model: its part checks the cluster and the API on the devices, not speed.
    "small-4layer": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=128),
}
MAX_POSITIONS = 8448
WEIGHT_SHARE = 0.4  # weights may fill this much of the device; the rest is KV pages and step temporaries


def param_count(cfg: dict) -> int:
    """Parameters of a Llama config (norm weights included)."""
    d, layers, heads, kvh = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    per_layer = d * hd * (2 * heads + 2 * kvh) + 3 * d * cfg["intermediate_size"] + 2 * d
    embeddings = cfg["vocab_size"] * d * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + d


def pick_model(memory_bytes: int | None, smoke: bool) -> str:
    """The largest real shape whose bf16 weights fit WEIGHT_SHARE of the device (tiny for smoke runs;
    llama-3.2-1b where the memory is unknown)."""
    if smoke:
        return "tiny"
    if memory_bytes is None:
        return "llama-3.2-1b"
    for name in ("llama-3-8b", "llama-3.2-3b", "llama-3.2-1b"):
        if 2 * param_count(MODELS[name]) <= WEIGHT_SHARE * memory_bytes:
            return name
    return "small-4layer"


def load_settings(path: str) -> dict:
    return json.loads(Path(path).read_text())
