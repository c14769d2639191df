"""What a run reports while it goes: its phase and metrics, and this attempt's record.

The recipe, the safe-point callback and the committer tell the observer what happened; it
alone sets the phase gauge and writes the attempt record, and calls nothing back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from service.attempts import AttemptLog
from service.checkpoint.store import Committed
from service.metrics.registry import JobMetrics, Phase

if TYPE_CHECKING:
    from service.checkpoint.safepoint import Stop

log = structlog.get_logger(__name__)


class RunObserver:
    def __init__(self, metrics: JobMetrics, attempt: AttemptLog, *, is_main: bool) -> None:
        self.metrics = metrics
        self.attempt = attempt
        self.is_main = is_main  # rank 0 keeps the attempt record
        self._stopping = False

    def start(self, port: int | None, local_rank: int, **info: str) -> None:
        """Serve /metrics (local rank k on port + k: each GPU's throughput is its own) and
        describe the job. Metrics are on the side: never a reason not to train."""
        if port is not None:
            try:
                self.metrics.serve(port + local_rank if port else port)
            except OSError as err:
                log.warning("metrics_server_unavailable", port=port, error=str(err))
        self.metrics.set_info(**info)

    # -- phases ------------------------------------------------------------------

    def phase(self, phase: Phase) -> None:
        self.metrics.set_phase(phase)

    def finished(self, outcome: Phase | None) -> None:
        """DONE, PREEMPTED or FAILED pushed; None (superseded) pushes nothing."""
        self.metrics.finish(outcome)
        self.metrics.close()

    # -- the safe-point callback (checkpoint.safepoint.SafePointListener) -----------

    def checkpoint_started(self) -> None:
        self.phase(Phase.CHECKPOINTING)

    def checkpoint_saved(self, step: int, blocking_seconds: float) -> None:
        self.metrics.checkpoint_saved(step, blocking_seconds)
        if not self._stopping:
            self.phase(Phase.TRAINING)

    def step_ended(self, step: int) -> None:
        if self.is_main:
            self.attempt.step(step)

    # -- the committer -------------------------------------------------------------

    def committed(self, committed: Committed, upload_seconds: float, upload_bytes: int) -> None:
        self.attempt.committed(committed.step)
        self.metrics.checkpoint_committed(committed.step, upload_seconds, upload_bytes)

    def commit_failed(self, step: int, error: str) -> None:
        self.attempt.event("checkpoint_failed", step=step, error=error)
        self.metrics.checkpoint_failed(step, error)

    # -- the run's story -------------------------------------------------------------

    def resumed(self, step: int) -> None:
        self.attempt.attempt.start_step = step
        self.attempt.event("resumed", step=step)
        self.metrics.resumed(step)

    def stopping(self) -> None:
        """A stop was requested and the loop has ended: what is saved now is the last."""
        self._stopping = True
        self.phase(Phase.CHECKPOINTING)

    def stopped(self, stop: Stop) -> None:
        log.warning("preempted", **vars(stop))
        self.attempt.event(
            "preempted", step=stop.step, reason=stop.reason, lost_seconds=stop.lost_seconds
        )
        self.attempt_ended(
            "preempted", stop.step, reason=stop.reason, lost_seconds=stop.lost_seconds
        )

    def promotion(self, promoted: bool, reason: str) -> None:
        self.attempt.event("promotion", promoted=promoted, reason=reason)

    def attempt_ended(self, outcome: str, step: int, **fields: Any) -> None:
        """Once per attempt, on rank 0, and only for an attempt that claimed the run."""
        if self.is_main and self.attempt.started and self.attempt.attempt.ended_unix is None:
            self.attempt.finish(outcome, last_step=step, **fields)
