"""Paged model properties: chunking, batching, dtypes, sharding, checkpoints, clear errors."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model_helpers import PagedRunner, save_tiny_hf
from tropical_jax.config import ModelConfig
from tropical_jax.model import attention
from tropical_jax.model.attention import decode_attention
from tropical_jax.model.loader import DEFAULT_CHECKPOINT, load_model
from tropical_jax.model.sharding import make_mesh
from tropical_jax.model.step_batch import StepBatch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_tiny_hf(path, "llama")
    return path, load_model(path, with_tokenizer=False)


PROMPT = list(np.random.default_rng(1).integers(0, 128, 23))


def test_any_chunking_equals_one_shot_prefill(tiny):
    _, (cfg, g, p, _) = tiny
    one = PagedRunner(cfg, g, p, num_seqs=1, page_size=4).step(chunk=(0, 0, PROMPT), chunk_bucket=32)[0]
    runner = PagedRunner(cfg, g, p, num_seqs=1, page_size=4)
    start = 0
    for size in (5, 9, 9):  # uneven, crossing page boundaries, each padded to a bucket of 16
        got = runner.step(chunk=(0, start, PROMPT[start:start + size]), chunk_bucket=16)[0]
        start += size
    np.testing.assert_allclose(got, one, atol=1e-5)


@pytest.mark.slow
def test_decode_in_a_batch_equals_alone_and_mixed_step_matches(tiny):
    _, (cfg, g, p, _) = tiny
    alone = PagedRunner(cfg, g, p, num_seqs=3, page_size=4)
    alone.step(chunk=(0, 0, PROMPT[:10]), chunk_bucket=16)
    ref = alone.step(decodes=[(0, 10, 7)], batch_bucket=1)[0]
    mixed = PagedRunner(cfg, g, p, num_seqs=3, page_size=4)
    mixed.step(chunk=(0, 0, PROMPT[:10]), chunk_bucket=16)
    mixed.step(chunk=(1, 0, PROMPT[3:17]), chunk_bucket=16)
    # A mixed step: a chunk of sequence 2 beside decodes of sequences 0 and 1, in a padded batch of 4.
    out = mixed.step(chunk=(2, 0, PROMPT[:6]), decodes=[(1, 14, 3), (0, 10, 7)], chunk_bucket=8, batch_bucket=4)
    np.testing.assert_allclose(out[2], ref, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("pallas", marks=pytest.mark.slow)])
def test_packed_chunk_equals_each_prompt_alone(tiny, backend):
    """One chunk packing a continued prompt (cached context) and two fresh ones gives each the
    logits it gets alone, and writes each one's K/V to its own pages (the decode after agrees)."""
    _, (cfg, g, p, _) = tiny
    prompts = {0: PROMPT[:12], 1: PROMPT[:5], 2: PROMPT[3:9]}
    alone = PagedRunner(cfg, g, p, num_seqs=3, page_size=4, backend=backend)
    alone.step(chunk=(0, 0, prompts[0][:7]), chunk_bucket=8)
    want = [alone.step(chunk=(0, 7, prompts[0][7:]), chunk_bucket=8)[0]]
    want += [alone.step(chunk=(s, 0, prompts[s]), chunk_bucket=8)[0] for s in (1, 2)]
    want_dec = alone.step(decodes=[(s, len(prompts[s]), 11) for s in range(3)], batch_bucket=4)[:3]
    packed = PagedRunner(cfg, g, p, num_seqs=3, page_size=4, backend=backend)
    packed.step(chunk=(0, 0, prompts[0][:7]), chunk_bucket=8)
    got = packed.step(chunks=[(0, 7, prompts[0][7:]), (1, 0, prompts[1]), (2, 0, prompts[2])] + [(0, 0, [])],
                      chunk_bucket=32)  # a fourth, empty segment slot: padding
    np.testing.assert_allclose(got[:3], np.stack(want), atol=1e-5)
    got_dec = packed.step(decodes=[(s, len(prompts[s]), 11) for s in range(3)], batch_bucket=4)[:3]
    np.testing.assert_allclose(got_dec, want_dec, atol=1e-5)


