"""Cross-lowering without hardware: every TPU kernel exports for platforms=["tpu"] and every GPU
kernel for ["cuda"] on this CPU machine.

What this proves: Pallas accepts the kernels' block shapes, memory spaces, scalar prefetch, DMA
and Triton gathers, and lowers them to Mosaic / Triton IR inside a StableHLO custom call. What it
does not: Mosaic's layout passes and Triton's PTX compilation run only when XLA compiles on the
device, so VMEM/shared-memory limits and layout support are checked on hardware, not here.
"""
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.decode_attention import paged_decode_gpu, paged_decode_tpu
from pallas_kernels.kv_write import write_kv_tpu
from pallas_kernels.ragged_attention import ragged_paged_attention_gpu, ragged_paged_attention_tpu

TRITON_TARGET = "__gpu$xla.gpu.triton"
PLATFORM = {"tpu": (["tpu"], [], "tpu_custom_call"),
            "gpu": (["cuda"], [jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)],
                    TRITON_TARGET)}


def _export(kind, fn, *args):
    platforms, checks, target = PLATFORM[kind]
    exported = jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=checks)(*args)
    assert f"custom_call @{target}(" in exported.mlir_module()
    return exported


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


# (kv_heads, groups, head_dim, page_size): MHA, GQA 2/4/8, both head dims, all page sizes.
SHAPES = [(1, 8, 128, 32), (2, 4, 64, 8), (8, 1, 128, 16), (4, 2, 64, 16)]


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kvh,groups,head_dim,page_size", SHAPES)
@pytest.mark.parametrize("kind", ["tpu", "gpu"])
def test_attention_kernels_cross_lower(kind, kvh, groups, head_dim, page_size, dtype):
    pool = _sds((256, page_size, kvh, head_dim), dtype)
    i32 = lambda *s: _sds(s, jnp.int32)  # noqa: E731
    decode = paged_decode_tpu if kind == "tpu" else paged_decode_gpu
    ragged = ragged_paged_attention_tpu if kind == "tpu" else ragged_paged_attention_gpu
    _export(kind, decode, _sds((64, kvh * groups, head_dim), dtype), pool, pool, i32(64, 32), i32(64))
    _export(kind, ragged, _sds((200, kvh * groups, head_dim), dtype), pool, pool, i32(9, 32), i32(9),
            i32(10), i32(1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kv_write_kernel_cross_lowers(dtype):
    pool = _sds((64, 16, 2, 128), dtype)
    new = _sds((40, 2, 128), dtype)
    _export("tpu", write_kv_tpu, pool, pool, new, new, _sds((40,), jnp.int32))


@pytest.mark.slow
def test_tpu_batch_split_cross_lowers():
    """Block tables too big for SMEM: the decode wrapper splits the batch into several calls."""
    pool = _sds((4096, 16, 1, 128), jnp.bfloat16)
    exported = _export("tpu", paged_decode_tpu, _sds((256, 8, 128), jnp.bfloat16), pool, pool,
                       _sds((256, 2048), jnp.int32), _sds((256,), jnp.int32))
    assert exported.mlir_module().count("custom_call @tpu_custom_call") == 8
