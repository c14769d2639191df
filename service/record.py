"""run.json: what a finished run did, assembled from what each part of it knows.

Its keys are a contract with people and tools reading it (``spotlora runs show``, the run
report, dashboards): add keys, never repurpose them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service import estimate, ledger
from service.attempts import AttemptLog
from service.history import training_sha256
from service.manifest import LoadedManifest
from service.versions import library_versions

if TYPE_CHECKING:
    from service.retraining import Decision


def losses(log_history: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    train = [h["loss"] for h in log_history if "loss" in h]
    evals = [h["eval_loss"] for h in log_history if "eval_loss" in h]
    return {
        "final_train": train[-1] if train else None,
        "final_eval": evals[-1] if evals else None,
        "best_eval": min(evals) if evals else None,
    }


def preemptions(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every attempt that ended early: where, why, and the work it lost."""
    return [
        {
            "pod": r["pod"],
            "outcome": r["outcome"],
            "step": r["last_step"],
            "committed_step": r["committed_step"],
            "reason": r["reason"],
            "lost_seconds": r["lost_seconds"],
            "lost_usd": r["lost_usd"],
            "time": r["ended_unix"],
        }
        for r in rows
        if r["outcome"] in ("preempted", "killed")
    ]


@dataclass
class RunFacts:
    """What a run learns as it goes, for its record."""

    loaded: LoadedManifest
    run_id: str
    world_size: int
    started_unix: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    train_rows: str = ""  # sha256 of the training rows, in order
    data_order: dict[str, Any] | None = None
    resumed_from_step: int | None = None
    promotion: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None  # samples and task metrics (service.evaluation)
    export: dict[str, Any] | None = None  # the merged model (service.export)
    kernels: dict[str, Any] | None = None  # the speed layer's report (service.fast)
    estimate: dict[str, Any] | None = None  # made at the start (service.estimate.run)
    trainer: Any = None  # once built: its state holds the steps and the log history
    _t0: float = field(default_factory=time.monotonic)

    def mark(self, name: str) -> float:
        """Seconds since the run started, kept as ``<name>_seconds``."""
        seconds = self.timings[f"{name}_seconds"] = round(time.monotonic() - self._t0, 3)
        return seconds


@dataclass
class RunRecord:
    """run.json for one run: its facts, its commits, and its attempts' ledger."""

    facts: RunFacts
    committer: Any  # the run's checkpoint.committer.BackgroundCommitter
    attempts: AttemptLog

    def build(self, status: str) -> dict[str, Any]:
        return build(self.facts, status, committer=self.committer, attempts=self.attempts.history())

    def succeeded(self, decision: Decision | None) -> dict[str, Any]:
        """The finished run's record, this attempt closed as done (Publisher.publish's)."""
        self.attempts.finish_in_record("done", int(self.facts.trainer.state.global_step))
        self.facts.promotion = vars(decision) if decision else None
        return self.build("succeeded")


def build(
    facts: RunFacts, status: str, *, committer: Any, attempts: list[dict[str, Any]]
) -> dict[str, Any]:
    """``committer``: the run's checkpoint.committer.BackgroundCommitter."""
    log_history = list(facts.trainer.state.log_history) if facts.trainer else []
    steps = int(facts.trainer.state.global_step) if facts.trainer else facts.resumed_from_step or 0
    checkpoints = {
        "committed_step": committer.last.step if committer.last else None,
        "failed": committer.failures,
    }
    job = facts.loaded.job
    events = sorted((e for a in attempts for e in a.get("events", [])), key=_time)
    rows = [ledger.row(a) for a in attempts]
    return {
        "run_id": facts.run_id,
        "status": status,
        "name": job.metadata.name,
        "manifest": job.model_dump(mode="json", by_alias=True),
        "manifest_sha256": facts.loaded.sha256,
        "manifest_origin": facts.loaded.origin,
        "versions": library_versions(),
        "device": facts.device,
        "world_size": facts.world_size,
        "compute_dtype": facts.compute_dtype,
        "data": facts.data,
        "training_sha256": training_sha256(job.spec),
        "data_order": facts.data_order,
        "promotion": facts.promotion,
        "steps": steps,
        "resumed_from_step": facts.resumed_from_step,
        "losses": losses(log_history),
        "evaluation": facts.evaluation,
        "export": facts.export,
        "kernels": facts.kernels,
        "estimate": facts.estimate,
        "throughput": estimate.measured(
            facts.estimate,
            facts.trainer,
            facts.timings,
            rows[-1]["setup_seconds"] if rows else None,
        ),
        "checkpoints": checkpoints,
        "attempts": rows,
        "preemptions": preemptions(rows),
        "cost": ledger.totals(rows, ledger.trained_tokens(log_history)),
        "timings": {"started_unix": facts.started_unix, **facts.timings},
        "finished_unix": time.time(),
        "events": events,
        "log_history": log_history,
    }


def _time(event: dict[str, Any]) -> float:
    return float(event.get("time") or 0)
