"""Random but well-formed kernel inputs, shared by the tests and the benchmarks.

Every pool slot that no live token owns is poisoned with NaN (when `poison`), and block-table
entries past a sequence's pages point at poisoned pages, so a kernel that reads past a length,
or lets a masked value reach a sum, fails loudly instead of by a rounding error.
"""
import numpy as np
import jax.numpy as jnp

# Max abs error a kernel may show against its reference: f32 differs by summation order only; bf16
# kernels feed bf16 probabilities to the PV matmul and round the output (eps 2^-8), while a masking
# or paging bug moves outputs by O(0.1-1).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _pools(rng, num_pages, page_size, kv_heads, head_dim, owned, dtype, poison):
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_normal(shape, dtype=np.float32)
    if poison:
        k[~owned] = np.nan
        v[~owned] = np.nan
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _tables(rng, kv_lens, pages_per_seq, page_size, num_pages):
    """Disjoint random pages for each sequence's live tokens; other entries hit unowned pages."""
    need = [-(-int(n) // page_size) for n in kv_lens]
    perm = rng.permutation(num_pages)
    if sum(need) >= num_pages:
        raise ValueError("pool too small for the case")
    spare = perm[sum(need):]
    tables = rng.choice(spare, size=(len(kv_lens), pages_per_seq))
    owned = np.zeros((num_pages, page_size), bool)
    at = 0
    for i, n in enumerate(kv_lens):
        pages = perm[at:at + need[i]]
        at += need[i]
        tables[i, :need[i]] = pages
        for pos in range(int(n)):
            owned[pages[pos // page_size], pos % page_size] = True
    return tables.astype(np.int32), owned


def decode_case(lengths, *, kv_heads, groups, head_dim, page_size, pages_per_seq, dtype=jnp.float32,
                seed=0, poison=True, num_pages=None):
    """-> (q, k_pool, v_pool, block_tables, lengths) for paged decode attention."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    num_pages = num_pages or sum(-(-int(n) // page_size) for n in lengths) + 4
    tables, owned = _tables(rng, lengths, pages_per_seq, page_size, num_pages)
    k, v = _pools(rng, num_pages, page_size, kv_heads, head_dim, owned, dtype, poison)
    q = jnp.asarray(rng.standard_normal((len(lengths), kv_heads * groups, head_dim), np.float32), dtype)
    return q, k, v, jnp.asarray(tables), jnp.asarray(lengths)


def ragged_case(seqs, *, num_tokens, max_seqs, kv_heads, groups, head_dim, page_size, pages_per_seq,
                dtype=jnp.float32, seed=0, poison=True):
    """seqs: list of (q_len, kv_len) for the live sequences, in token order; the rest of the
    max_seqs slots are padding (kv_len 7, as garbage) and tokens past the live ones are padding.
    -> (q, k_pool, v_pool, block_tables, kv_lens, cu_q_lens, num_seqs)."""
    rng = np.random.default_rng(seed)
    q_lens = [a for a, _ in seqs]
    kv_lens = np.array([b for _, b in seqs] + [7] * (max_seqs - len(seqs)), np.int32)
    if sum(q_lens) > num_tokens or len(seqs) > max_seqs:
        raise ValueError("case does not fit")
    num_pages = sum(-(-int(n) // page_size) for n in kv_lens[:len(seqs)]) + 4
    tables, owned = _tables(rng, kv_lens[:len(seqs)], pages_per_seq, page_size, num_pages)
    tables = np.concatenate([tables, rng.integers(0, num_pages, (max_seqs - len(seqs), pages_per_seq),
                                                  dtype=np.int32)])
    k, v = _pools(rng, num_pages, page_size, kv_heads, head_dim, owned, dtype, poison)
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1:len(seqs) + 1] = np.cumsum(q_lens)
    cu[len(seqs) + 1:] = num_tokens + 5  # garbage in padding slots
    q = rng.standard_normal((num_tokens, kv_heads * groups, head_dim), np.float32)
    return (jnp.asarray(q, dtype), k, v, jnp.asarray(tables), jnp.asarray(kv_lens),
            jnp.asarray(cu), jnp.asarray([len(seqs)], np.int32))
