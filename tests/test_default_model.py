"""The embedded default model has learned language: low held-out loss, real words when greedy, chat turns end."""

import json
import math
import re

import numpy as np
import optax
import pytest
from flax import nnx

from tropical_jax import LLM, SamplingParams
from tropical_jax.model.dense import dense_logits
from tropical_jax.model.loader import DEFAULT_CHECKPOINT, load_model


def real_word_fraction(texts, words):
    generated = [w.lower() for t in texts for w in re.findall(r"[A-Za-z]{2,}", t)]
    return len(generated), sum(w in words for w in generated) / max(len(generated), 1)


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=128, max_num_seqs=2, max_chunk_tokens=32, batch_buckets=[2],
               compilation_cache_dir=None, progress=False)


@pytest.mark.slow
def test_heldout_loss_far_below_uniform():
    cfg, graphdef, params, tok = load_model(None)
    model = nnx.merge(graphdef, params)
    ids = np.array(tok.encode((DEFAULT_CHECKPOINT / "heldout.txt").read_text()), np.int32)
    n = 513  # the training window: 512 positions of context
    batch = np.stack([ids[i:i + n] for i in range(0, len(ids) - n, n)][:16])
    loss = float(optax.softmax_cross_entropy_with_integer_labels(dense_logits(model, batch[:, :-1]), batch[:, 1:]).mean())
    uniform = math.log(cfg.vocab_size)  # 8.32 nats for 4096 tokens; the trained model is near 4.5
    assert loss < uniform - 3.0, (loss, uniform)
    recorded = json.loads((DEFAULT_CHECKPOINT / "training.json").read_text())["heldout_loss"]
    assert abs(loss - recorded) < 0.2, (loss, recorded)


def test_greedy_continuation_is_mostly_real_words(llm):
    words = set((DEFAULT_CHECKPOINT / "wordlist.txt").read_text().split())
    prompts = ["This program is free software; you can redistribute it", "Return a new list containing"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
    count, known = real_word_fraction([o.text for o in outs], words)
    assert count >= 20, [o.text for o in outs]
    assert known > 0.8, (known, [o.text for o in outs])


def test_chat_reply_is_words_and_ends_its_turn(llm):
    words = set((DEFAULT_CHECKPOINT / "wordlist.txt").read_text().split())
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a fortune."}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
    assert llm.tokenizer.decode(ids) == "<|user|>Tell me a fortune.<|end|><|assistant|>"
    out = llm.generate(prompt_token_ids=[list(ids)], sampling_params=SamplingParams(max_tokens=80, temperature=0))[0]
    # <|end|> closes a turn and is one of the model's EOS ids, so the reply stops by itself.
    assert out.finish_reason == "stop", out
    count, known = real_word_fraction([out.text], words)
    assert count >= 3 and known > 0.8, (known, out.text)
