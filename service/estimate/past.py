"""What earlier runs measured, read from a job's output: the throughput each recorded, its
start-up, and the interruptions its attempts met (the ledger's running time and early ends).

A per-run output (``output.per_run``) is read from its run index, one small object per run;
a single-run output from its run.json.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any

import structlog

from service.errors import ManifestError
from service.estimate.throughput import Measured
from service.history import RunHistory
from service.storage import Storage, open_storage
from service.uris import check_storage_uri

log = structlog.get_logger(__name__)


@dataclass
class Past:
    measured: list[Measured] = field(default_factory=list)
    running_seconds: float = 0.0  # training time the ledger saw, and the early ends in it
    interruptions: int = 0
    setups: list[tuple[str, float]] = field(default_factory=list)  # (gpu, seconds) per run
    runs: int = 0

    def add(self, record: dict[str, Any]) -> None:
        """One run's record (run.json or its index line)."""
        self.runs += 1
        cost = record.get("cost") or {}
        self.running_seconds += float(cost.get("running_seconds") or 0.0)
        self.interruptions += int(cost.get("interruptions") or 0)
        measured = record.get("throughput")
        if isinstance(measured, dict):
            found = Measured.of(str(record.get("run_id")), measured)
            if found is not None:
                self.measured.append(found)
                setup = measured.get("setup_seconds")
                if isinstance(setup, int | float) and setup >= 0:
                    self.setups.append((found.work.gpu, float(setup)))

    def setup_seconds(self, gpu: str) -> float | None:
        """The median start-up of earlier runs on this GPU, else on any."""
        same = [s for g, s in self.setups if g == gpu] or [s for _, s in self.setups]
        return statistics.median(same) if same else None


def read_storage(storage: Storage, past: Past) -> None:
    entries = RunHistory(storage).entries()
    if entries:
        for entry in entries:
            past.add(entry)
        return
    try:
        record = json.loads(storage.read_bytes("run.json"))
    except FileNotFoundError:
        return
    except ValueError as err:
        log.warning("history_unreadable", uri=storage.uri, error=str(err))
        return
    if isinstance(record, dict):
        past.add(record)


def read_history(uris: list[str]) -> Past:
    """Every run recorded under these outputs (local dirs or s3:// URIs)."""
    past = Past()
    for uri in uris:
        try:
            check_storage_uri(uri)
        except ValueError as err:
            raise ManifestError(f"estimate: --history {uri!r}: {err}") from None
        before = past.runs
        read_storage(open_storage(uri), past)
        if past.runs == before:
            raise ManifestError(f"estimate: --history {uri}: no run.json and no run index there")
    return past
