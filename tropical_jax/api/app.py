"""The Flask app: OpenAI-compatible completions and chat, health, models, metrics, cluster state.

Request threads validate and tokenize, put the request on the engine client's inbox and read its
token events; they never touch JAX or engine objects (see engine_client.py).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid

from flask import Flask, Response, request, stream_with_context
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from . import responses
from .engine_client import QueueFull
from .protocol import RETRY_AFTER, APIError, parse


def _json(body, status=200, headers=None) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json", headers=headers)


def create_app(server) -> Flask:
    """`server` (serve.Server) holds: client (EngineClient; None while warming up), warmup (progress
    text), tokenizer, limits (protocol.Limits), api_key, metrics (ServerMetrics), max_body_bytes,
    started (unix time)."""
    app = Flask("tropical_jax")
    app.config["MAX_CONTENT_LENGTH"] = server.max_body_bytes

    @app.errorhandler(APIError)
    def _api_error(e):
        return _json(e.body(), e.status, e.headers())

    @app.errorhandler(HTTPException)
    def _http_error(e):
        messages = {404: f"no route {request.path} (see /v1/models, /v1/completions, /v1/chat/completions, "
                         f"/health, /metrics, /v1/cluster)",
                    405: f"method {request.method} not allowed on {request.path}",
                    413: f"request body larger than {server.max_body_bytes} bytes"}
        return _api_error(APIError(e.code, messages.get(e.code, e.description)))

    @app.errorhandler(Exception)
    def _unexpected(e):
        app.logger.exception("request failed")
        return _api_error(APIError(500, f"internal error: {type(e).__name__}"))

    @app.before_request
    def _auth():
        # /health and /metrics stay open for load balancers and scrapers; the API needs the key.
        if server.api_key and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            token = header[7:] if header.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), server.api_key.encode()):
                raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               code="invalid_api_key")

    @app.get("/health")
    def health():
        c = server.client
        retry = {"Retry-After": str(RETRY_AFTER[503])}
        if c is None:
            return _json({"status": "warming_up", "warmup": server.warmup}, 503, retry)
        if c.broken:
            return _json({"status": "error", "error": c.broken}, 503, retry)
        if c.draining:
            return _json({"status": "draining", "in_flight": len(c.handles)}, 503, retry)
        return _json({"status": "ok"})

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.limits.model_name, "object": "model",
                                            "owned_by": "tropical_jax", "created": server.started,
                                            "max_model_len": server.limits.max_model_len}]}

    @app.get("/metrics")
    def metrics():
        return Response(server.metrics.render(), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/cluster")
    def cluster():
        if server.client is None:
            raise APIError(503, f"the server is warming up ({server.warmup})")
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
            raise APIError(503, f"the server is warming up ({server.warmup}); retry shortly", code="warming_up")
        if client.draining:
            raise APIError(503, "the server is shutting down", code="draining")
        if client.broken:
            raise APIError(503, f"the engine failed and cannot serve: {client.broken}", code="engine_error")
        try:
            body = json.loads(request.get_data())
        except (ValueError, RecursionError):  # RecursionError: hostile nesting
            raise APIError(400, "the request body is not valid JSON") from None
        req = parse(body, chat=chat, tokenizer=server.tokenizer, limits=server.limits)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:  # SLOs the request does not name: the engine's defaults
            handle = client.submit(rid, req.prompt_ids, req.params, req.ttft_slo, req.tpot_slo)
        except QueueFull as e:
            server.metrics.requests.labels("rejected").inc()
            raise APIError(429, str(e), code="queue_full") from None
        meta = dict(id=rid, created=int(time.time()), model=server.limits.model_name)
        # waitress tells whether the peer hung up (needs channel_request_lookahead > 0).
        disconnected = request.environ.get("waitress.client_disconnected", lambda: False)
        first, rest = responses.start(client, handle, disconnected)
        if req.stream:
            body = responses.stream(handle, first, rest, meta, chat, req.include_usage)
            return Response(stream_with_context(body), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return responses.complete(handle, first, rest, meta, chat)

    return app
