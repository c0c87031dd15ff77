"""The Flask app: OpenAI-compatible completions and chat, health, models, metrics, cluster state."""

from __future__ import annotations

import hmac
import json
import time
import uuid

from flask import Flask, Response, request, stream_with_context
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from .engine_client import QueueFull
from .protocol import APIError, parse


def error_response(e: APIError) -> Response:
    return Response(json.dumps(e.body()), status=e.status, mimetype="application/json")


def create_app(server) -> Flask:
    """`server` holds: client (EngineClient or None while warming up), tokenizer, model_name,
    max_model_len, api_key, default SLOs (ttft_slo(prompt_len), tpot_slo), metrics, max_body_bytes."""
    app = Flask("tropical_jax")
    app.config["MAX_CONTENT_LENGTH"] = server.max_body_bytes

    @app.errorhandler(APIError)
    def _api_error(e):
        return error_response(e)

    @app.errorhandler(HTTPException)
    def _http_error(e):
        messages = {404: f"no route {request.path}", 405: f"method {request.method} not allowed on {request.path}",
                    413: f"request body larger than {server.max_body_bytes} bytes"}
        return error_response(APIError(e.code, messages.get(e.code, e.description)))

    @app.errorhandler(Exception)
    def _unexpected(e):
        app.logger.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}"))

    @app.before_request
    def _auth():
        if server.api_key and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            token = header[7:] if header.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), server.api_key.encode()):
                raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    @app.get("/health")
    def health():
        if server.client is None:
            return Response(json.dumps({"status": "warming_up"}), 503, mimetype="application/json")
        status = "draining" if server.client.draining else "ok"
        return Response(json.dumps({"status": status}), 503 if server.client.draining else 200,
                        mimetype="application/json")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "tropical_jax",
                                            "max_model_len": server.max_model_len, "created": server.started}]}

    @app.get("/metrics")
    def metrics():
        state = server.client.state() if server.client else {"workers": []}
        return Response(server.metrics.render(state), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/cluster")
    def cluster():
        if server.client is None:
            raise APIError(503, "the server is warming up")
        return server.client.state()

    @app.post("/v1/completions")
    def completions():
        return _generate(chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return _generate(chat=True)

    def _generate(chat: bool):
        client = server.client
        if client is None:
            raise APIError(503, "the server is warming up; retry shortly")
        if client.draining:
            raise APIError(503, "the server is shutting down")
        body = request.get_json(force=True, silent=True)
        if body is None:
            raise APIError(400, "the request body is not valid JSON")
        req = parse(body, chat=chat, tokenizer=server.tokenizer, model_name=server.model_name,
                    max_model_len=server.max_model_len)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        ttft_slo = req.ttft_slo if req.ttft_slo is not None else server.ttft_slo(len(req.prompt_ids))
        tpot_slo = req.tpot_slo if req.tpot_slo is not None else server.tpot_slo
        try:
            handle = client.submit(rid, req.prompt_ids, req.params, ttft_slo, tpot_slo)
        except QueueFull as e:
            server.metrics.requests.labels("rejected").inc()
            raise APIError(429, str(e), code="queue_full") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        meta = dict(id=rid, created=int(time.time()), model=server.model_name)
        if req.stream:
            disconnected = request.environ.get("waitress.client_disconnected", lambda: False)
            return Response(stream_with_context(_stream(client, handle, meta, chat, req.include_usage, disconnected)),
                            mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
        return _complete(client, handle, meta, chat)

    return app


def _events(client, handle, disconnected=lambda: False):
    """Yield (token_ids, text, finish_reason) until the request finishes; abort if the client left."""
    import queue

    finished = False
    try:
        while not finished:
            try:
                ids, text, reason = handle.events.get(timeout=0.25)
            except queue.Empty:
                if disconnected():
                    return
                continue
            finished = reason is not None
            yield ids, text, reason
    finally:
        if not finished:
            client.abort(handle.request_id)


def _finish_check(reason):
    if reason == "queue_timeout":
        raise APIError(429, "the request waited longer than the server's queue timeout", code="queue_timeout")
    if reason == "error":
        raise APIError(500, "the engine failed while running this request")


def _usage(handle):
    return {"prompt_tokens": handle.prompt_len, "completion_tokens": handle.n_out,
            "total_tokens": handle.prompt_len + handle.n_out}


def _slo(handle):
    return {"ttft_ms": None if handle.ttft is None else round(handle.ttft * 1000, 3),
            "tpot_ms": round(handle.tpot * 1000, 3), "ttft_slo_ms": round(handle.ttft_slo * 1000, 3),
            "tpot_slo_ms": round(handle.tpot_slo * 1000, 3), "slo_met": handle.slo_met}


def _complete(client, handle, meta, chat):
    text, ids, reason = [], [], None
    for tok, delta, reason in _events(client, handle):
        ids += tok
        text.append(delta)
    _finish_check(reason)
    text = "".join(text)
    choice = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": _usage(handle), "slo": _slo(handle), "token_ids": ids}


def _stream(client, handle, meta, chat, include_usage, disconnected):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text, ids, reason, first=False):
        if chat:
            delta = {"role": "assistant", "content": delta_text} if first else {"content": delta_text}
            choice = {"index": 0, "delta": delta if (delta_text or first) else {}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta_text, "finish_reason": reason, "logprobs": None}
        body = {**meta, "object": obj, "choices": [choice], "token_ids": ids}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    first = True
    reason = None
    for ids, text, reason in _events(client, handle, disconnected):
        if reason in ("queue_timeout", "error"):
            err = APIError(429 if reason == "queue_timeout" else 500, f"request ended: {reason}")
            yield f"data: {json.dumps(err.body())}\n\n"
            break
        if ids or text or reason:
            yield chunk(text, ids, reason, first)
            first = False
    if include_usage:
        yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': _usage(handle), 'slo': _slo(handle)})}\n\n"
    yield "data: [DONE]\n\n"
