"""A finished run's outputs, written in the order that makes a crash anywhere safe.

1. The adapter's files (and a merged export, service.export). An older run.json is deleted
   first: it must not vouch for new files; so is an older merged/, which belongs to the
   adapter being replaced (with export.merged off, nothing would replace it).
2. When the promotion gate chose this run: the decision first, in PUBLISHING.json beside the
   adapter (the pointer to write, the PUBLISHED version the gate compared against, the
   record), then PUBLISHED, conditional on that version, so a run that published meanwhile
   is never replaced unseen.
3. run.json, once (If-None-Match): a reader that finds it finds everything it describes.
   Then PUBLISHING.json is deleted.
4. The report, the run's index line (idempotent by run id) and retention.

Every crash restarts to the decision already taken (``finished``):
- before PUBLISHING.json: nothing was published; the retry trains (or resumes), and its
  gate compares against the same PUBLISHED as this attempt's did;
- after it, before run.json: the retry neither trains nor gates again; it applies the
  recorded decision (PUBLISHED moved already, or conditionally now) and writes run.json;
- after run.json: the run is done, and 4 is repaired.
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
PENDING_RECORD = "PUBLISHING.json"  # a promotion decided, not yet recorded in run.json
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
        train again), or decided (a promotion recorded in PUBLISHING.json: applied now, with
        ``repair``). With ``repair`` (rank 0), what a crash after run.json may have lost is
        written: the index line."""
        record = self._read(RUN_RECORD)
        if record is not None and record.get("status") in DONE:
            log.info("run_already_complete", output=self.output.uri)
            if repair:
                self._index(record)
                self.output.delete([PENDING_RECORD])
            return record
        pending = self._read(PENDING_RECORD)
        if pending is None:
            return None
        log.info("run_already_decided", output=self.output.uri, promotion="promoted")
        return self._complete(pending) if repair else pending["record"]

    def _read(self, key: str) -> dict[str, Any] | None:
        """This run's record under ``key``, or None."""
        try:
            found: dict[str, Any] = json.loads(self.output.read_bytes(key))
        except FileNotFoundError:
            return None
        run_id = found.get("run_id", (found.get("record") or {}).get("run_id"))
        return found if run_id == self.run_id else None

    def upload_adapter(self, adapter: Path) -> None:
        """Step 1. An older run.json is deleted first: it must not vouch for new files; then
        an older merged model, which belongs to the adapter being replaced."""
        from service import export

        if self.output.head(RUN_RECORD) is not None:
            self.output.delete([RUN_RECORD])
        export.withdraw(self.output)
        files = sorted(p for p in adapter.rglob("*") if p.is_file())
        for path in files:
            self.output.upload_file(path, f"{ADAPTER_DIR}/{path.relative_to(adapter).as_posix()}")
        log.info("adapter_uploaded", uri=uri_join(self.output.uri, ADAPTER_DIR), files=len(files))

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
        written = record(decision)
        if decision is None or not decision.promoted or self.history is None:
            self._record(written)
            return written
        pointer = {
            "run_id": self.run_id,
            "adapter": f"runs/{self.run_id}/{ADAPTER_DIR}",
            "published_unix": time.time(),
            "eval_loss": eval_loss,
        }
        pending = {"run_id": self.run_id, "pointer": pointer, "compared_tag": compared_tag}
        self.output.write_bytes(PENDING_RECORD, _dump({**pending, "record": written}))
        return self._complete(json.loads(_dump({**pending, "record": written})))

    def _complete(self, pending: dict[str, Any]) -> dict[str, Any]:
        """Steps 2 to 4 of a decided promotion, from its PUBLISHING.json: what a restart
        repeats finds its own writes and goes on."""
        assert self.history is not None, "a promotion is decided with output.per_run only"
        written, conflict = pending["record"], None
        pointer = pending["pointer"]
        try:
            current, _ = self.history.published()
            if current != pointer:  # else: moved already, by an earlier attempt of this run
                self._move_published(pointer, pending["compared_tag"])
            log.info("published", run_id=self.run_id, reason=written["promotion"]["reason"])
        except PublicationConflict as err:
            conflict = err
            written = {**written, "promotion": {"promoted": False, "reason": str(err)}}
            log.error("publication_conflict", run_id=self.run_id, error=str(err))
        self._record(written)
        self.output.delete([PENDING_RECORD])
        if conflict is not None:
            raise conflict
        return written

    def _move_published(self, pointer: dict[str, Any], compared_tag: str | None) -> None:
        assert self.history is not None
        try:
            self.history.publish(pointer, compared_tag)
        except PublicationConflict:
            current, _ = self.history.published()
            if current != pointer:  # not our own earlier write whose answer was lost
                raise

    def _record(self, written: dict[str, Any]) -> None:
        """Step 3, then 4. A 412 on run.json is another writer's unless it is what this
        process meant to write (a retried request whose first answer was lost)."""
        data = _dump(written)
        try:
            self.output.write_bytes(RUN_RECORD, data, if_none_match=True)
        except PreconditionFailed:
            try:
                ours = self.output.read_bytes(RUN_RECORD) == data
            except FileNotFoundError:
                ours = False
            if not ours:
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
