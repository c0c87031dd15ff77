"""attention_backend="pallas" (kernels interpreted on CPU) gives the reference backend's tokens."""

import numpy as np
import pytest

from model_helpers import save_tiny_hf
from tropical_jax import LLM, SamplingParams

pytestmark = [pytest.mark.slow]  # the kernels' engine adapter is checked fast in test_kernels_engine_adapter.py


def test_pallas_backend_is_token_identical_to_reference(tmp_path):
    save_tiny_hf(tmp_path, "llama", max_position_embeddings=128)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (6, 19)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = {}
    for backend in ("reference", "pallas"):
        llm = LLM(str(tmp_path), max_model_len=48, page_size=8, max_num_seqs=2, max_chunk_tokens=16,
                  batch_buckets=[2], attention_backend=backend, compilation_cache_dir=None, progress=False)
        outs[backend] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    assert outs["pallas"] == outs["reference"]
