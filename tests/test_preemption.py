"""Every trigger, for real: signals to this process, metadata servers over HTTP, a deadline."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.manifest.spec import PreemptionSpec
from service.preemption import PreemptionWatcher


class Metadata:
    """A loopback stand-in for the AWS IMDSv2 and GCE metadata servers."""

    def __init__(self) -> None:
        self.interrupted = False
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: str = "") -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:
                outer.requests.append(("PUT", self.path, dict(self.headers)))
                if self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self._reply(200, "tok")
                else:
                    self._reply(400)

            def do_GET(self) -> None:
                outer.requests.append(("GET", self.path, dict(self.headers)))
                if self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != "tok":
                        self._reply(401)
                    elif outer.interrupted:
                        self._reply(200, '{"action": "terminate", "time": "2026-11-28T00:00:00Z"}')
                    else:
                        self._reply(404)
                elif self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        self._reply(403)
                    else:
                        self._reply(200, "TRUE" if outer.interrupted else "FALSE")
                else:
                    self._reply(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def metadata() -> Iterator[Metadata]:
    server = Metadata()
    yield server
    server.server.shutdown()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_requests_a_stop_and_starts_the_grace_clock(sig: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    watcher = PreemptionWatcher(PreemptionSpec(), grace_period_seconds=15)
    with watcher:
        # A bound method is a new object at each access: compare with ==, not `is`.
        assert signal.getsignal(sig) == watcher._on_signal
        assert watcher.seconds_left() == float("inf")
        os.kill(os.getpid(), sig)
        assert watcher.requested.wait(2)
        assert watcher.reason == sig.name
        assert 14 < watcher.seconds_left() <= 15
    # The handlers from before are back, exactly.
    assert {s: signal.getsignal(s) for s in before} == before


def test_aws_spot_notice(metadata: Metadata) -> None:
    spec = PreemptionSpec(
        spot_notice="aws", poll_interval_seconds=0.05, aws_metadata_endpoint=metadata.url
    )
    with PreemptionWatcher(spec, 120) as watcher:
        time.sleep(0.3)
        assert not watcher.requested.is_set()
        metadata.interrupted = True
        assert watcher.requested.wait(3)
        assert watcher.reason == "aws_spot_interruption"
    assert ("PUT", "/latest/api/token") in [(m, p) for m, p, _ in metadata.requests]


def test_gce_preempted(metadata: Metadata) -> None:
    spec = PreemptionSpec(
        spot_notice="gce", poll_interval_seconds=0.05, gce_metadata_endpoint=metadata.url
    )
    with PreemptionWatcher(spec, 30) as watcher:
        time.sleep(0.3)
        assert not watcher.requested.is_set()
        metadata.interrupted = True
        assert watcher.requested.wait(3)
        assert watcher.reason == "gce_preempted"


def test_unreachable_metadata_server_does_not_stop_training() -> None:
    spec = PreemptionSpec(
        spot_notice="aws", poll_interval_seconds=0.05, aws_metadata_endpoint="http://127.0.0.1:9"
    )
    with PreemptionWatcher(spec, 30) as watcher:
        time.sleep(0.5)
        assert not watcher.requested.is_set()


def test_max_runtime_deadline() -> None:
    spec = PreemptionSpec(max_runtime_seconds=0.3)
    start = time.monotonic()
    with PreemptionWatcher(spec, 30) as watcher:
        assert watcher.requested.wait(3)
        assert watcher.reason == "max_runtime"
    assert time.monotonic() - start < 2


def test_no_polling_unless_enabled(metadata: Metadata) -> None:
    with PreemptionWatcher(PreemptionSpec(aws_metadata_endpoint=metadata.url), 30):
        time.sleep(0.2)
    assert metadata.requests == []
