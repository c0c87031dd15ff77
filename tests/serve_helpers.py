"""Start the real server in a subprocess on a free loopback port and wait until it is ready."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import requests


class ServerProcess:
    def __init__(self, *args, timeout=240, env=None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "tropical_jax.serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        self.url = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
            if "(ready)" in line:
                break
        else:
            raise TimeoutError("server did not become ready:\n" + "".join(self.lines))
        # Keep draining output so the server never blocks on a full pipe.
        import threading

        threading.Thread(target=lambda: [self.lines.append(l) for l in self.proc.stdout], daemon=True).start()

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path, json=None, **kw):
        return requests.post(self.url + path, json=json, timeout=120, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def raw_post(url: str, body: bytes, path: str = "/v1/completions") -> socket.socket:
    """POST `body` on a bare socket and return it unread: closing it hangs up on the server."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return sock
