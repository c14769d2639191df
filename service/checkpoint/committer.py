"""Commits in the background: the upload of a checkpoint goes on while training does."""

from __future__ import annotations

import contextvars
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from service.checkpoint.store import CheckpointStore, Committed
from service.errors import Superseded

log = structlog.get_logger(__name__)


class BackgroundCommitter:
    """Commit checkpoints in a thread while training goes on. At most one upload is in
    flight; a new one first waits for the previous, so the order of commits is the order
    of steps. A commit that fails is logged and counted, never fatal: the previous commit
    stands, and the next one (or the finished adapter) carries the progress. Only losing
    the run to another process (Superseded) stops it."""

    def __init__(self, store: CheckpointStore, keep: int) -> None:
        self.store = store
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._superseded: Superseded | None = None
        self.last: Committed | None = None
        self.last_upload_seconds = 0.0
        self.failures: list[dict[str, Any]] = []
        self.on_commit: list[Callable[[Committed, float, int], None]] = []
        self.on_failure: list[Callable[[int, str], None]] = []

    def submit(self, local_dir: Path, step: int, state: dict[str, Any] | None = None) -> None:
        self.wait()
        # The upload logs with the run's bound identity (job, run id, rank).
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(self._run, local_dir, step, state),
            name="checkpoint-commit",
            daemon=True,
        )
        self._thread.start()

    def _run(self, local_dir: Path, step: int, state: dict[str, Any] | None) -> None:
        start = time.monotonic()
        try:
            size = sum(p.stat().st_size for p in local_dir.rglob("*") if p.is_file())
            committed = self.store.commit(local_dir, step, self.keep, state)
            self.last = committed
            seconds = self.last_upload_seconds = time.monotonic() - start
            log.info(
                "checkpoint_committed",
                step=step,
                manifest=committed.manifest_key,
                upload_seconds=round(seconds, 3),
                upload_bytes=size,
            )
            for callback in self.on_commit:
                callback(committed, seconds, size)
        except Superseded as err:
            self._superseded = err
            log.error("checkpoint_commit_superseded", step=step, error=str(err))
        except Exception as err:  # storage down after retries, disk full, ...
            error = f"{type(err).__name__}: {err}"
            self.failures.append({"step": step, "error": error, "time": time.time()})
            log.error("checkpoint_commit_failed", step=step, error=error)
            for failed in self.on_failure:
                failed(step, error)
        finally:
            # Committed or not, the staged copy is done with: a failed one is never retried
            # (the next checkpoint carries the progress), and a cache volume filling with
            # them would fail the run's later saves.
            shutil.rmtree(local_dir, ignore_errors=True)

    def wait(self, timeout_seconds: float | None = None) -> bool:
        """Wait for the upload in flight; True when none is left running. Raises Superseded
        once another process has taken the run over."""
        if self._thread is not None:
            self._thread.join(timeout_seconds)
            if self._thread.is_alive():
                return False
            self._thread = None
        if self._superseded is not None:
            raise self._superseded
        return True
