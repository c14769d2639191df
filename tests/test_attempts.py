"""The attempt record: written when each fact becomes true, and never replaced by an older one."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from service.attempts import HEARTBEAT_SECONDS, Attempt, AttemptLog
from service.checkpoint.store import Committed
from service.metrics.registry import JobMetrics
from service.observer import RunObserver
from service.storage import LocalStorage


class SlowHeartbeatStorage(LocalStorage):
    """Writes from any thread but the main one take a while: a slow store under a heartbeat."""

    def write_bytes(self, key: str, data: bytes, **conditions: Any) -> str:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        return super().write_bytes(key, data, **conditions)


def attempt_log(storage: LocalStorage) -> AttemptLog:
    return AttemptLog(storage, Attempt("writer", "pod-0", None, None, time.time(), 0))


def stored(log: AttemptLog) -> dict[str, Any]:
    return dict(json.loads(log.storage.read_bytes(log.key)))


def test_a_heartbeat_never_overwrites_a_later_record(tmp_path: Path) -> None:
    log = attempt_log(SlowHeartbeatStorage(tmp_path))
    log.open()
    log.start()
    log.attempt.updated_unix -= HEARTBEAT_SECONDS  # the heartbeat is due
    log.step(5)  # its write starts on its own thread, and is slow
    assert log._saving is not None and log._saving.is_alive()
    log.finish("preempted", last_step=5, reason="SIGTERM")
    log._saving.join()
    record = stored(log)
    assert record["outcome"] == "preempted" and record["reason"] == "SIGTERM"


def test_facts_are_written_when_they_become_true(tmp_path: Path) -> None:
    """From the start of the process, before the claim; the resumed step and the start of
    training at once (a kill a second later must not lose them); a commit with the time its
    step ended."""
    log = attempt_log(LocalStorage(tmp_path))
    observer = RunObserver(JobMetrics("t"), log, is_main=True, output=LocalStorage(tmp_path))
    log.open()
    assert stored(log)["outcome"] == "starting"
    log.start()
    observer.resumed(100)
    assert (stored(log)["start_step"], stored(log)["last_step"]) == (100, 100)
    observer.training()
    assert stored(log)["train_started_unix"] is not None
    observer.step_ended(101)
    step_ended = time.time()
    time.sleep(0.05)
    observer.committed(Committed(101, "w-step-00000101/MANIFEST.json", {}), 0.05, 10)
    record = stored(log)
    assert record["committed_step"] == 101
    assert record["committed_step_ended_unix"] <= step_ended < record["events"][-1]["time"]


def test_an_attempt_that_never_claimed_the_run_shows_as_killed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    loading = attempt_log(storage)
    loading.open()  # then SIGKILL while the model loads
    later = AttemptLog(storage, Attempt("other", "pod-1", None, None, time.time() + 1, 0))
    later.open()
    later.start()
    earlier, this = later.history()
    assert earlier["pod"] == "pod-0" and earlier["outcome"] == "killed"
    assert earlier["reason"] == "ended before it claimed the run"
    assert this["outcome"] == "running"
