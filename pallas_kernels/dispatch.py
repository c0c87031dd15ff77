"""Pick a kernel variant: explicitly (`impl=`) or by platform (`impl="auto"`).

    impl        "auto" | "tpu" | "gpu" | "reference"
    interpret   None = interpret exactly when the variant's hardware is not the default backend.

On CPU "auto" runs the GPU (Triton-style) kernels interpreted: they interpret as fast as the TPU
ones (one gather per page block instead of emulated DMAs and semaphores) and compile an order of
magnitude faster (~0.5 s vs ~8 s for a decode kernel with 32-page blocks), which is what dominates
interpreted runs. The TPU variants are still proven on CPU by the tests (interpret=True).
KV writes default to the fused jnp scatter on every platform (see kv_write.py for why).
"""
import jax

from .decode_attention import paged_decode_gpu, paged_decode_reference, paged_decode_tpu
from .kv_write import write_kv_reference, write_kv_tpu
from .ragged_attention import (ragged_paged_attention_gpu, ragged_paged_attention_reference,
                               ragged_paged_attention_tpu)

IMPLS = ("auto", "tpu", "gpu", "reference")
_CPU_DEFAULT = "gpu"


def resolve(impl: str = "auto", interpret: bool | None = None, platform: str | None = None):
    """-> (variant, interpret) for this process's default backend (or `platform`)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    platform = platform or jax.default_backend()
    if impl == "auto":
        impl = platform if platform in ("tpu", "gpu") else _CPU_DEFAULT
    if impl == "reference":
        return impl, False
    if interpret is None:
        interpret = impl != platform
    if not interpret and impl != platform:
        raise ValueError(f"the {impl} kernels cannot run natively on {platform}; pass interpret=True")
    return impl, interpret


def paged_decode_attention(q, k_pool, v_pool, block_tables, lengths, *, impl="auto",
                           interpret=None, **tuning):
    """Decode attention, one token per sequence. See decode_attention.py for the contract;
    `tuning` goes to the chosen kernel (e.g. pages_per_block)."""
    impl, interpret = resolve(impl, interpret)
    if impl == "reference":
        return paged_decode_reference(q, k_pool, v_pool, block_tables, lengths)
    fn = paged_decode_tpu if impl == "tpu" else paged_decode_gpu
    return fn(q, k_pool, v_pool, block_tables, lengths, interpret=interpret, **tuning)


def ragged_paged_attention(q, k_pool, v_pool, block_tables, kv_lens, cu_q_lens, num_seqs, *,
                           impl="auto", interpret=None, **tuning):
    """Mixed prefill-chunk + decode attention. See ragged_attention.py for the contract."""
    impl, interpret = resolve(impl, interpret)
    if impl == "reference":
        return ragged_paged_attention_reference(q, k_pool, v_pool, block_tables, kv_lens,
                                                cu_q_lens, num_seqs)
    fn = ragged_paged_attention_tpu if impl == "tpu" else ragged_paged_attention_gpu
    return fn(q, k_pool, v_pool, block_tables, kv_lens, cu_q_lens, num_seqs,
              interpret=interpret, **tuning)


def write_kv(k_pool, v_pool, new_k, new_v, slots, *, impl="auto", interpret=None):
    """Scatter new tokens' K/V into their page slots (-1 = drop). "auto" is the fused jnp
    scatter everywhere; "tpu" is the DMA kernel; there is no GPU kernel (XLA's scatter is it)."""
    if impl in ("auto", "reference", "gpu"):
        return write_kv_reference(k_pool, v_pool, new_k, new_v, slots)
    impl, interpret = resolve(impl, interpret)
    return write_kv_tpu(k_pool, v_pool, new_k, new_v, slots, interpret=interpret)
