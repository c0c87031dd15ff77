"""Helpers of the server tests: the server in a subprocess (bench/server_process.py) and raw sockets."""

from __future__ import annotations

import socket

from bench.server_process import ServerProcess  # noqa: F401  (the tests' launcher too)


def raw_post(url: str, body: bytes, path: str = "/v1/completions") -> socket.socket:
    """POST `body` on a bare socket and return it unread: closing it hangs up on the server."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return sock
