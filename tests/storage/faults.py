"""Fault injection for the tests: an S3 endpoint that can go down and come back, and one that
throttles.

- `RestartableS3`: moto's ThreadedMotoServer on a fixed port that can be stopped and started
  again. moto keeps its buckets in module-level backends, so a server restarted in the same
  process serves what it held before (tests/test_faults.py checks this).
- `ThrottlingProxy`: an HTTP proxy in front of an S3 endpoint that answers the next `n`
  requests with AWS's own 503 SlowDown, then forwards again: real throttling responses for
  botocore, s3fs and quantlab's retries to handle.
"""

from __future__ import annotations

import http.client
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from moto.server import ThreadedMotoServer

from tests.support import free_port

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message><RequestId>quantlab-test</RequestId>'
            b'</Error>')


class RestartableS3:
    """A moto S3 server on a port of its own that tests can take down and bring back."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        assert self._server is None
        deadline = time.monotonic() + 30
        while True:  # the port may linger for a moment after a stop
            try:
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                server.start()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def up(self) -> bool:
        return self._server is not None

    @contextmanager
    def outage(self) -> None:
        """Down inside the block, up again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()


class ThrottlingProxy:
    """Forwards HTTP to `upstream`, except that it answers 503 SlowDown while `throttle` > 0."""

    def __init__(self, upstream: str):
        target = urlparse(upstream)
        proxy = self
        self.throttle = 0          # requests still to refuse (-1: all of them)
        self.num_throttled = 0
        self.num_forwarded = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._refuse():
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("expect", "connection", "content-length")}
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _refuse(self) -> bool:
        with self._lock:
            if self.throttle == 0:
                self.num_forwarded += 1
                return False
            self.throttle -= self.throttle > 0
            self.num_throttled += 1
            return True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
