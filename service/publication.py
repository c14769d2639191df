"""A finished run's outputs, written in the order that makes a crash anywhere safe.

1. The adapter's files (and a merged export, service.export). An older run.json is deleted
   first: it must not vouch for new files.
2. PUBLISHED, when the promotion gate chose this run: conditional on the version the gate
   compared against, so a run that published meanwhile is never replaced unseen.
3. run.json, once (If-None-Match): a reader that finds it finds everything it describes.
4. The report, the run's index line (idempotent by run id) and retention.

A pod that dies before 3 runs again and publishes again; one that dies after 3 finds the run
done and repairs 4 (``finished``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from service.errors import PublicationConflict, SpotloraError, Superseded
from service.history import RunHistory, index_entry
from service.manifest.spec import JobSpec
from service.retraining import ADAPTER_DIR, Decision
from service.storage import PreconditionFailed, Storage, record_bytes, uri_join

log = structlog.get_logger(__name__)

RUN_RECORD = "run.json"
DONE = ("succeeded", "skipped")


class Publisher:
    def __init__(
        self,
        output: Storage,
        history: RunHistory | None,
        run_id: str,
        *,
        keep_runs: int | None,
        checkpoint_root: Storage,
        work_dir: Path,
    ) -> None:
        self.output = output
        self.history = history
        self.run_id = run_id
        self.keep_runs = keep_runs
        self.checkpoint_root = checkpoint_root
        self.work_dir = work_dir

    def finished(self, *, repair: bool) -> dict[str, Any] | None:
        """This run's record when it is already done (a pod restarted after success must not
        train again); with ``repair`` (rank 0), the index line a crash right after run.json
        may have lost is written."""
        try:
            record: dict[str, Any] = json.loads(self.output.read_bytes(RUN_RECORD))
        except FileNotFoundError:
            return None
        if record.get("run_id") != self.run_id or record.get("status") not in DONE:
            return None
        log.info("run_already_complete", output=self.output.uri)
        if repair:
            self._index(record)
        return record

    def upload_adapter(self, adapter: Path) -> None:
        """Step 1. An older run.json is deleted first: it must not vouch for new files."""
        if self.output.head(RUN_RECORD) is not None:
            self.output.delete([RUN_RECORD])
        for path in sorted(p for p in adapter.rglob("*") if p.is_file()):
            self.output.upload_file(path, f"{ADAPTER_DIR}/{path.relative_to(adapter).as_posix()}")

    def export_merged(
        self,
        spec: JobSpec,
        model_dir: Path,
        adapter: Path,
        rows: list[dict[str, Any]],
        work_dir: Path,
        stop: Callable[[], None] | None = None,
    ) -> tuple[dict[str, Any], SpotloraError | None]:
        """Step 1 too, with spec.export.merged: the merged model under merged/ (service.export).
        A merge that does not reproduce base + adapter publishes nothing there; run.json says
        so, and the error is raised once it is written."""
        from service import export

        prompts = export.verification_prompts(rows, spec.export.verify_prompts)
        try:
            return export.export_merged(
                spec, model_dir, adapter, prompts, self.output, work_dir, stop
            ), None
        except export.ExportMismatch as err:
            log.error("export_failed", error=str(err))
            return {"status": "failed", "error": str(err)}, err

    def publish(
        self,
        *,
        decision: Decision | None,
        compared_tag: str | None,
        eval_loss: float | None,
        record: Callable[[Decision | None], dict[str, Any]],
    ) -> dict[str, Any]:
        """Steps 2 to 4, once the adapter (and any merged export) is uploaded; returns the
        record written. Losing the PUBLISHED race is recorded in run.json first, then raised
        (PublicationConflict)."""
        conflict = None
        if decision is not None and decision.promoted and self.history is not None:
            try:
                self.history.publish(
                    {
                        "run_id": self.run_id,
                        "adapter": f"runs/{self.run_id}/{ADAPTER_DIR}",
                        "published_unix": time.time(),
                        "eval_loss": eval_loss,
                    },
                    compared_tag,
                )
                log.info("published", run_id=self.run_id, reason=decision.reason)
            except PublicationConflict as err:
                conflict, decision = err, Decision(False, str(err))
                log.error("publication_conflict", run_id=self.run_id, error=str(err))
        written = record(decision)
        try:
            self.output.write_bytes(RUN_RECORD, _dump(written), if_none_match=True)
        except PreconditionFailed:
            raise Superseded("another process published this run's outputs first") from None
        self._report(written)
        self._index(written)
        log.info(
            "run_complete",
            output=self.output.uri,
            adapter=uri_join(self.output.uri, ADAPTER_DIR),
            steps=written["steps"],
            final_train_loss=written["losses"]["final_train"],
        )
        if conflict is not None:
            raise conflict
        return written

    def record_skip(self, record: dict[str, Any]) -> None:
        self.output.write_bytes(RUN_RECORD, _dump(record))
        self._index(record)
        log.info("run_skipped", reason=record.get("reason"))

    def _index(self, record: dict[str, Any]) -> None:
        """The run's index line, then retention: the published run and this one are kept."""
        if self.history is None:
            return
        self.history.append(index_entry(record))
        if self.keep_runs and record["status"] == "succeeded":
            published, _ = self.history.published()
            protect = {self.run_id} | ({published["run_id"]} if published else set())
            self.history.prune(self.keep_runs, self.checkpoint_root, protect)

    def _report(self, record: dict[str, Any]) -> None:
        """Plots next to run.json. A convenience: a failure here never fails the run."""
        try:
            from service.report import write_report

            for path in write_report(record, self.work_dir / "report"):
                self.output.upload_file(path, path.name)
        except Exception as err:
            log.warning("report_not_written", error=f"{type(err).__name__}: {err}")


def _dump(record: dict[str, Any]) -> bytes:
    return record_bytes(record)
