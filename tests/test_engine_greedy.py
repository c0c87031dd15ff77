"""Greedy tokens of the embedded default model, recorded from the engine before the single worker
became a one-worker cluster under the shared scheduler: the scheduler may reorder and regroup steps,
never change a request's tokens (a batch, a request alone, text prompts, and a KV pool small enough
to force preemption)."""

import numpy as np
import pytest

from tropical_jax import LLM, SamplingParams

ENGINE = dict(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, context_buckets=[24],
              compilation_cache_dir=None, progress=False)
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)

BATCH = [
    [205, 542, 346, 73, 2375, 8, 306, 270, 967, 1945, 276, 294, 270, 967, 796, 292, 316, 265, 568, 2036],
    [20, 205, 205, 363, 592, 993, 292, 316, 265, 476, 485, 531, 730, 265, 731, 796, 292, 316, 205, 266],
    [20, 205, 205, 363, 346, 41, 2375, 8, 1140, 270, 354, 486, 294, 270, 374, 3740, 18, 308, 270, 361],
    [205, 204, 89, 685, 292, 270, 967, 1945, 3907, 20, 205, 205, 363, 592, 482, 294, 270, 967, 613, 292],
    [848, 1, 4, 58, 554, 441, 265, 498, 1847, 20, 6, 5, 363, 825, 306, 270, 825, 18, 475, 270],
    [72, 339, 18, 205, 656, 270, 825, 306, 270, 592, 482, 294, 270, 825, 18, 205, 656, 270, 825, 306],
]
TEXT = [
    ["\n\t(1)\n\t(1)\t=", [205, 204, 14, 23, 15, 205, 204, 14, 23, 15, 204, 35]],
    [" a new\n\tof the world, and the world is", [265, 726, 205, 204, 628, 270, 825, 18, 308, 270, 825, 306]],
]
# 28 tokens each with 16 pages of 4 tokens: four requests cannot all stay resident.
PRESSURE_TAILS = [
    [333, 270, 205, 73, 2375, 568, 20, 227],
    [265, 476, 485, 531, 730, 292, 316, 265],
    [403, 269, 1780, 1795, 737, 18, 205, 381],
    [270, 967, 613, 20, 205, 205, 363, 592],
]


def prompts():
    rng = np.random.default_rng(11)
    return [list(map(int, rng.integers(0, 4096, n))) for n in (5, 23, 9, 31, 2, 14)]


@pytest.mark.slow
def test_default_llm_keeps_its_greedy_tokens():
    llm = LLM(None, **ENGINE)
    outs = llm.generate(prompt_token_ids=prompts(), sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == BATCH
    assert all(o.finish_reason == "length" for o in outs)
    assert llm.generate(prompt_token_ids=prompts()[1:2], sampling_params=GREEDY)[0].token_ids == BATCH[1]
    text = llm.generate(["def fibonacci(n):", "The capital of France is"], SamplingParams(max_tokens=12, temperature=0))
    assert [[o.text, o.token_ids] for o in text] == TEXT


@pytest.mark.slow
def test_greedy_tokens_survive_preemption():
    llm = LLM(None, **{**ENGINE, "num_pages": 16})
    outs = llm.generate(prompt_token_ids=prompts()[:4],
                        sampling_params=SamplingParams(max_tokens=28, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [b + t for b, t in zip(BATCH, PRESSURE_TAILS)]
