"""Configuration dataclasses: the model's shape (read from Hugging Face configs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF llama3 form: factor, low/high_freq_factor, original_max_position_embeddings
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") not in ("default", "llama3"):
            raise ValueError(f"unsupported rope scaling {self.rope_scaling.get('rope_type')!r}: only 'llama3' is implemented")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {hf['hidden_act']!r}; only silu (SwiGLU) is implemented")
        # Llama's attention_bias also puts a bias on o_proj, and mlp_bias on the FFN; no released
        # Llama uses either, so we refuse them rather than silently dropping weights.
        for flag in ("attention_bias", "mlp_bias"):
            if arch == "LlamaForCausalLM" and hf.get(flag):
                raise ValueError(f"{arch} with {flag}=true is not supported (biases on o_proj / the FFN)")
        # transformers 5 keeps theta and scaling in rope_parameters; older configs use rope_theta / rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        if scaling is not None and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        window = hf.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
            window = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        num_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM",  # Qwen2 always has q/k/v biases; Mistral never
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
        )

    def check_context(self, max_model_len: int) -> None:
        """Refuse contexts the model cannot serve exactly (we do not implement sliding windows)."""
        if self.sliding_window is not None and self.sliding_window < max_model_len:
            raise ValueError(
                f"{self.architecture} uses a sliding window of {self.sliding_window} tokens, shorter than "
                f"max_model_len={max_model_len}; sliding-window attention is not implemented, so set "
                f"max_model_len <= {self.sliding_window}"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        """K and V bytes one token occupies across all layers (for transfer and memory planning)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def make_buckets(maximum: int, minimum: int = 1, linear_from: int = 256) -> tuple[int, ...]:
    """Sizes that double from `minimum` up to `linear_from`, then grow by `linear_from`, ending at `maximum`."""
    if maximum < minimum:
        raise ValueError(f"bucket maximum {maximum} is below minimum {minimum}")
    sizes, s = [], minimum
    while s < maximum:
        sizes.append(s)
        s = s * 2 if s < linear_from else s + linear_from
    sizes.append(maximum)
    return tuple(sizes)


@dataclass(frozen=True)
class EngineConfig:
    """How one worker runs the model: cache geometry, the closed set of step shapes, numerics."""

    max_model_len: int = 1024
    page_size: int = 16
    num_pages: int | None = None  # None: room for max_num_seqs sequences of max_model_len tokens
    max_num_seqs: int = 32  # largest decode batch
    max_chunk_tokens: int = 256  # largest prefill chunk
    max_prefill_seqs: int = 8  # prompts one chunk may pack (each gets a sampled row in chunk steps)
    chunk_buckets: tuple[int, ...] | None = None  # None: make_buckets(max_chunk_tokens, 16)
    batch_buckets: tuple[int, ...] | None = None  # None: make_buckets(max_num_seqs, 1)
    # Attention reads (and the reference backend gathers) only up to the step's context bucket.
    context_buckets: tuple[int, ...] | None = None  # None: make_buckets(max_model_len, 256, 1024)
    mixed_steps: bool = True  # compile chunk x batch executables (needed for inline prefills)
    dtype: str = "float32"
    attention_backend: str = "reference"
    compilation_cache_dir: str | None = "~/.cache/tropical_jax/xla"  # None disables the persistent cache

    def __post_init__(self):
        for name in ("max_model_len", "page_size", "max_num_seqs", "max_chunk_tokens", "max_prefill_seqs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.num_pages is not None and self.num_pages < self.pages_per_seq:
            raise ValueError(f"num_pages={self.num_pages} cannot hold even one sequence of max_model_len="
                             f"{self.max_model_len} ({self.pages_per_seq} pages of {self.page_size})")

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @property
    def total_pages(self) -> int:
        return self.num_pages if self.num_pages is not None else self.pages_per_seq * self.max_num_seqs

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        return tuple(self.chunk_buckets or make_buckets(self.max_chunk_tokens, min(16, self.max_chunk_tokens)))

    @property
    def context_pages(self) -> tuple[int, ...]:
        """Block-table widths (pages) of the context buckets."""
        tokens = self.context_buckets or make_buckets(self.max_model_len, min(256, self.max_model_len), 1024)
        return tuple(sorted({-(-min(t, self.max_model_len) // self.page_size) for t in tokens} | {self.pages_per_seq}))

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(self.batch_buckets or make_buckets(self.max_num_seqs, 1))
