"""OpenAI request parsing and validation; every refusal is an APIError with an OpenAI-style body."""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling_params import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    ttft_slo: float | None  # seconds; None: the server default
    tpot_slo: float | None


def _get(body, name, types, default=None, check=None, what=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be {what}, got {value!r}", name)
    if not isinstance(value, types):
        raise APIError(400, f"'{name}' must be {what}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' must be {what}, got {value!r}", name)
    return value


def parse(body, *, chat: bool, tokenizer, model_name: str, max_model_len: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(400 if not isinstance(model, str) else 404,
                       f"model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")
    n = _get(body, "n", int, 1, lambda v: v == 1, "1 (only one choice per request is supported)")
    del n
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise APIError(400, "each message must be an object with string 'role' and 'content'", "messages")
            if m["role"] not in ("system", "user", "assistant"):
                raise APIError(400, f"unknown message role {m['role']!r}", "messages")
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "'prompt' must not be empty", "prompt")
            prompt_ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt_ids = prompt
        else:
            raise APIError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                           "prompt")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _get({"max_tokens": max_tokens}, "max_tokens", int, 16, lambda v: v >= 1, "an integer >= 1")
    if len(prompt_ids) + 1 > max_model_len:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {max_model_len} "
                            f"tokens (prompt plus at least one generated token)", "prompt", "context_length_exceeded")
    max_tokens = min(max_tokens, max_model_len - len(prompt_ids))
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    stream = _get(body, "stream", bool, False, None, "a boolean")
    options = _get(body, "stream_options", dict, {}, None, "an object")
    slo = {}
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
        v = _get(body, name, (int, float), None, lambda v: 0 < v < 1e7, "a positive number of milliseconds")
        slo[name] = None if v is None else v / 1000.0
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_get(body, "temperature", (int, float), 1.0, None, "a number"),
            top_p=_get(body, "top_p", (int, float), 1.0, None, "a number"),
            top_k=_get(body, "top_k", int, -1, None, "an integer"),
            seed=_get(body, "seed", int, None, None, "an integer"),
            stop=stop,
            stop_token_ids=_get(body, "stop_token_ids", list, None, None, "a list of token ids"),
            ignore_eos=_get(body, "ignore_eos", bool, False, None, "a boolean"),
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return ParsedRequest(list(prompt_ids), params, stream, bool(options.get("include_usage", False)),
                         slo["ttft_slo_ms"], slo["tpot_slo_ms"])
