"""OpenAI request parsing and validation; every refusal is an APIError with an OpenAI-style body.

Everything is checked here, on the HTTP thread, so that a request reaching the engine is valid.
Unknown fields are ignored (clients send many); known fields we do not implement are refused with
a clear 400 when they ask for something other than the default, never silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import context_room
from ..sampling_params import SamplingParams

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          431: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
# Seconds a client should wait before retrying, by status (429: the queue moves within a second or
# so; 503: warming up, draining or broken, a matter of seconds at least).
RETRY_AFTER = {429: 1, 503: 5}
STOP_STRINGS, STOP_STRING_CHARS = 16, 256


class APIError(Exception):
    """An OpenAI-style error. `retry=False` adds `x-should-retry: false`: the official clients then
    do not retry it on their own (they retry 408, 409, 429 and 5xx otherwise)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry: bool = True):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry = status, message, param, code, retry
        self.type = _TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        headers = {"Retry-After": str(RETRY_AFTER[self.status])} if self.status in RETRY_AFTER else {}
        if not self.retry:
            headers["x-should-retry"] = "false"
        return headers


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    ttft_slo: float | None  # seconds; None: the server default
    tpot_slo: float | None


@dataclass
class Limits:
    model_name: str
    max_model_len: int
    vocab_size: int
    # Prompt text longer than this cannot fit the context, whatever the tokenizer makes of it: it is
    # refused before tokenizing (see prompt_char_limit).
    max_prompt_chars: int | None = None


def prompt_char_limit(tokenizer, max_model_len: int) -> int | None:
    """max_model_len x the longest token's text: no text longer than that fits in max_model_len tokens.
    Token strings are counted as stored (byte-level or '▁' forms), which are never shorter than the
    text they stand for. (A normalizer that deletes characters, which byte-level BPE and Llama-style
    tokenizers do not have, could make it refuse a text that would fit.)"""
    if tokenizer is None:
        return None
    return max_model_len * max(map(len, tokenizer.get_vocab()), default=1)


# Known OpenAI fields we do not implement, and the values that mean "off" (accepted).
_UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
}


def _get(body, name, types, default=None, check=None, what=None):
    value = body.get(name)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise APIError(400, f"'{name}' must be {what}, got {type(value).__name__} {value!r}"[:300], name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be {what}, got {value!r}", name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' must be {what}, got {value!r}"[:300], name)
    return value


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """tokenizer.encode(text), through the Rust tokenizer's batch call without offsets where there is
    one: about twice as fast as transformers' encode on a long prompt, and free of the GIL while it
    runs (the Rust tokenizer's plain encode holds it throughout), so the engine thread keeps stepping
    while an HTTP thread tokenizes."""
    fast = getattr(getattr(tokenizer, "backend_tokenizer", None), "encode_batch_fast", None)
    if fast is None:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    return fast([text], add_special_tokens=add_special_tokens)[0].ids


