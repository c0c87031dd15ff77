"""OpenAI response bodies from a request's token events: whole, or as SSE chunks.

Extensions beside the OpenAI fields: `token_ids` (the generated ids) and `slo` (measured TTFT/TPOT,
the SLOs the request was held to, and whether it met them). A streaming response carries `slo` on
its last chunk (the one with finish_reason) and on the usage chunk.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue

from .protocol import APIError

log = logging.getLogger(__name__)

# Finish reasons that are not OpenAI's ("stop"/"length"): how each ends the response.
_FAILURES = {
    "queue_timeout": (429, "the request waited longer than the server's queue timeout", "queue_timeout", True),
    # Not a rate limit: the same request sent again at once meets the same answer, so the official
    # clients are told not to retry it (x-should-retry: false).
    "rejected": (503, "the scheduler refused the request: its TTFT SLO cannot be met at the current load, or no "
                      "worker can hold its prompt; send it later or with a looser ttft_slo_ms", "slo_unattainable",
                 False),
    "shutdown": (503, "the server shut down before the request finished (drain timeout)", "shutdown", True),
    "error": (500, "the engine failed while running this request", "engine_error", True),
    "abort": (500, "the request was aborted", "aborted", True),
}
DISCONNECT_CHECK_S = 0.1  # how often a request checks that its client is still there


def failure(reason, handle) -> APIError | None:
    """The error that ends a request finished for `reason`, or None (it finished normally). A refusal
    ends with the scheduler's own words."""
    if reason not in _FAILURES:
        return None
    status, message, code, retry = _FAILURES[reason]
    why = getattr(handle.request, "status_reason", "") if reason in ("rejected", "queue_timeout") else ""
    return APIError(status, f"{message} (scheduler: {why})" if why else message, code=code, retry=retry)


def events(client, handle, disconnected=lambda: False):
    """Yield (token_ids, text, finish_reason) until the request finishes; abort it if we stop early
    (the client hung up, or the generator was closed). The peer is checked between events and at
    least every DISCONNECT_CHECK_S, so a request whose tokens keep coming is stopped too."""
    finished = False
    try:
        while not finished:
            if disconnected():
                return
            try:
                ids, text, reason = handle.events.get(timeout=DISCONNECT_CHECK_S)
            except queue.Empty:
                continue
            finished = reason is not None
            yield ids, text, reason
    finally:
        if not finished:
            client.abort(handle.request_id)


def start(client, handle, disconnected):
    """The request's events, the first one awaited here, before any byte of the response is sent: a
    request refused before its first token (queue timeout, SLO) gets its own HTTP status, streaming
    or not. Returns (first event, the rest)."""
    rest = events(client, handle, disconnected)
    first = next(rest, None)
    if first is None:  # the client hung up while waiting; nobody reads this answer
        raise APIError(499, "the client closed the connection", code="client_closed")
    err = failure(first[2], handle)
    if err is not None:
        raise err
    return first, rest


def usage(handle) -> dict:
    return {"prompt_tokens": handle.prompt_len, "completion_tokens": handle.n_out,
            "total_tokens": handle.prompt_len + handle.n_out}


def slo(handle) -> dict:
    ms = lambda s: None if s is None else round(s * 1000, 3)  # noqa: E731
    return {"ttft_ms": ms(handle.ttft), "tpot_ms": ms(handle.tpot), "queueing_ms": ms(handle.queueing),
            "ttft_slo_ms": ms(handle.ttft_slo), "tpot_slo_ms": ms(handle.tpot_slo), "slo_met": handle.slo_met,
            "path": handle.path}


def complete(handle, first, rest, meta: dict, chat: bool) -> dict:
    text, ids, reason = [], [], None
    for tok, delta, reason in itertools.chain([first], rest):
        ids += tok
        text.append(delta)
    if reason is None:  # the client hung up
        raise APIError(499, "the client closed the connection", code="client_closed")
    err = failure(reason, handle)
    if err is not None:
        raise err
    choice = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": "".join(text)}
    else:
        choice["text"] = "".join(text)
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage(handle), "slo": slo(handle), "token_ids": ids}


def stream(handle, first, rest, meta: dict, chat: bool, include_usage: bool):
    """SSE: one chunk per token event, then (with include_usage) a usage chunk, then [DONE]. A failure
    after the first token (the status line is sent already) comes in-band, as OpenAI does, and the
    stream still ends cleanly."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def sse(body) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def chunk(text, ids, reason):
        if chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        body = {**meta, "object": obj, "choices": [choice], "token_ids": ids}
        if include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        if reason is not None:
            body["slo"] = slo(handle)
        return sse(body)

    try:
        if chat:  # OpenAI opens a chat stream with the role
            yield sse({**meta, "object": obj, "token_ids": [], **({"usage": None} if include_usage else {}),
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None, "logprobs": None}]})
        for ids, text, reason in itertools.chain([first], rest):
            err = failure(reason, handle)
            if err is not None:
                yield sse(err.body())
                break
            if ids or text or reason:
                yield chunk(text, ids, reason)
    except Exception as e:  # a bug here still ends the stream cleanly
        log.exception("stream of %s failed", handle.request_id)
        yield sse(APIError(500, f"internal error: {type(e).__name__}").body())
    finally:
        rest.close()  # the client hung up (waitress closed us): abort the request now
    if include_usage:
        yield sse({**meta, "object": obj, "choices": [], "usage": usage(handle), "slo": slo(handle)})
    yield "data: [DONE]\n\n"
