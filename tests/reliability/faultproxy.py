"""A small threaded HTTP proxy that injects faults between an S3 client and an S3 server (moto) on loopback.

Per request, `schedule(n, method, path)` picks what happens:
  pass        forward, return the server's answer
  500         answer 500 InternalError without forwarding (S3's "we encountered an internal error")
  503         answer 503 SlowDown without forwarding (S3 throttling)
  drop        close the connection without an answer, request NOT forwarded
  drop_after  forward (the server applies the request!), then close without an answer: the client cannot know
  stall       hold the request for `stall_s` (longer than the client's read timeout), then close
  truncate    forward, then send the headers and only half of the body, then close (GET with a body only;
              anything else passes)
With ``ignore_conditions=True`` every forwarded request loses its If-None-Match / If-Match headers: the server
then behaves like one that ignores conditional writes.
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
       "proxy-authorization", "expect"}
CONDITIONS = {"if-none-match", "if-match"}
FAULTS = ("500", "503", "drop", "drop_after", "stall", "truncate")


def random_schedule(rate: float, seed: int = 0, faults=FAULTS) -> Callable[[int, str, str], str]:
    """A fault on a random `rate` of the requests (seeded); the kinds take turns, so every kind occurs."""
    rng = random.Random(seed)
    lock = threading.Lock()
    turn = [0]

    def pick(_n: int, method: str, _path: str) -> str:
        with lock:
            if rng.random() >= rate:
                return "pass"
            kind = faults[turn[0] % len(faults)]
            if kind == "truncate" and method != "GET":
                return "pass"  # keep the turn for the next GET
            turn[0] += 1
            return kind
    return pick


def with_outages(schedule: Callable[[int, str, str], str], every: int, length: int, first: int,
                 kind: str = "503") -> Callable[[int, str, str], str]:
    """`schedule`, plus an outage: requests first..first+length-1, then every `every` requests, all get `kind`
    (longer than a client's retries, so whatever request hits it fails for good)."""
    def pick(n: int, method: str, path: str) -> str:
        if n >= first and (n - first) % every < length:
            return kind
        return schedule(n, method, path)
    return pick


class FaultProxy:
    def __init__(self, upstream_url: str, schedule: Callable[[int, str, str], str] | None = None,
                 stall_s: float = 3.0, ignore_conditions: bool = False):
        """``ignore_conditions``: drop If-None-Match / If-Match before forwarding, i.e. a server that accepts
        conditional writes and ignores them (older Ceph RGW, several gateways)."""
        u = urlsplit(upstream_url)
        self.ignore_conditions = ignore_conditions
        self.conditions_dropped = 0
        self.upstream = (u.hostname, u.port)
        self.schedule = schedule or (lambda *_: "pass")
        self.stall_s = stall_s
        self.counts: Counter = Counter()
        self.n = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _kill(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _error(self, status: int, code: str) -> None:
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected by FaultProxy</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy.n += 1
                    n = proxy.n
                action = proxy.schedule(n, self.command, self.path)
                if action == "truncate" and self.command != "GET":
                    action = "pass"
                proxy.counts[action] += 1
                proxy.counts["requests"] += 1
                if action == "500":
                    return self._error(500, "InternalError")
                if action == "503":
                    return self._error(503, "SlowDown")
                if action == "drop":
                    return self._kill()
                if action == "stall":
                    time.sleep(proxy.stall_s)
                    return self._kill()
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    if proxy.ignore_conditions:
                        kept = {k: v for k, v in headers.items() if k.lower() not in CONDITIONS}
                        with proxy._lock:
                            proxy.conditions_dropped += len(headers) - len(kept)
                        headers = kept
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    resp_headers = resp.getheaders()
                    status = resp.status
                finally:
                    conn.close()
                if action == "drop_after":
                    return self._kill()
                if action == "truncate" and len(data) < 2:
                    action = "pass"
                    proxy.counts["truncate"] -= 1
                    proxy.counts["pass"] += 1
                self.send_response(status)
                for k, v in resp_headers:
                    if k.lower() in HOP or (k.lower() == "content-length" and self.command != "HEAD"):
                        continue
                    self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if action == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    return self._kill()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
