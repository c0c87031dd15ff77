"""GPU kernels compiled to cubin for sm_90 (H100) and sm_80 (A100) without a GPU, through the
open-source Triton compiler (skipped when the `triton` wheel is absent); their shared memory must
fit the per-block limit of the target."""
import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("triton")

from pallas_kernels.decode_attention import paged_decode_gpu  # noqa: E402
from pallas_kernels.ragged_attention import ragged_paged_attention_gpu  # noqa: E402
from pallas_kernels.triton_check import SHARED_LIMIT, compile_for_cuda  # noqa: E402


def _sds(*shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("capability,dtype,kvh,groups,head_dim,page_size",
                         [pytest.param(90, jnp.bfloat16, 8, 4, 128, 16, marks=pytest.mark.slow),
                          (90, jnp.float32, 1, 8, 128, 32), (90, jnp.bfloat16, 2, 1, 64, 8),
                          pytest.param(80, jnp.float32, 8, 4, 128, 16, marks=pytest.mark.slow)])
def test_gpu_kernels_compile_to_cubin(capability, dtype, kvh, groups, head_dim, page_size):
    pool = _sds(1024, page_size, kvh, head_dim, dtype=dtype)
    decode = compile_for_cuda(paged_decode_gpu, _sds(64, kvh * groups, head_dim, dtype=dtype),
                              pool, pool, _sds(64, 256), _sds(64), capability=capability)
    ragged = compile_for_cuda(ragged_paged_attention_gpu,
                              _sds(512, kvh * groups, head_dim, dtype=dtype), pool, pool,
                              _sds(65, 256), _sds(65), _sds(66), _sds(1), capability=capability)
    kernels = decode + ragged
    assert [k.name for k in kernels] == ["paged_decode_gpu", "ragged_paged_attention_gpu"]
    for k in kernels:
        assert 0 < k.shared_bytes <= SHARED_LIMIT[capability] and k.cubin_bytes > 0


def test_oversized_blocks_are_rejected():
    """f32 decode with 64-token blocks needs ~108 KiB: fine on sm_90, too much on sm_86."""
    pool = _sds(1024, 16, 8, 128, dtype=jnp.float32)
    with pytest.raises(ValueError, match="shared memory"):
        compile_for_cuda(paged_decode_gpu, _sds(8, 32, 128, dtype=jnp.float32), pool, pool,
                         _sds(8, 256), _sds(8), capability=86)
