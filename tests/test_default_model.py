"""The embedded default model has learned language: low held-out loss, real words when greedy."""

import json
import math
import re
from pathlib import Path

import numpy as np
import optax
from flax import nnx

from tropical_jax import LLM, SamplingParams
from tropical_jax.model.dense import dense_logits
from tropical_jax.model.loader import DEFAULT_CHECKPOINT, load_model


def test_heldout_loss_far_below_uniform():
    cfg, graphdef, params, tok = load_model(None)
    model = nnx.merge(graphdef, params)
    ids = np.array(tok.encode((DEFAULT_CHECKPOINT / "heldout.txt").read_text()), np.int32)
    n = 257
    batch = np.stack([ids[i:i + n] for i in range(0, len(ids) - n, n)][:16])
    loss = float(optax.softmax_cross_entropy_with_integer_labels(dense_logits(model, batch[:, :-1]), batch[:, 1:]).mean())
    uniform = math.log(cfg.vocab_size)  # 8.32 nats for 4096 tokens
    assert loss < uniform - 3.0, (loss, uniform)
    recorded = json.loads((DEFAULT_CHECKPOINT / "training.json").read_text())["heldout_loss"]
    assert abs(loss - recorded) < 0.5


def test_greedy_continuation_is_mostly_real_words():
    words = set((DEFAULT_CHECKPOINT / "wordlist.txt").read_text().split())
    llm = LLM(max_model_len=128, max_num_seqs=2, max_chunk_tokens=32, batch_buckets=[2],
              compilation_cache_dir=None, progress=False)
    prompts = ["This program is free software; you can redistribute it", "Return a new list containing"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
    generated = [w.lower() for o in outs for w in re.findall(r"[A-Za-z]{2,}", o.text)]
    assert len(generated) >= 20, [o.text for o in outs]
    known = sum(w in words for w in generated) / len(generated)
    assert known > 0.8, (known, [o.text for o in outs])
    # Chat requests render through the shipped template and end at the template's end token.
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    assert llm.tokenizer.decode(ids).endswith("<|assistant|>")
