"""What a run reports while it goes: its phase and metrics, and this attempt's record.

The recipe, the safe-point callback and the committer tell the observer what happened; it
alone sets the phase gauge and writes the attempt record, and calls nothing back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from service import ledger, tracking
from service.attempts import AttemptLog
from service.checkpoint.store import Committed
from service.errors import ExitCode, Preempted, Superseded
from service.ledger import Price
from service.manifest.spec import FineTuneJob, JobSpec
from service.metrics.registry import JobMetrics, Phase
from service.storage import Storage

if TYPE_CHECKING:
    from service.checkpoint.safepoint import Stop
    from service.fast import Report

log = structlog.get_logger(__name__)

BAD_INPUT = (ExitCode.INVALID_INPUT, ExitCode.DATA_UNUSABLE)


class RunObserver:
    def __init__(
        self, metrics: JobMetrics, attempt: AttemptLog, *, is_main: bool, output: Storage
    ) -> None:
        self.metrics = metrics
        self.attempt = attempt
        self.is_main = is_main  # rank 0 keeps the attempt record and reports to trackers
        self.output = output  # the run's outputs: tracker files are published there
        self._tracking: Path | None = None  # the work dir, once trackers were configured
        self._stopping = False
        self._earlier_usd = 0.0  # the run's earlier attempts, from the ledger
        self._spent_until = time.time()
        self._billed = False  # the final bill is set: the run's gauges stand
        self._step_ended_unix: dict[int, float] = {}  # steps not committed yet, rank 0

    def start(self, spec: JobSpec, local_rank: int, manifest_sha256: str, run_id: str) -> None:
        """Serve /metrics (local rank k on port + k: each GPU's throughput is its own) and
        describe the job. Metrics are on the side: never a reason not to train."""
        port = spec.metrics.port
        if port is not None:
            try:
                self.metrics.serve(port + local_rank if port else port)
            except OSError as err:
                log.warning("metrics_server_unavailable", port=port, error=str(err))
        self.metrics.set_info(
            model=spec.model.source, manifest_sha256=manifest_sha256, run_id=run_id
        )

    def opening(self) -> None:
        """The attempt's record (billed from its process's start), written before the model
        loads and the run is claimed: an attempt reclaimed while it loads still shows in the
        ledger (rank 0 keeps it). Earlier, the input is checked in seconds: an attempt that
        ends there is written as it ends, unless its input was bad (nothing is written then,
        and retrying cannot help)."""
        if self.is_main:
            self.attempt.open()

    def kernels(self, report: Report | None) -> dict[str, Any] | None:
        """The speed layer's report for run.json, and its gauges."""
        if report is None:
            return None
        self.metrics.fused_kernels(report.counts(), len(report.fallbacks))
        return report.as_dict()

    # -- money -------------------------------------------------------------------

    def priced(self, instance_type: str | None, price: Price, gpus: int) -> list[dict[str, Any]]:
        """This attempt's price, from its start; returns the ledger of the run's earlier
        attempts."""
        a = self.attempt.attempt
        a.instance_type, a.gpus, a.price_source = instance_type, gpus, price.source
        a.gpu_hour_usd, a.on_demand_gpu_hour_usd = price.gpu_hour_usd, price.on_demand_gpu_hour_usd
        rows = [ledger.row(r) for r in self.attempt.history(claimed=False)]
        bill = ledger.totals(rows, 0)
        self._earlier_usd = (bill["total_usd"] or 0.0) - (rows[-1]["cost_usd"] or 0.0)
        self.metrics.run_ledger(len(rows), bill["total_usd"], bill["lost_to_preemption_usd"])
        log.info("attempt_priced", instance_type=instance_type, gpus=gpus, **vars(price))
        return rows[:-1]

    def _spend(self) -> None:
        a = self.attempt.attempt
        now = time.time()
        if a.gpu_hour_usd is not None:
            own = (now - a.started_unix) / 3600 * a.gpu_hour_usd * a.gpus
            step = (now - self._spent_until) / 3600 * a.gpu_hour_usd * a.gpus
            self.metrics.spent(step, self._earlier_usd + own)
        self._spent_until = now

    # -- phases ------------------------------------------------------------------

    def phase(self, phase: Phase) -> None:
        self.metrics.set_phase(phase)

    # -- experiment trackers (service.tracking) -------------------------------------

    def trackers(self, job: FineTuneJob, run_id: str, work_dir: Path) -> list[str] | None:
        """The trainer's report_to: rank 0 reports for the run."""
        if not self.is_main:
            return None
        self._tracking = work_dir
        return tracking.configure_tracking(job, run_id, work_dir)

    def _close_trackers(self, status: tracking.TrackerStatus, trainer: Any) -> None:
        """Closes the runs and publishes their files beside the adapter; never raises."""
        if self._tracking is None:
            return
        work_dir, self._tracking = self._tracking, None
        tracking.finish_tracking(status, trainer)
        try:
            tracking.publish_tensorboard(work_dir / tracking.TENSORBOARD_DIR, self.output)
            tracking.publish_wandb_offline(work_dir / "wandb", self.output)
        except Exception as err:  # trackers are on the side: never a reason to fail a run
            log.warning("tracker_files_not_published", error=f"{type(err).__name__}: {err}")

    def publishing(self, trainer: Any) -> None:
        """Before the run's record is written, so it covers the tracker files."""
        self._close_trackers("FINISHED", trainer)

    @contextmanager
    def ending(
        self, step: Callable[[], int], reason: Callable[[], str | None], trainer: Callable[[], Any]
    ) -> Iterator[None]:
        """Records how the attempt ends, whatever ends it: its ledger row and the last phase."""
        outcome: Phase | None = Phase.FAILED
        try:
            yield
            outcome = Phase.DONE
        except Preempted:
            outcome = Phase.PREEMPTED
            self.attempt_ended("preempted", step(), reason=reason())
            raise
        except Superseded:
            outcome = None  # the pod that took over speaks for the job now
            self.attempt_ended("superseded", step())
            raise
        except BaseException as err:
            if self.attempt.opened or getattr(err, "exit_code", None) not in BAD_INPUT:
                self.attempt_ended("failed", step(), reason=repr(err))
            raise
        finally:
            self.finished(outcome, trainer())

    def finished(self, outcome: Phase | None, trainer: Any = None) -> None:
        """DONE, PREEMPTED or FAILED pushed; None (superseded) pushes nothing."""
        if outcome is not None and outcome is not Phase.DONE:
            self._close_trackers("KILLED" if outcome is Phase.PREEMPTED else "FAILED", trainer)
        if self.is_main and self.attempt.started and not self._billed:
            self._spend()
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
            self._step_ended_unix[step] = time.time()
            self.attempt.step(step)
            self._spend()

    def training(self) -> None:
        if self.is_main:
            self.attempt.update(train_started_unix=time.time())
        self.phase(Phase.TRAINING)

    # -- the committer -------------------------------------------------------------

    def committed(self, committed: Committed, upload_seconds: float, upload_bytes: int) -> None:
        ended = self._step_ended_unix.get(committed.step)
        for done in [s for s in list(self._step_ended_unix) if s <= committed.step]:
            self._step_ended_unix.pop(done, None)  # the training thread adds steps meanwhile
        self.attempt.committed(committed.step, ended)
        self.metrics.checkpoint_committed(committed.step, upload_seconds, upload_bytes)

    def commit_failed(self, step: int, error: str) -> None:
        self.attempt.event("checkpoint_failed", step=step, error=error)
        self.metrics.checkpoint_failed(step, error)

    # -- the run's story -------------------------------------------------------------

    def resumed(self, step: int) -> None:
        self.attempt.event("resumed", step=step)
        self.attempt.update(start_step=step, last_step=step)
        self.metrics.resumed(step)

    def stopping(self) -> None:
        """A stop was requested and the loop has ended: what is saved now is the last."""
        self._stopping = True
        self.phase(Phase.CHECKPOINTING)

    def stopped(self, stop: Stop) -> None:
        log.warning("preempted", **vars(stop))
        self._spend()
        a = self.attempt.attempt
        rate = a.gpu_hour_usd
        dollars = None if rate is None else stop.lost_seconds / 3600 * rate * a.gpus
        self.metrics.lost_work(stop.lost_seconds, dollars)
        self.attempt.event(
            "preempted", step=stop.step, reason=stop.reason, lost_seconds=stop.lost_seconds
        )
        self.attempt_ended(
            "preempted", stop.step, reason=stop.reason, lost_seconds=stop.lost_seconds
        )

    def evaluated(self, found: dict[str, Any] | None) -> None:
        if found is not None:
            for side, scores in found["metrics"].items():
                for metric, value in scores.items():
                    self.metrics.task_score(metric, side, value)

    def promotion(self, promoted: bool, reason: str) -> None:
        self.attempt.event("promotion", promoted=promoted, reason=reason)

    def recorded(self, bill: dict[str, Any]) -> None:
        """The run's final bill, as run.json has it."""
        self._billed = True
        self.metrics.run_ledger(bill["attempts"], bill["total_usd"], bill["lost_to_preemption_usd"])

    def attempt_ended(self, outcome: str, step: int, **fields: Any) -> None:
        """Once per attempt, on rank 0, claimed or not: one that ends while it starts shows."""
        if self.is_main and self.attempt.attempt.ended_unix is None:
            self.attempt.opened = True  # written now if not before (see opening)
            self.attempt.finish(outcome, last_step=step, **fields)
