"""The real server in a subprocess on a free loopback port, waited for until it is ready: the one
launcher of the benchmarks that start a server and of the tests (tests/serve_helpers.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import requests


class ServerNotReady(RuntimeError):
    def __init__(self, why: str, lines: list[str], exit_code: int | None):
        super().__init__(f"{why}:\n" + "".join(lines))
        self.lines, self.exit_code = lines, exit_code


class ServerProcess:
    """`python -m tropical_jax.serve --port 0 ARGS`, ready when constructed (ServerNotReady otherwise, the
    process stopped); `lines` is its output so far, `ready_s` the seconds from spawn to its (ready) line."""

    def __init__(self, *args, timeout=240, env=None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "tropical_jax.serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url = None
        while time.monotonic() - start < timeout:
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                raise ServerNotReady("server exited", self.lines, self.proc.returncode)
            self.lines.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
            if "(ready)" in line:
                break
        else:
            self.stop()
            raise ServerNotReady("server did not become ready", self.lines, None)
        self.ready_s = time.monotonic() - start
        # Keep draining output so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [self.lines.append(l) for l in self.proc.stdout], daemon=True).start()

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path, json=None, **kw):
        return requests.post(self.url + path, json=json, timeout=120, **kw)

    def stop(self, graceful: bool = False):
        """Kill it, or with `graceful` let it drain (SIGTERM, then kill after 60 s)."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            self.proc.wait(timeout=60 if graceful else 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
