"""Streaming text: the incremental detokenizer gives exactly the full decode, and stop strings cut it."""

from tropical_jax.model.loader import DEFAULT_CHECKPOINT, load_tokenizer
from tropical_jax.runtime.sequence import Sequence, append_token
from tropical_jax.sampling_params import SamplingParams

TEXT = "Once upon a time, naïve café owners said «voilà» — 你好, 🙂 twice 🙂🙂 and\nnew lines."


def stream(token_ids, params, tokenizer):
    seq = Sequence([1], params)
    pieces, reason = [], None
    for t in token_ids:
        reason, new = append_token(seq, t, tokenizer, eos_token_ids=(), max_model_len=10_000)
        pieces.append(new)
        if reason is not None:
            break
    return seq, pieces, reason


def test_streamed_pieces_join_to_the_full_decode_and_never_split_a_character():
    tok = load_tokenizer(DEFAULT_CHECKPOINT)
    ids = tok.encode(TEXT)
    seq, pieces, reason = stream(ids, SamplingParams(max_tokens=len(ids)), tok)
    assert reason == "length"
    assert "".join(pieces) == seq.text == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
    # Each token decoded a window of a few tokens, not the whole output.
    assert seq.read_offset - seq.prefix_offset < 8


def test_stop_string_cuts_the_text_even_across_tokens():
    tok = load_tokenizer(DEFAULT_CHECKPOINT)
    ids = tok.encode(TEXT)
    seq, pieces, reason = stream(ids, SamplingParams(max_tokens=len(ids), stop=["owners said"]), tok)
    assert reason == "stop"
    assert seq.text == "Once upon a time, naïve café " == "".join(pieces)
