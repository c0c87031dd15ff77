"""Write the K/V of new tokens into their pages.

    k/v pool  [num_pages, page_size, kv_heads, head_dim]  (donate them: both variants update in place)
    new_k/v   [T, kv_heads, head_dim]
    slots     int32[T]  page * page_size + offset of each token; -1 drops the token (padding)

Which is better. `write_kv_reference` is one fused XLA scatter per pool: under donation it
updates in place, fuses with the K/V projection that produces the rows, and costs no kernel
boundary; on GPU it is a plain row scatter and there is nothing for a kernel to win. On TPU XLA
scatters have been slow enough that vLLM's TPU backend writes the cache with a DMA kernel, so
`write_kv_tpu` is that: one small DMA per token straight from VMEM into its page slot, the pools
aliased in place. Decode writes B rows of kv_heads*head_dim (a few KiB each), which is noise next
to the attention read of the whole context either way; prefill chunks write C rows once. Our
default is therefore the fused jnp scatter everywhere (`impl="auto"`), with the TPU kernel
selectable and measured by bench/kernels.py on hardware; no hardware run has been made yet.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._common import cdiv, out_struct


def slot_mapping(block_tables, positions, valid, page_size):
    """Slots of tokens at `positions` of sequences with `block_tables` rows ([T, P], [T], [T])."""
    page = jnp.take_along_axis(block_tables, (positions // page_size)[:, None], axis=1,
                               mode="clip")[:, 0]
    return jnp.where(valid, page * page_size + positions % page_size, -1).astype(jnp.int32)


def write_kv_reference(k_pool, v_pool, new_k, new_v, slots):
    num_pages, page_size = k_pool.shape[:2]
    # Dropped tokens get an out-of-range page, which mode="drop" ignores.
    page = jnp.where(slots >= 0, slots // page_size, num_pages)
    off = jnp.where(slots >= 0, slots % page_size, 0)
    k_pool = k_pool.at[page, off].set(new_k.astype(k_pool.dtype), mode="drop")
    v_pool = v_pool.at[page, off].set(new_v.astype(v_pool.dtype), mode="drop")
    return k_pool, v_pool


def _write_kv_tpu_kernel(slots_ref, new_k_ref, new_v_ref, k_in, v_in, k_out, v_out, sems):
    del k_in, v_in  # aliased to k_out / v_out
    tb = new_k_ref.shape[0]
    ps = k_out.shape[1]
    base = pl.program_id(0) * tb

    def each(op):
        for t in range(tb):
            slot = slots_ref[base + t]

            @pl.when(slot >= 0)
            def _():
                page, off = jax.lax.div(slot, ps), jax.lax.rem(slot, ps)
                for src, dst, i in ((new_k_ref, k_out, 0), (new_v_ref, v_out, 1)):
                    getattr(pltpu.make_async_copy(src.at[t], dst.at[page, off], sems.at[i]), op)()

    each("start")  # all of this block's copies in flight at once, then drain
    each("wait")


def write_kv_tpu(k_pool, v_pool, new_k, new_v, slots, *, tokens_per_block=16, interpret=False):
    t = new_k.shape[0]
    tb = min(tokens_per_block, t)
    padded = cdiv(t, tb) * tb
    slots = jnp.pad(slots, (0, padded - t), constant_values=-1)
    pad = ((0, padded - t), (0, 0), (0, 0))
    new_k = jnp.pad(new_k.astype(k_pool.dtype), pad)
    new_v = jnp.pad(new_v.astype(v_pool.dtype), pad)
    kvh, d = k_pool.shape[2:]
    rows = pl.BlockSpec((tb, kvh, d), lambda i, *_: (i, 0, 0))
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        _write_kv_tpu_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(padded // tb,),
            in_specs=[rows, rows, anywhere, anywhere],
            out_specs=[anywhere, anywhere],
            scratch_shapes=[pltpu.SemaphoreType.DMA((2,))]),
        out_shape=[out_struct(k_pool.shape, k_pool.dtype, k_pool, new_k),
                   out_struct(v_pool.shape, v_pool.dtype, v_pool, new_v)],
        # operand indices count the scalar-prefetch operand: slots=0, new_k=1, new_v=2, pools=3,4
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        name="write_kv_tpu",
    )(slots, new_k, new_v, k_pool, v_pool)

