"""The offline engine end to end: parity with transformers generate, no recompiles, pages, sampling."""

import subprocess
import sys

import numpy as np
import pytest

from model_helpers import save_tiny_hf
from test_sched_decisions import PROFILE  # round numbers (ms) for tests that plan by hand: no profiling at startup
from tropical_jax import LLM, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)
ENGINE = dict(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, context_buckets=[24],
              compilation_cache_dir=None,
              progress=False)


def hf_greedy(hf, prompt, n):
    import torch

    ids = torch.tensor([prompt])
    # An explicit mask: without it generate treats prompt tokens equal to pad_token_id as padding.
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 128, n))) for n in lengths]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = save_tiny_hf(path, "llama", max_position_embeddings=128)
    return hf, LLM(str(path), **ENGINE)


@pytest.mark.parametrize("arch", ["mistral", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_greedy_matches_transformers_other_architectures(tmp_path, arch):
    hf = save_tiny_hf(tmp_path, arch, max_position_embeddings=128)
    llm = LLM(str(tmp_path), max_model_len=48, page_size=8, max_num_seqs=2, max_chunk_tokens=16,
              batch_buckets=[2], compilation_cache_dir=None, progress=False)
    prompts = prompts_of([7, 13], seed=1)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=32, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 32)


def test_greedy_batch_matches_transformers_and_frees_pages(llama):
    hf, llm = llama
    prompts = prompts_of([5, 11, 17, 3, 20])  # 5 prompts > 4 decode slots: some wait
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=32, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 32)
        assert o.finish_reason == "length" and o.prompt_token_ids == p
    assert llm.engine.pages_used() == 0


def test_request_in_a_batch_equals_alone(llama):
    _, llm = llama
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    alone = llm.generate(prompt_token_ids=prompts_of([9]), sampling_params=sp)[0].token_ids
    batch = llm.generate(prompt_token_ids=prompts_of([9]) + prompts_of([4, 15], seed=3), sampling_params=sp)
    assert batch[0].token_ids == alone