def _check_text(text: str, field: str, limits: Limits) -> str:
    """Text the tokenizer can take: encodable as UTF-8 (JSON may carry lone surrogates such as
    "\\ud800") and not longer than any prompt that fits the context."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"'{field}' is not valid Unicode text: a lone surrogate "
                                f"{text[e.start]!r} at character {e.start}", field) from None
    if limits.max_prompt_chars is not None and len(text) > limits.max_prompt_chars:
        raise APIError(400, f"'{field}' has {len(text)} characters, more than fit this model's context of "
                            f"{limits.max_model_len} tokens (at most {limits.max_prompt_chars} characters)",
                       field, "context_length_exceeded")
    return text


def _message_text(m) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, "each message's 'content' must be a string or a list of text parts "
                        "(this model reads text only)", "messages")


def _chat_prompt(body, tokenizer, limits: Limits) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message must be an object with a string 'role' and a 'content'", "messages")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"unknown message role {m['role']!r}"[:200], "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _message_text(m)})
    _check_text("".join(m["content"] for m in clean), "messages", limits)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    # The template's own special tokens are in its text; the tokenizer adds none (as transformers does).
    text = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
    return encode(tokenizer, text, add_special_tokens=False)


def _completion_prompt(body, tokenizer, limits: Limits) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, "one prompt per request: send a batch as separate requests", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' must not be empty", "prompt")
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send 'prompt' as a list of token ids", "prompt")
        return encode(tokenizer, _check_text(prompt, "prompt", limits))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})", "prompt")
        return prompt
    raise APIError(400, "'prompt' must be a non-empty string or a list of token ids", "prompt")


def _stop_strings(body, limits: Limits) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= STOP_STRINGS
            and all(isinstance(s, str) and len(s) <= STOP_STRING_CHARS for s in stops)):
        raise APIError(400, f"'stop' must be a string or a list of at most {STOP_STRINGS} strings of at most "
                            f"{STOP_STRING_CHARS} characters", "stop")
    for s in stops:
        _check_text(s, "stop", limits)
    return stops


def _max_tokens(body, prompt_len: int, chat: bool, limits: Limits) -> int:
    """The request's output limit. OpenAI defaults: 16 tokens for completions, the rest of the context
    for chat. An explicit limit that does not fit beside the prompt is refused (as OpenAI and vLLM do),
    never silently cut."""
    field = "messages" if chat else "prompt"
    try:
        room = context_room(prompt_len, limits.max_model_len)
    except ValueError as e:
        raise APIError(400, f"'{field}': {e}", field, "context_length_exceeded") from None
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, int, None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        return room if chat else min(16, room)
    if max_tokens > room:
        raise APIError(400, f"this model's context is {limits.max_model_len} tokens, but {prompt_len + max_tokens} "
                            f"were requested ({prompt_len} in the {field}, {max_tokens} in '{name}'); "
                            f"'{name}' may be at most {room} for this {field}", name, "context_length_exceeded")
    return max_tokens


def parse(body, *, chat: bool, tokenizer, limits: Limits) -> ParsedRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != limits.model_name:
        if not isinstance(model, str):
            raise APIError(400, "'model' must be a string", "model")
        raise APIError(404, f"model {model[:100]!r} does not exist; this server serves {limits.model_name!r}",
                       "model", "model_not_found")
    _get(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request is supported)")
    for name, off in _UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format",
                       "unsupported_parameter")

    stop = _stop_strings(body, limits)
    stop_token_ids = _get(body, "stop_token_ids", list, None, lambda v: len(v) <= limits.vocab_size,
                          f"a list of at most {limits.vocab_size} token ids (the vocabulary size)")
    prompt_ids = _chat_prompt(body, tokenizer, limits) if chat else _completion_prompt(body, tokenizer, limits)
    max_tokens = _max_tokens(body, len(prompt_ids), chat, limits)
    stream = _get(body, "stream", bool, False, None, "a boolean")
    options = _get(body, "stream_options", dict, None, None, "an object")
    if options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = _get(options or {}, "include_usage", bool, False, None, "a boolean")
    slo = {}
    for key in ("ttft_slo_ms", "tpot_slo_ms"):
        v = _get(body, key, (int, float), None, lambda v: 0 < v <= 1e7, "a positive number of milliseconds")
        slo[key] = None if v is None else v / 1000.0
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_get(body, "temperature", (int, float), 1.0, None, "a number >= 0"),
            top_p=_get(body, "top_p", (int, float), 1.0, None, "a number in (0, 1]"),
            top_k=_get(body, "top_k", int, -1, None, "an integer (-1: off)"),
            seed=_get(body, "seed", int, None, None, "an integer"),
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=_get(body, "ignore_eos", bool, False, None, "a boolean"),
        )
    except ValueError as e:
        raise APIError(400, str(e)[:300], str(e).split(" ", 1)[0]) from None
    return ParsedRequest(prompt_ids, params, stream, include_usage, slo["ttft_slo_ms"], slo["tpot_slo_ms"])
