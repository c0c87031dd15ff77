"""The HTTP server around the Flask app: waitress, with three things it does not do by itself.

- Its own refusals (a body over the limit, malformed HTTP, headers too large) get the OpenAI JSON
  error body instead of text/plain.
- A client that sends its request slowly (headers trickled a byte at a time, a stalled body) is
  cut after `read_timeout` seconds: waitress's own idle timeout restarts at every byte received.
- Responses not yet fully written are counted, so a drain can wait for their last bytes.
"""

from __future__ import annotations

import json
import threading
import time

from waitress import create_server
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask

from .protocol import APIError


class _JSONErrorTask(ErrorTask):
    def execute(self):
        e = self.request.error
        if e.code == 413:
            message = f"request body larger than {self.channel.adj.max_request_body_size} bytes"
        else:
            message = f"{e.reason}: {e.body}"
        error = APIError(e.code, message)
        body = json.dumps(error.body()).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.extend([("Content-Type", "application/json"), *error.headers().items()])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    """Remembers when the request it is reading began, for the read timeout."""

    error_task_class = _JSONErrorTask
    request_started = 0.0

    def received(self, data):
        if self.request is None and data:
            self.request_started = time.time()  # waitress's maintenance clock
        return super().received(data)


def _cut_slow_requests(server, read_timeout: float):
    """waitress's maintenance (idle connections), then: close every connection whose request has
    been arriving for longer than read_timeout."""
    idle_maintenance = server.maintenance

    def maintenance(now):
        idle_maintenance(now)
        for channel in list(server.active_channels.values()):
            if not channel.requests and channel.request is not None and now - channel.request_started > read_timeout:
                channel.will_close = True

    server.maintenance = maintenance


class TrackResponses:
    """WSGI middleware counting responses not yet fully written (waitress closes the body when done),
    so a drain waits for the last bytes of every in-flight response."""

    def __init__(self, app):
        self.app, self.active, self._lock = app, 0, threading.Lock()

    def _done(self):
        with self._lock:
            self.active -= 1

    def __call__(self, environ, start_response):
        with self._lock:
            self.active += 1
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self._done()
            raise
        return _Closing(body, self._done)


class _Closing:
    def __init__(self, body, on_close):
        self.body, self.on_close = body, on_close

    def __iter__(self):
        return iter(self.body)

    def close(self):
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.on_close()


def make_server(app, *, host: str, port: int, threads: int, max_body_bytes: int, read_timeout: float):
    """A waitress server for `app` (not yet running: call .run()). channel_request_lookahead lets a
    request see that its client hung up (environ["waitress.client_disconnected"])."""
    sockets = {}
    http = create_server(app, map=sockets, host=host, port=port, threads=threads, connection_limit=threads + 64,
                         channel_request_lookahead=1, ident="tropical_jax", max_request_body_size=max_body_bytes,
                         cleanup_interval=1)
    for listener in sockets.values():
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = _Channel
            _cut_slow_requests(listener, read_timeout)
    return http
