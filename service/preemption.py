"""Everything that can tell a run to stop early, reduced to one event.

Triggers: SIGTERM and SIGINT (the kubelet's and a user's way of asking), a spot
interruption notice from the cloud's metadata server (AWS IMDSv2
``spot/instance-action``, GCE ``instance/preempted``), and a max-runtime deadline.
The training loop polls ``requested`` at every micro-batch and stops at the next
safe point; the grace budget starts when the first trigger fires.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from service.errors import Preempted
from service.signals import take_early_signals

if TYPE_CHECKING:
    from service.manifest.spec import PreemptionSpec

log = structlog.get_logger(__name__)

METADATA_TIMEOUT_SECONDS = 2.0
AWS_TOKEN_TTL_SECONDS = 300


def aws_spot_notice(base_url: str) -> bool:
    """IMDSv2: a token first, then the instance-action document, which exists (200)
    only once the instance is scheduled for interruption."""
    token_req = urllib.request.Request(
        f"{base_url}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_SECONDS)},
    )
    with urllib.request.urlopen(token_req, timeout=METADATA_TIMEOUT_SECONDS) as resp:
        token = resp.read().decode()
    req = urllib.request.Request(
        f"{base_url}/latest/meta-data/spot/instance-action",
        headers={"X-aws-ec2-metadata-token": token},
    )
    try:
        with urllib.request.urlopen(req, timeout=METADATA_TIMEOUT_SECONDS) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise


def gce_preempted(base_url: str) -> bool:
    req = urllib.request.Request(
        f"{base_url}/computeMetadata/v1/instance/preempted",
        headers={"Metadata-Flavor": "Google"},
    )
    with urllib.request.urlopen(req, timeout=METADATA_TIMEOUT_SECONDS) as resp:
        return resp.read().decode().strip().upper() == "TRUE"


class PreemptionWatcher:
    def __init__(self, spec: PreemptionSpec, grace_period_seconds: float) -> None:
        self.spec = spec
        self.grace_period_seconds = grace_period_seconds
        self.requested = threading.Event()
        self.reason: str | None = None
        self.requested_at: float | None = None
        self._started_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: dict[int, object] = {}
        self.listeners: list[Callable[[str], None]] = []

    def request(self, reason: str) -> None:
        if self.requested.is_set():
            log.warning("preemption_already_stopping", reason=reason, first=self.reason)
            return
        self.reason = reason
        self.requested_at = time.monotonic()
        self.requested.set()
        log.warning(
            "preemption_requested", reason=reason, grace_period_seconds=self.grace_period_seconds
        )
        for listener in self.listeners:
            listener(reason)

    def raise_if_requested(self) -> None:
        """Before training starts a stop has nothing to commit: no progress was made."""
        if self.requested.is_set():
            raise Preempted(
                f"preempted ({self.reason}) before training started; no progress was made, "
                "run again to resume",
                progress=False,
            )

    @property
    def requested_unix(self) -> float | None:
        """Wall-clock time of the first trigger."""
        if self.requested_at is None:
            return None
        return time.time() - (time.monotonic() - self.requested_at)

    def seconds_left(self) -> float:
        """Of the grace budget; infinite before any trigger."""
        if self.requested_at is None:
            return float("inf")
        return self.grace_period_seconds - (time.monotonic() - self.requested_at)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A second signal is not a reason to abandon the checkpoint being committed:
        # the commit protocol already makes a SIGKILL at any moment safe.
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        for name in take_early_signals():  # caught before this watcher existed
            self.request(name)
        if self.spec.spot_notice != "none" or self.spec.max_runtime_seconds:
            self._thread = threading.Thread(target=self._poll, name="preemption-poll", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if self._thread is not None:
            self._thread.join(METADATA_TIMEOUT_SECONDS * 3)

    def _poll(self) -> None:
        spec = self.spec
        while not self._stop.is_set() and not self.requested.is_set():
            elapsed = time.monotonic() - self._started_at
            if spec.max_runtime_seconds and elapsed >= spec.max_runtime_seconds:
                self.request("max_runtime")
                return
            try:
                if spec.spot_notice == "aws" and aws_spot_notice(spec.aws_metadata_endpoint):
                    self.request("aws_spot_interruption")
                    return
                if spec.spot_notice == "gce" and gce_preempted(spec.gce_metadata_endpoint):
                    self.request("gce_preempted")
                    return
            except (OSError, urllib.error.URLError) as err:
                log.debug("spot_notice_poll_failed", error=str(err))
            wait = spec.poll_interval_seconds
            if spec.max_runtime_seconds:
                wait = min(wait, max(spec.max_runtime_seconds - elapsed, 0.05))
            self._stop.wait(wait)
