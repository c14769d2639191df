"""A fault-injecting HTTP reverse proxy to put in front of an S3-compatible server.

Clients (boto3 in the test process, or a job's child process through AWS_ENDPOINT_URL_S3)
talk to the proxy; the proxy reads each whole request, decides its fate, and either
forwards it byte for byte to the real server (moto) or answers with a fault:

  error500       500 with S3's XML <Error><Code>InternalError</Code>, not forwarded
  slowdown503    503 with <Code>SlowDown</Code>, not forwarded
  reset          the connection is reset (SO_LINGER 0, so the client reads ECONNRESET)
                 before any response, not forwarded
  slow           forwarded; the response waits a random part of ``slow_seconds``
  lost_response  forwarded, so the write happens at the server; then reset instead of
                 answering. A retried conditional write meets its own first attempt (412).

A fault comes from the first targeted Rule that matches the request (deterministic tests),
else with probability ``p`` from a seeded random.Random (chaos runs). Every response says
``Connection: close``: one request per connection, so a reset never hits a reused
connection the client thought healthy, and the proxy needs no keep-alive bookkeeping.
The standard library only, because the point is to sit below botocore's retries and see
exactly what reaches the wire.

    with FaultProxy(moto_url, p=0.2, seed=1) as proxy:
        env = job_env(cache, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        ...
        print(proxy.summary())
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

FAULTS = ("error500", "slowdown503", "reset", "slow", "lost_response")
# Hop-by-hop: about this connection, not the request; never forwarded either way.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect"}
UPSTREAM_TIMEOUT_SECONDS = 60.0

_ERRORS = {
    "error500": (500, "Internal Server Error", "InternalError", "Please try again."),
    "slowdown503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Rule:
    """Give ``fault`` to requests that match; ``times`` None means every match, else the
    first N. ``fault`` None passes matches through untouched (exempt from random faults)."""

    fault: str | None
    method: str | None = None
    path: str | None = None  # a regex searched in the request target (path and query)
    header: str | None = None  # a header the request must carry, e.g. "If-Match"
    times: int | None = None

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {FAULTS}")

    def matches(self, method: str, target: str, headers: Container[str] = ()) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.header is not None and self.header.lower() not in headers:
            return False
        return self.path is None or re.search(self.path, target) is not None


@dataclass(frozen=True)
class Event:
    method: str
    target: str
    fault: str | None
    status: int | None  # the server's answer, when the request was forwarded
    conditional: bool  # carried If-Match / If-None-Match


@dataclass(frozen=True)
class Counts:
    requests: int
    forwarded: int
    faults: dict[str, int]
    statuses: dict[int, int]  # upstream status codes of forwarded requests

    @property
    def faulted(self) -> int:
        return sum(self.faults.values())


@dataclass
class FaultProxy:
    upstream: str
    p: float = 0.2
    seed: int = 0
    kinds: tuple[str, ...] = FAULTS
    slow_seconds: float = 0.5
    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        parsed = urlparse(self.upstream)
        if parsed.scheme != "http" or parsed.hostname is None:
            raise ValueError(f"upstream must be http://host:port, not {self.upstream!r}")
        self._upstream_addr = (parsed.hostname, parsed.port or 80)
        unknown = set(self.kinds) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self.events: list[Event] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # -- control ---------------------------------------------------------------

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        server.request_queue_size = 128  # s3transfer opens many connections at once
        server.daemon_threads = True
        server.server_bind()
        server.server_activate()
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def configure(
        self,
        *,
        p: float | None = None,
        seed: int | None = None,
        kinds: tuple[str, ...] | None = None,
        slow_seconds: float | None = None,
    ) -> None:
        """Change the random faults (and reseed) while running."""
        with self._lock:
            if p is not None:
                self.p = p
            if seed is not None:
                self.seed = seed
                self._rng = random.Random(seed)
            if kinds is not None:
                if set(kinds) - set(FAULTS):
                    raise ValueError(f"unknown faults in {kinds}; known: {FAULTS}")
                self.kinds = kinds
            if slow_seconds is not None:
                self.slow_seconds = slow_seconds

    def add_rule(self, fault: str | None, **match: Any) -> Rule:
        rule = Rule(fault, **match)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Forget the rules and the counts (the random settings stay)."""
        with self._lock:
            self.rules.clear()
            self.events.clear()

    # -- counters --------------------------------------------------------------

    def counts(self) -> Counts:
        with self._lock:
            events = list(self.events)
        return Counts(
            requests=len(events),
            forwarded=sum(e.status is not None for e in events),
            faults=dict(Counter(e.fault for e in events if e.fault is not None)),
            statuses=dict(Counter(e.status for e in events if e.status is not None)),
        )

    def summary(self) -> str:
        c = self.counts()
        kinds = ", ".join(f"{k} {c.faults.get(k, 0)}" for k in FAULTS)
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(c.statuses.items()))
        return (
            f"s3 proxy: {c.requests} requests, {c.faulted} faults ({kinds}); "
            f"{c.forwarded} forwarded (server answered {statuses})"
        )

    # -- the handler's side ----------------------------------------------------

    def _decide(self, method: str, target: str, headers: Container[str] = ()) -> str | None:
        """``headers``: the request's header names, lower case."""
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, target, headers):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule.fault
            if self.p > 0 and self._rng.random() < self.p:
                return self._rng.choice(self.kinds)
            return None

    def _slow_delay_seconds(self) -> float:
        with self._lock:
            return self._rng.uniform(0.5, 1.0) * self.slow_seconds

    def _record(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so that "Expect: 100-continue" (botocore sends it with every file body)
    # gets its "100 Continue" at once instead of after botocore's one-second wait.
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the proxy's events are the log

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        self.close_connection = True
        body = read_body(self.rfile, self.headers)
        method, target = self.command, self.path
        names = {name.lower() for name in self.headers}
        conditional = "if-match" in names or "if-none-match" in names
        fault = proxy._decide(method, target, names)
        if fault in _ERRORS:
            proxy._record(Event(method, target, fault, None, conditional))
            self._answer_error(fault)
            return
        if fault == "reset":
            proxy._record(Event(method, target, fault, None, conditional))
            self._reset()
            return
        status, reason, headers, payload = self._forward(proxy, body)
        proxy._record(Event(method, target, fault, status, conditional))
        if fault == "lost_response":
            self._reset()
            return
        if fault == "slow":
            time.sleep(proxy._slow_delay_seconds())
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _forward(
        self, proxy: FaultProxy, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*proxy._upstream_addr, timeout=UPSTREAM_TIMEOUT_SECONDS)
        try:
            # The low-level calls send the headers and body as received: a chunked or
            # aws-chunked body goes on as the same bytes with the same framing headers.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.putheader("Connection", "close")
            conn.endheaders()
            if body:
                conn.send(body)
            resp = conn.getresponse()
            payload = resp.read()
            headers = []
            for name, value in resp.getheaders():
                lower = name.lower()
                if lower in HOP_BY_HOP or lower == "transfer-encoding":
                    continue
                # HEAD, 204 and 304 keep the server's Content-Length (the object's size);
                # everything else is re-framed to the body we read whole.
                if lower == "content-length" and self._body_allowed(resp.status):
                    continue
                headers.append((name, value))
            if self._body_allowed(resp.status):
                headers.append(("Content-Length", str(len(payload))))
            return resp.status, resp.reason, headers, payload
        finally:
            conn.close()

    def _body_allowed(self, status: int) -> bool:
        return self.command != "HEAD" and status not in (204, 304) and status >= 200

    def _answer_error(self, fault: str) -> None:
        status, reason, code, message = _ERRORS[fault]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{self.path.split('?', 1)[0]}</Resource>"
            f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST, not FIN, and drops anything unsent,
        so the client's read fails with ECONNRESET instead of seeing a clean end."""
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the socket's file holds a reference that would defer the close
        sock.close()


def read_body(rfile: Any, headers: Any) -> bytes:
    """The request body as received on the wire, framing included."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        raw = bytearray()
        while True:
            line = rfile.readline(65537)
            raw += line
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                break
            raw += rfile.read(size + 2)  # the chunk and its CRLF
        while True:  # trailers, then the empty line that ends the message
            line = rfile.readline(65537)
            raw += line
            if line in (b"\r\n", b"\n", b""):
                break
        return bytes(raw)
    length = int(headers.get("Content-Length") or 0)
    return rfile.read(length) if length else b""
