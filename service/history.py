"""Scheduled retraining's memory: per-run outputs, an append-only run index, the
PUBLISHED pointer and retention.

Layout under ``output.uri`` when ``output.per_run`` is on::

    runs/<run id>/adapter/...           this run's adapter
    runs/<run id>/run.json              written last, as in the single-run layout
    runs/<run id>/PUBLISHING.json       a promotion decided, until run.json records it
    index/<start ms>-<run id>.json      one object per finished run, never rewritten
    PUBLISHED                           the promoted run: moved with a conditional write

Consumers load ``runs/<PUBLISHED.run_id>/adapter/``. A run that is not promoted keeps its
outputs but leaves PUBLISHED where it was.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import structlog

from service.errors import PublicationConflict
from service.manifest.spec import JobSpec
from service.storage import PreconditionFailed, Storage, record_bytes

log = structlog.get_logger(__name__)

INDEX_PREFIX = "index"
RUNS_PREFIX = "runs"
PUBLISHED_KEY = "PUBLISHED"
# What decides the trained weights; output, metrics and checkpoint settings do not.
TRAINING_FIELDS = ("model", "quantization", "lora", "data", "training")


def training_sha256(spec: JobSpec) -> str:
    relevant = {name: getattr(spec, name).model_dump(mode="json") for name in TRAINING_FIELDS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


class RunHistory:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def run_storage(self, run_id: str) -> Storage:
        return self.storage.child(f"{RUNS_PREFIX}/{run_id}")

    def entries(self) -> list[dict[str, Any]]:
        keys = sorted(o.key for o in self.storage.list_objects(f"{INDEX_PREFIX}/"))
        return [json.loads(self.storage.read_bytes(k)) for k in keys]

    def append(self, entry: dict[str, Any]) -> None:
        """Idempotent by run id: a restarted pod that finds its run done repairs a missing
        line and leaves a present one alone."""
        suffix = f"-{entry['run_id']}.json"
        if any(o.key.endswith(suffix) for o in self.storage.list_objects(f"{INDEX_PREFIX}/")):
            return
        key = f"{INDEX_PREFIX}/{int(entry['started_unix'] * 1000):015d}{suffix}"
        try:
            self.storage.write_bytes(key, record_bytes(entry), if_none_match=True)
        except PreconditionFailed:
            log.info("run_index_entry_exists", key=key)  # a restarted pod of the same run

    def interruptions(self) -> tuple[float, int]:
        """Running seconds and early ends over the job's earlier runs (their ledgers)."""
        costs = [e.get("cost") or {} for e in self.entries()]
        return (
            sum(c.get("running_seconds", 0.0) for c in costs),
            sum(c.get("interruptions", 0) for c in costs),
        )

    def last_success(self) -> dict[str, Any] | None:
        done = [e for e in self.entries() if e["status"] == "succeeded"]
        return done[-1] if done else None

    def published(self) -> tuple[dict[str, Any] | None, str | None]:
        info = self.storage.head(PUBLISHED_KEY)
        if info is None:
            return None, None
        return json.loads(self.storage.read_bytes(PUBLISHED_KEY)), info.etag

    def publish(self, pointer: dict[str, Any], expected_tag: str | None) -> None:
        data = record_bytes(pointer)
        try:
            if expected_tag is None:
                self.storage.write_bytes(PUBLISHED_KEY, data, if_none_match=True)
            else:
                self.storage.write_bytes(PUBLISHED_KEY, data, if_match=expected_tag)
        except PreconditionFailed:
            raise PublicationConflict(
                "PUBLISHED moved while this run was deciding; another run published first. "
                "This run's outputs are kept under runs/; it is not promoted."
            ) from None

    def prune(self, keep_runs: int, checkpoints: Storage, protect: set[str]) -> list[str]:
        """Delete outputs and checkpoints of runs beyond the newest ``keep_runs`` that
        trained; the published run and ``protect`` are never deleted."""
        trained = [e["run_id"] for e in self.entries() if e["status"] == "succeeded"]
        keep = set(trained[-keep_runs:]) | protect
        doomed = [r for r in dict.fromkeys(trained) if r not in keep]
        for run_id in doomed:
            for store in (self.run_storage(run_id), checkpoints.child(run_id)):
                keys = [o.key for o in store.list_objects()]
                if keys:
                    store.delete(keys)
        if doomed:
            log.info("runs_pruned", runs=doomed)
        return doomed


def index_entry(record: dict[str, Any]) -> dict[str, Any]:
    """The index's line for a finished run: what a person looks for in the morning."""
    promotion = record.get("promotion") or {}
    return {
        "run_id": record["run_id"],
        "status": record["status"],
        "started_unix": record["timings"]["started_unix"],
        "finished_unix": record.get("finished_unix", time.time()),
        "data_fingerprint": record["data"].get("fingerprint"),
        "data_files": record["data"].get("files", []),
        "training_sha256": record.get("training_sha256"),
        "steps": record.get("steps"),
        "losses": record.get("losses", {}),
        "cost": record.get("cost"),
        "estimate": _estimated(record.get("estimate")),
        "throughput": record.get("throughput"),
        "promoted": bool(promotion.get("promoted", False)),
        "reason": promotion.get("reason") or record.get("reason", ""),
    }


def _estimated(estimate: dict[str, Any] | None) -> dict[str, Any] | None:
    """The start-up estimate's figures, for estimated against actual in ``runs list``."""
    keys = ("gpu", "tokens", "tokens_per_second", "train_seconds", "wall_seconds", "spot_usd")
    return {k: estimate.get(k) for k in keys} if estimate else None
