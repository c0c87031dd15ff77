"""Configuration dataclasses: the model's shape (read from Hugging Face configs), how a worker runs
it (EngineConfig) and which workers run under which scheduling policy (ClusterConfig). Their option
fields are LLM(...)'s keyword arguments and the server's flags (options.py); the server adds its own
(serve/cli.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

from .options import option

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


def context_room(prompt_len: int, max_model_len: int) -> int:
    """Tokens a request may generate beside its prompt: the one rule of what fits a context, applied
    by the engine and by the api (which answers OpenAI's 400). ValueError if the prompt is empty or
    leaves no room for a generated token."""
    if prompt_len < 1:
        raise ValueError("prompt is empty: at least one token is needed")
    if prompt_len >= max_model_len:
        raise ValueError(f"prompt of {prompt_len} tokens does not fit the context (max_model_len={max_model_len} "
                         f"tokens: the prompt plus at least one generated token)")
    return max_model_len - prompt_len


BUCKET_SETS = ("auto", "fine", "coarse")
# The coarse set's sizes besides the largest (bench/results/bucket_price.md measures what they cost).
COARSE_SMALL_CHUNK = 64
COARSE_MIDDLE_BATCH = 8


@dataclass(frozen=True)
class EngineConfig:
    """How one worker runs the model: cache geometry, the closed set of step shapes, numerics."""

    max_model_len: int = option(1024, "context length, prompt plus output", positive=True)
    page_size: int = option(16, "tokens per KV page", positive=True)
    num_pages: int | None = option(None, "KV pages per worker", positive=True,
                                   shown_default="max-num-seqs full contexts")
    max_num_seqs: int = option(32, "largest decode batch per worker", positive=True)
    max_chunk_tokens: int = option(256, "largest prefill chunk", positive=True)
    max_prefill_seqs: int = option(8, "prompts one prefill chunk may pack (each gets a sampled row)", positive=True)
    bucket_set: str = option("auto", "the bucket sizes where --chunk-buckets, --batch-buckets or --context-buckets "
                             "give none. fine: chunks doubling from 16, batches doubling from 1, contexts of 256, "
                             "512, then steps of 1024 (123 step executables at the defaults: tight padding, minutes "
                             "of warmup on a CPU). coarse: chunks of 64 and max-chunk-tokens, batches of 1, 8 and "
                             "max-num-seqs, one context of max-model-len (11 executables: warmup in seconds, steps "
                             "padded further; docs/startup.md has the price). auto: coarse on CPU, fine on GPU and "
                             "TPU, where a compile is a one-off worth paying", choices=BUCKET_SETS)
    chunk_buckets: tuple[int, ...] | None = option(None, "prefill chunk buckets, e.g. 16,64,256",
                                                   shown_default="by --bucket-set")
    batch_buckets: tuple[int, ...] | None = option(None, "decode batch buckets, e.g. 1,8,32 (fewer: faster warmup)",
                                                   shown_default="by --bucket-set")
    # Attention reads (and the reference backend gathers) only up to the step's context bucket.
    context_buckets: tuple[int, ...] | None = option(None, "context buckets in tokens", shown_default="by --bucket-set")
    mixed_steps: bool = True  # compile chunk x batch executables (needed for inline prefills)
    dtype: str = option("float32", "weights and KV cache", choices=("float32", "bfloat16"))
    attention_backend: str = option("reference", "attention implementation", choices=("reference", "pallas"))
    compilation_cache_dir: str | None = option("~/.cache/tropical_jax/xla", "persistent XLA compilation cache "
                                               "('' or None disables)")

    def __post_init__(self):
        for name in ("chunk_buckets", "batch_buckets", "context_buckets"):  # lists welcome, kept as tuples
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.compilation_cache_dir:
            object.__setattr__(self, "compilation_cache_dir", None)
        for name in ("max_model_len", "page_size", "max_num_seqs", "max_chunk_tokens", "max_prefill_seqs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.bucket_set not in BUCKET_SETS:
            raise ValueError(f"bucket_set must be one of {BUCKET_SETS}, got {self.bucket_set!r}")
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

    def for_platform(self, platform: str) -> "EngineConfig":
        """This config with bucket_set "auto" settled for a worker on `platform` (JAX's name: cpu, gpu,
        tpu): coarse on CPU, where each executable takes about a second to compile and warmup would
        dominate startup; fine on accelerators. The engine calls it where it knows its devices."""
        if self.bucket_set != "auto":
            return self
        return replace(self, bucket_set="coarse" if platform == "cpu" else "fine")

    def _default_buckets(self, dimension: str) -> bool:
        """Whether `dimension`'s sizes come from the coarse set (False: the fine one)."""
        if self.bucket_set == "auto":
            raise ValueError(f"bucket_set='auto' has no {dimension} sizes until the engine knows its platform: "
                             f"use for_platform('cpu' | 'gpu' | 'tpu') (the engine does with its devices' platform), "
                             f"or give bucket_set or {dimension}_buckets")
        return self.bucket_set == "coarse"

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        if self.chunk_buckets:
            return self.chunk_buckets
        top = self.max_chunk_tokens
        if self._default_buckets("chunk"):
            return tuple(sorted({min(COARSE_SMALL_CHUNK, top), top}))
        return make_buckets(top, min(16, top))

    @property
    def context_pages(self) -> tuple[int, ...]:
        """Block-table widths (pages) of the context buckets."""
        tokens = self.context_buckets
        if not tokens:
            coarse = self._default_buckets("context")
            tokens = (self.max_model_len,) if coarse else make_buckets(self.max_model_len, min(256, self.max_model_len),
                                                                       1024)
        return tuple(sorted({-(-min(t, self.max_model_len) // self.page_size) for t in tokens} | {self.pages_per_seq}))

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        if self.batch_buckets:
            return self.batch_buckets
        top = self.max_num_seqs
        if self._default_buckets("batch"):
            return tuple(sorted({1, min(COARSE_MIDDLE_BATCH, top), top}))
        return make_buckets(top, 1)


BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class ClusterConfig:
    """Which workers run the engine, under which scheduling policy, with which default SLOs."""

    cluster: str | None = option(None, "worker layout, e.g. 1P1M, 2C, 1P1D, 'P:tp2,M:tp2'",
                                 shown_default="one in-process colocated worker, 1C")
    policy: str | None = option(None, "tropical, planned, colocated, chunked or disaggregated, with knobs after a "
                                "colon ('tropical:prefer=multiplex')", shown_default="chunked with shedding on the "
                                "single worker, else by the cluster's roles: planned for P+M, colocated for C, "
                                "disaggregated for P+D")
    profile: str | None = option(None, "cost-model JSON for the scheduler (python -m tropical_jax.profile)",
                                 shown_default="cached for this model and buckets, else measured at startup")
    backend: str = option("local", "where the workers run: local (this process) or ray (one Ray actor each)",
                          choices=BACKENDS)
    ray_address: str | None = option(None, "Ray cluster to join with backend ray",
                                     shown_default="$RAY_ADDRESS, else start a local Ray")
    tensor_parallel: int = option(1, "devices of the single worker (clusters say it per worker: 'P:tp2,M:tp2')",
                                  positive=True)
    ttft_scale: float = option(5.0, "the default TTFT SLO (requests that name none) is scale x the prompt's isolated "
                               "prefill time, and at least a queueing allowance: scale x the time to prefill a full "
                               "decode batch of prompts (ceil(max-num-seqs / max-prefill-seqs) full chunks of "
                               "max-chunk-tokens), so a burst of short prompts can meet it", positive=True)
    tpot_slo_ms: float = option(100.0, "default TPOT SLO (ms)", positive=True)
    queue_timeout: float | None = option(None, "seconds a request may wait for its prefill before it is refused "
                                         "(HTTP 429)", positive=True, shown_default="no limit")

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "ray" and self.cluster is None:
            raise ValueError("--backend ray (backend='ray') runs a cluster's workers as Ray actors: give --cluster "
                             "(or pass cluster=), e.g. 1P1M; the single worker runs in-process")
        if self.ray_address is not None and self.backend != "ray":
            raise ValueError("--ray-address needs --backend ray (ray_address needs backend='ray')")
        if self.cluster is not None and self.tensor_parallel != 1:
            raise ValueError("--tensor-parallel (tensor_parallel) is for the single worker; give clusters tp per "
                             "worker ('P:tp2,M:tp2')")

    def spec(self):
        """The workers (sched.config.ClusterSpec); the single worker is "1C" (or "C:tpN")."""
        from .sched.config import parse_cluster

        single = "1C" if self.tensor_parallel == 1 else f"C:tp{self.tensor_parallel}"
        return parse_cluster(self.cluster or single)

    def policy_config(self, max_prefill_seqs: int):
        """The policy the scheduler runs, checked against the workers' roles. The single worker's
        default packs up to `max_prefill_seqs` prompts a step, decodes and prefill chunks sharing each
        step as continuous batching does, and sheds a request whose TTFT SLO cannot be met. ttft_scale
        and queue_timeout set those knobs unless the policy string names them."""
        from .sched.config import PolicyConfig, default_policy

        spec = self.spec()
        text = self.policy or (default_policy(spec) if self.cluster else
                               f"chunked:shed=true,max_prefill_seqs={max_prefill_seqs}")
        policy = PolicyConfig.parse(text)
        if "ttft_scale=" not in text:
            policy = replace(policy, ttft_scale=self.ttft_scale)
        if "queue_timeout=" not in text:
            policy = replace(policy, queue_timeout=self.queue_timeout)
        policy.check_cluster(spec)
        return policy

    @property
    def devices_needed(self) -> int:
        """Devices of this process the workers use (Ray actors get their own)."""
        return sum(w.tp for w in self.spec().workers) if self.backend == "local" else 1
