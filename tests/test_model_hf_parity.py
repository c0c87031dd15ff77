"""Logits of our paged model against Hugging Face transformers, loading the same files from disk."""

import numpy as np
import pytest

from model_helpers import PagedRunner, hf_logits, save_tiny_hf
from tropical_jax.model.loader import load_model

CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 32}}),
    # A window no shorter than the context behaves as full attention (shorter ones are refused).
    "mistral": ("mistral", {"head_dim": 32, "sliding_window": 64}),
    "qwen2": ("qwen2", {}),
}
FAST_CASES = ("llama", "llama_tied")  # the other architectures and RoPE scalings run in the full suite


@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(CASES)])
def test_prefill_and_decode_logits_match_transformers(tmp_path, case):
    arch, overrides = CASES[case]
    hf = save_tiny_hf(tmp_path, arch, **overrides)
    cfg, graphdef, params, _ = load_model(tmp_path, with_tokenizer=False)
    cfg.check_context(48)
    runner = PagedRunner(cfg, graphdef, params, num_seqs=3, page_size=4, max_len=48)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 128, n)) for n in (11, 5, 16)]
    seqs = [list(p) for p in prompts]
    for s, prompt in enumerate(prompts):
        got = runner.step(chunk=(s, 0, prompt), chunk_bucket=16)[0]
        np.testing.assert_allclose(got, hf_logits(hf, prompt)[-1], atol=1e-4)
    # Decode the sequences together for several steps (greedy tokens from HF's own logits), in a
    # batch bucket with one padding row.
    for _ in range(4):
        want = [hf_logits(hf, seq)[-1] for seq in seqs]
        for seq, w in zip(seqs, want):
            seq.append(int(np.argmax(w)))
        got = runner.step(decodes=[(s, len(seq) - 1, seq[-1]) for s, seq in enumerate(seqs)], batch_bucket=4)
        for s, seq in enumerate(seqs):
            np.testing.assert_allclose(got[s], hf_logits(hf, seq)[-1], atol=1e-4)


def test_qwen2_has_qkv_bias_and_llama3_scaling_is_read(tmp_path):
    save_tiny_hf(tmp_path / "q", "qwen2")
    cfg, _, params, _ = load_model(tmp_path / "q", with_tokenizer=False)
    assert cfg.attention_bias and "bias" in params["layers"][0]["self_attn"]["q_proj"]
    save_tiny_hf(tmp_path / "l", "llama", **CASES["llama3_rope"][1])
    cfg, _, _, _ = load_model(tmp_path / "l", with_tokenizer=False)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
