"""One record per attempt of a run (one pod's life), kept beside the run's checkpoints.

A preempted or killed process cannot write run.json, so each attempt writes its own small
record as it goes: from the start of its process (before it claims the run), when it claims
the run, resumes and begins training, at every commit, every few minutes while it trains,
and when it stops. The attempt that finishes the run copies them all into run.json,
so the record tells every attempt's story: where it ran, how it ended, the steps it gained
and the work it lost. An attempt that never wrote its end was killed (SIGKILL, a lost
node); its last update bounds when.

Layout: ``attempts/<start ms>-<writer>.json`` under the run's checkpoint prefix. Each
writer writes only its own key, so there is nothing to race.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from service.storage import Storage, record_bytes

log = structlog.get_logger(__name__)

PREFIX = "attempts/"
HEARTBEAT_SECONDS = 120.0


@dataclass
class Attempt:
    writer: str
    pod: str | None
    node: str | None
    device: str | None
    started_unix: float
    start_step: int
    updated_unix: float = 0.0
    ended_unix: float | None = None
    # starting (the run not claimed yet) | running | done | preempted | failed | superseded
    outcome: str = "starting"
    last_step: int = 0
    committed_step: int | None = None  # the newest step this attempt committed
    committed_step_ended_unix: float | None = None  # when training reached that step
    reason: str | None = None
    lost_seconds: float | None = None
    train_started_unix: float | None = None  # when setup ended and training began
    instance_type: str | None = None
    gpus: int = 1  # GPUs the attempt paid for: the run's processes
    gpu_hour_usd: float | None = None
    on_demand_gpu_hour_usd: float | None = None
    price_source: str = "none"
    events: list[dict[str, Any]] = field(default_factory=list)


def process_started_unix() -> float:
    """When this process started: an attempt's bill starts there, with the imports and the
    model load in its setup. Read from /proc (Linux, the container); else now."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime_seconds = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime_seconds + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class AttemptLog:
    """Writes are serialized: the record is taken and written under one lock, so a write
    that started later (a heartbeat on its own thread, the end on the main thread) never
    lands before one that started earlier, and the stored record is always the newest."""

    def __init__(self, storage: Storage, attempt: Attempt) -> None:
        self.storage = storage
        self.attempt = attempt
        self.key = f"{PREFIX}{int(attempt.started_unix * 1000):015d}-{attempt.writer}.json"
        self._lock = threading.Lock()  # the record in memory
        self._writing = threading.Lock()  # the record in storage: one write at a time
        self._saving: threading.Thread | None = None
        self.opened = False  # its record is being kept (from the start of the process)
        self.started = False  # it claimed the run

    def open(self) -> None:
        """Before the run is claimed: an attempt that dies loading the model still shows in
        the ledger. Safe before the claim: the key is this writer's alone, and no reader
        takes anything from it but the attempt's own story."""
        self.opened = True
        self.save()

    def start(self) -> None:
        """The run is claimed: this attempt now trains it."""
        self.started = True
        with self._lock:
            self.attempt.outcome = "running"
        self.save()

    def event(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self.attempt.events.append({"type": kind, "time": time.time(), **fields})

    def update(self, **fields: Any) -> None:
        """Facts that became true now (the resumed step, the start of training): written at
        once, so a kill a second later does not lose them."""
        with self._lock:
            for name, value in fields.items():
                setattr(self.attempt, name, value)
        self.save()

    def step(self, step: int) -> None:
        """At each optimizer step: a cheap heartbeat, written off the training thread."""
        with self._lock:
            self.attempt.last_step = step
        now = time.time()
        due = self.started and now - self.attempt.updated_unix >= HEARTBEAT_SECONDS
        if due and (self._saving is None or not self._saving.is_alive()):
            self.attempt.updated_unix = now
            self._saving = threading.Thread(target=self.save, daemon=True)
            self._saving.start()

    def committed(self, step: int, step_ended_unix: float | None) -> None:
        """``step_ended_unix``: when training reached the committed step, where the work a
        kill would lose starts (service.ledger.lost_work_seconds)."""
        with self._lock:
            self.attempt.committed_step = step
            self.attempt.committed_step_ended_unix = step_ended_unix
        self.event("checkpoint", step=step)
        self.save()

    def finish_in_record(self, outcome: str, last_step: int) -> None:
        """The end, as the run record written now should show it; saved after that record."""
        with self._lock:
            self.attempt.outcome, self.attempt.ended_unix = outcome, time.time()
            self.attempt.last_step = last_step

    def finish(self, outcome: str, **fields: Any) -> None:
        self.update(outcome=outcome, ended_unix=time.time(), **fields)

    def save(self) -> None:
        """Bookkeeping: a failure to write it is logged, never a reason to stop training."""
        if not self.opened:
            return
        with self._writing:
            with self._lock:
                self.attempt.updated_unix = time.time()
                data = record_bytes(asdict(self.attempt))
            try:
                self.storage.write_bytes(self.key, data)
            except Exception as err:
                log.warning("attempt_record_not_written", key=self.key, error=str(err))

    def history(self, *, claimed: bool = True) -> list[dict[str, Any]]:
        """Every attempt of the run, oldest first, this one as it is now. One that never
        recorded its end and is not this one was killed. Empty while this attempt has not
        claimed the run, unless ``claimed`` is False (it is about to)."""
        if claimed and not self.started:
            return []
        records = []
        try:
            keys = sorted(o.key for o in self.storage.list_objects(PREFIX))
        except Exception as err:
            log.warning("attempt_records_unreadable", error=str(err))
            keys = []
        for key in keys:
            if key == self.key:
                continue
            try:
                record = json.loads(self.storage.read_bytes(key))
            except (FileNotFoundError, ValueError) as err:
                log.warning("attempt_record_unreadable", key=key, error=str(err))
                continue
            if record.get("outcome") in ("starting", "running"):
                if record["outcome"] == "starting":
                    record["reason"] = "ended before it claimed the run"
                record["outcome"] = "killed"
                record["ended_unix"] = record.get("updated_unix")
            records.append(record)
        with self._lock:
            records.append(asdict(self.attempt))
        return sorted(records, key=lambda r: r.get("started_unix") or 0)