def dense_attention(q, keys, values, mask):
    """The reference: one softmax over all the keys. q [N, q_len, H, D], keys/values [N, K, kvh, D],
    mask [N, q_len, K] -> [N, q_len, H, D]; rows with no visible key give zeros."""
    n, q_len, heads, dim = q.shape
    kvh = keys.shape[2]
    qg = q.reshape(n, q_len, kvh, heads // kvh, dim)
    scores = jnp.einsum("nqhgd,nkhd->nhgqk", qg, keys) / jnp.sqrt(jnp.float32(dim))
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jnp.where(mask[:, None, None], jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("nhgqk,nkhd->nqhgd", probs, values).reshape(n, q_len, heads, dim)


def test_dense_reference_attention_equals_numpy_softmax():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 6, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, 10, 2, 8)).astype(np.float32)
    v = rng.standard_normal((1, 10, 2, 8)).astype(np.float32)
    pos = np.arange(4, 10)
    mask = np.arange(10)[None, :] <= pos[:, None]
    got = np.asarray(dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask[None])))[0]
    kk, vv = np.repeat(k[0], 2, axis=1), np.repeat(v[0], 2, axis=1)  # GQA: head h uses kv head h // 2
    s = np.einsum("qhd,khd->hqk", q[0], kk) / np.sqrt(8)
    s = np.where(mask[None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("hqk,khd->qhd", w, vv), atol=1e-5)


def test_blocked_decode_attention_equals_one_softmax_over_scattered_pages():
    # Lengths on both sides of the loop's block boundaries, a padding row, pages in random order.
    rng = np.random.default_rng(2)
    page_size, pages_per_row, heads, kvh, dim = 4, 24, 4, 2, 8
    lengths = np.array([1, 31, 32, 33, 70, 96, 0])
    rows = len(lengths)
    k_pool = rng.standard_normal((200, page_size, kvh, dim)).astype(np.float32)
    v_pool = rng.standard_normal((200, page_size, kvh, dim)).astype(np.float32)
    tables = rng.permutation(200)[:rows * pages_per_row].reshape(rows, pages_per_row).astype(np.int32)
    q = rng.standard_normal((rows, heads, dim)).astype(np.float32)
    got = np.asarray(decode_attention(jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.asarray(tables),
                                      jnp.asarray(np.maximum(lengths - 1, 0)), jnp.asarray(lengths > 0)))
    keys = k_pool[tables].reshape(rows, -1, kvh, dim)
    values = v_pool[tables].reshape(rows, -1, kvh, dim)
    mask = np.arange(keys.shape[1])[None, :] < lengths[:, None]
    want = np.asarray(dense_attention(q[:, None], keys, values, mask[:, None]))
    np.testing.assert_allclose(got, want[:, 0], atol=1e-5)
    assert not got[-1].any()  # the padding row attends to nothing


@pytest.mark.parametrize("chunk, segments", [
    (16, [(0, 5)]),  # a short prompt, most rows padding, in a context bucket 20x its pages
    (32, [(7, 9), (0, 0), (0, 13), (30, 1)]),  # packed, an empty slot between, cached context before some
    (100, [(0, 70), (45, 20)]),  # row blocks of 64 that end inside a segment and past the chunk
    (64, [(90, 64)]),  # a long context, near the whole bucket: several blocks of keys
    (16, []),  # no segment at all
])
@pytest.mark.parametrize("blocks", [None, (8, 4)])  # the defaults; (rows, keys) blocks of 8 rows and one page
def test_blocked_chunk_attention_equals_one_softmax_over_each_segments_context(chunk, segments, blocks, monkeypatch):
    """Each chunk row sees its own sequence's tokens up to its position, through that sequence's block
    table, and nothing else: against a dense softmax over the segment's whole table. Pool slots no
    segment wrote hold NaN (stale memory), which must never reach a live row."""
    if blocks:
        monkeypatch.setattr(attention, "CHUNK_ROW_BLOCK", blocks[0])
        monkeypatch.setattr(attention, "CHUNK_KEY_BLOCK_TOKENS", blocks[1])
    rng = np.random.default_rng(3)
    page_size, pages_per_seq, slots, heads, kvh, dim = 4, 40, 4, 4, 2, 8
    k_pool = rng.standard_normal((300, page_size, kvh, dim)).astype(np.float32)
    v_pool = rng.standard_normal((300, page_size, kvh, dim)).astype(np.float32)
    tables = rng.permutation(300)[:slots * pages_per_seq].reshape(slots, pages_per_seq).astype(np.int32)
    starts, lens = np.zeros(slots, np.int32), np.zeros(slots, np.int32)
    starts[:len(segments)], lens[:len(segments)] = np.array(segments, np.int32).reshape(-1, 2).T
    written = np.zeros(k_pool.shape[:2], bool)
    for table, end in zip(tables, starts + lens):
        written.reshape(-1)[(table[:, None] * page_size + np.arange(page_size)).reshape(-1)[:end]] = True
    stale_k, stale_v = (np.where(written[..., None, None], pool, np.nan) for pool in (k_pool, v_pool))
    q = rng.standard_normal((chunk, heads, dim)).astype(np.float32)
    batch = StepBatch(chunk_tokens=np.zeros(chunk, np.int32), chunk_starts=starts, chunk_lens=lens,
                      chunk_block_tables=tables, dec_tokens=np.zeros(1, np.int32), dec_positions=np.zeros(1, np.int32),
                      dec_block_tables=np.zeros((1, pages_per_seq), np.int32), dec_mask=np.zeros(1, bool))
    got = np.asarray(jax.jit(lambda *a: attention.chunk_attention(*a))(  # traced anew: under these blocks
        jnp.asarray(q), jnp.asarray(stale_k), jnp.asarray(stale_v), batch))
    want = np.zeros_like(q)
    row = 0
    for table, start, length in zip(tables, starts, lens):
        keys = k_pool[table].reshape(1, -1, kvh, dim)  # the segment's whole table: 160 keys
        values = v_pool[table].reshape(1, -1, kvh, dim)
        positions = start + np.arange(length)
        mask = np.arange(keys.shape[1])[None, :] <= positions[:, None]
        want[row:row + length] = np.asarray(dense_attention(q[None, row:row + length], keys, values, mask[None]))[0]
        row += length
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not got[row:].any()  # padding rows attend to nothing


@pytest.mark.slow
def test_bf16_stays_close_to_f32(tiny):
    path, (cfg, g, p, _) = tiny
    f32 = PagedRunner(cfg, g, p, num_seqs=1).step(chunk=(0, 0, PROMPT), chunk_bucket=32)[0]
    cfg16, g16, p16, _ = load_model(path, dtype=jnp.bfloat16, with_tokenizer=False)
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
    b16 = PagedRunner(cfg16, g16, p16, num_seqs=1, dtype=jnp.bfloat16).step(chunk=(0, 0, PROMPT), chunk_bucket=32)[0]
    # bf16 has an 8-bit mantissa: logits of O(1) agree to a few 1e-2 and the argmax is kept.
    np.testing.assert_allclose(b16, f32, atol=5e-2)
    assert np.argmax(b16) == np.argmax(f32)


@pytest.mark.parametrize("shape", ["gqa", pytest.param("mqa_odd_vocab", marks=pytest.mark.slow)])
def test_two_device_tensor_parallel_matches_one_device(tiny, tmp_path, shape):
    path, (cfg, g, p, _) = tiny
    if shape == "mqa_odd_vocab":
        # One KV head and a vocabulary 2 does not divide: k/v projections, pools and LM head stay whole.
        path = tmp_path
        save_tiny_hf(path, "llama", num_key_value_heads=1, vocab_size=125)
        cfg, g, p, _ = load_model(path, with_tokenizer=False)
    prompt = [t % cfg.vocab_size for t in PROMPT]
    want = PagedRunner(cfg, g, p, num_seqs=1).step(chunk=(0, 0, prompt), chunk_bucket=32)[0]
    mesh = make_mesh(jax.devices()[:2])
    cfg2, g2, p2, _ = load_model(path, mesh=mesh, with_tokenizer=False)
    attn = p2["layers"][0]["self_attn"]
    assert attn["q_proj"]["kernel"][...].sharding.spec == P(None, "model")
    split_kv = shape == "gqa"
    assert attn["k_proj"]["kernel"][...].sharding.spec == (P(None, "model") if split_kv else P())
    runner = PagedRunner(cfg2, g2, p2, num_seqs=1, mesh=mesh)
    assert runner.kv[0][0].sharding.spec == (P(None, None, "model", None) if split_kv else P())
    got = runner.step(chunk=(0, 0, prompt), chunk_bucket=32)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.subprocess
def test_convert_cli_then_orbax_load_gives_identical_logits(tiny, tmp_path):
    hf, (cfg, g, p, _) = tiny
    path = tmp_path / "hf"
    shutil.copytree(hf, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer will do: it is copied over
        shutil.copy(DEFAULT_CHECKPOINT / name, path / name)
    out = tmp_path / "ours"
    r = subprocess.run([sys.executable, "-m", "tropical_jax.checkpoint", "convert", str(path), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "tropical_config.json").read_text())["num_layers"] == cfg.num_layers
    want = PagedRunner(cfg, g, p, num_seqs=1).step(chunk=(0, 0, PROMPT), chunk_bucket=32)[0]
    cfg2, g2, p2, _ = load_model(out, with_tokenizer=False)
    assert cfg2 == cfg
    got = PagedRunner(cfg2, g2, p2, num_seqs=1).step(chunk=(0, 0, PROMPT), chunk_bucket=32)[0]
    np.testing.assert_array_equal(got, want)
    # Restored straight into a 2-device tensor-parallel sharding, with the tokenizer that came along.
    mesh = make_mesh(jax.devices()[:2])
    cfg3, g3, p3, tok = load_model(out, mesh=mesh)
    assert p3["layers"][1]["mlp"]["down_proj"]["kernel"][...].sharding.spec == P("model", None)
    got = PagedRunner(cfg3, g3, p3, num_seqs=1, mesh=mesh).step(chunk=(0, 0, PROMPT), chunk_bucket=32)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert tok.decode(tok.encode("paged attention")) == "paged attention"
    bad = subprocess.run([sys.executable, "-m", "tropical_jax.checkpoint", "convert", str(tmp_path / "nope"),
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a directory" in bad.stderr


def test_unsupported_configs_fail_clearly():
    hf = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_hf(hf)
    hf["architectures"] = ["MistralForCausalLM"]
    hf["sliding_window"] = 4096
    cfg = ModelConfig.from_hf(hf)
    cfg.check_context(4096)
    with pytest.raises(ValueError, match="sliding window of 4096 tokens, shorter than max_model_len=8192"):
        cfg.check_context(8192)
    llama = dict(hf, architectures=["LlamaForCausalLM"], sliding_window=None)
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        ModelConfig.from_hf(dict(llama, attention_bias=True))
    with pytest.raises(ValueError, match="unsupported rope scaling 'linear'"):
        ModelConfig.from_hf(dict(llama, rope_scaling={"type": "linear", "factor": 2.0}))