NO_COMPILE_SCRIPT = """
import sys
import numpy as np
from tropical_jax import LLM, SamplingParams
from tropical_jax.runtime.executor import compile_count
llm = LLM(None, max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, context_buckets=[24],
          compilation_cache_dir=None, progress=False)
before = compile_count()
rng = np.random.default_rng(5)
lengths = rng.integers(1, 40, 50)
params = [SamplingParams(max_tokens=int(rng.integers(1, 12)), temperature=float(rng.choice([0, 0.7, 1.3])),
                         top_k=int(rng.choice([-1, 5])), top_p=float(rng.choice([1.0, 0.8])), seed=i, ignore_eos=True)
          for i in range(50)]
prompts = [list(map(int, rng.integers(0, 4096, n))) for n in lengths]
outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
assert [len(o.token_ids) for o in outs] == [min(p.max_tokens, 64 - n) for p, n in zip(params, lengths)]
print("compiles_after_warmup", compile_count() - before, "pages_used", llm.engine.pages_used())
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_no_compilation_after_warmup():
    # A fresh process (in-process caches of other engines must not hide a recompile) and the embedded
    # default model, restored from orbax straight onto its device as in serving.
    r = subprocess.run([sys.executable, "-c", NO_COMPILE_SCRIPT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compiles_after_warmup 0 pages_used 0" in r.stdout, r.stdout


def test_seeded_sampling_repeats_and_temperature_zero_is_greedy(llama):
    _, llm = llama
    p = prompts_of([8], seed=9)
    a = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=16, seed=3, ignore_eos=True))
    b = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=16, seed=3, ignore_eos=True))
    c = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=16, seed=4, ignore_eos=True))
    assert a[0].token_ids == b[0].token_ids != c[0].token_ids
    g = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=16, temperature=0, seed=1,
                                                                       ignore_eos=True))
    g2 = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=16, temperature=0, seed=2,
                                                                        ignore_eos=True))
    assert g[0].token_ids == g2[0].token_ids


def test_stop_token_ids_end_generation(llama):
    _, llm = llama
    p = prompts_of([6], seed=2)
    free = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=20, **GREEDY))[0].token_ids
    stop_at = free[4]
    out = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=20, stop_token_ids=[stop_at],
                                                                         **GREEDY))[0]
    assert out.token_ids == free[: free.index(stop_at) + 1] and out.finish_reason == "stop"


@pytest.mark.slow
def test_preemption_under_page_pressure_keeps_greedy_tokens(tmp_path):
    hf = save_tiny_hf(tmp_path, "llama", max_position_embeddings=128)
    # 16 pages of 4 tokens: four sequences growing to ~40 tokens cannot all stay resident.
    llm = LLM(str(tmp_path), **{**ENGINE, "num_pages": 16})
    prompts = prompts_of([10, 12, 9, 14], seed=4)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=28, **GREEDY))
    assert llm.engine.scheduler.counters["preemptions"] > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 28)
    assert llm.engine.pages_used() == 0


@pytest.mark.slow
def test_the_single_worker_steps_are_the_schedulers_plans(tmp_path):
    """Hand-computed: the default policy (chunked, shortest prompt first) packs prompts into a
    16-token chunk within 8 context pages (32 tokens of 4) and cuts the last one short."""
    hf = save_tiny_hf(tmp_path, "llama", max_position_embeddings=128)
    llm = LLM(str(tmp_path), max_model_len=32, page_size=4, max_num_seqs=4, max_chunk_tokens=16,
              context_buckets=[16], compilation_cache_dir=None, progress=False, warmup=False, profile=PROFILE)
    eng, plans = llm.engine, []
    assert eng.inline and eng.snapshot()["cluster"] == "1C" and eng.snapshot()["policy"] == "chunked"
    next_step = eng.scheduler.next_step
    eng.scheduler.next_step = lambda *a: plans.append(next_step(*a)) or plans[-1]
    prompts = prompts_of([26, 3, 2, 5], seed=6)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=4, **GREEDY))
    steps = [([(c.request.id, c.start, c.length) for c in p.chunks], [r.id for r in p.decodes]) for p in plans[:3]]
    a, b, c, d = (o.request.id for o in outs)
    assert steps == [([(c, 0, 2), (b, 0, 3), (d, 0, 5), (a, 0, 6)], []),
                     ([(a, 6, 13)], [c, b, d]),  # 16 tokens less the three decodes
                     ([(a, 19, 7)], [c, b, d])]
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 4)
    assert eng.pages_used() == 0


def test_the_default_engine_sheds_a_request_whose_ttft_slo_cannot_be_met(llama):
    """The single worker decides through the shared scheduler: a deadline shorter than the prompt's
    isolated prefill is refused at once ("rejected", with the scheduler's reason), the rest served."""
    hf, llm = llama
    shed_before = llm.engine.scheduler.counters["rejected"]
    prompts = prompts_of([20, 7], seed=8)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=6, **GREEDY),
                        ttft_slo=[1e-6, None])
    assert outs[0].finish_reason == "rejected" and outs[0].token_ids == [] and "shed" in outs[0].reason
    assert outs[0].request.status.value == "rejected"
    assert outs[1].finish_reason == "length" and outs[1].token_ids == hf_greedy(hf, prompts[1], 6)
    assert outs[1].request.ttft_slo == pytest.approx(llm.engine.default_ttft_slo(7))
    assert llm.engine.scheduler.counters["rejected"] == shed_before + 1 and llm.engine.pages_used() == 0


def test_bad_input_is_refused_clearly(llama):
    _, llm = llama
    with pytest.raises(ValueError, match=r"prompt of 70 tokens does not fit the context \(max_model_len=64 "):
        llm.generate(prompt_token_ids=[[1] * 70])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[[1, 500]])
    with pytest.raises(ValueError, match="exactly one of"):
        llm.generate()
    for bad, msg in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                     (dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"), (dict(seed=-3), "seed"),
                     (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**bad)
    assert llm.engine.pages_used() == 0 and llm.engine.scheduler.live == 0
