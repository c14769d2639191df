"""What decides the order in which a run sees its data, recorded with every checkpoint and
compared before a resumed attempt loads anything.

A resumed run continues the same loss curve only if every step sees the rows the
uninterrupted run would have seen: the same rows, the same sampler seed, the same number of
rows per optimizer step split the same way across processes, the same schedule. Each
committed checkpoint carries a ``RunOrder``; an attempt that would continue differently is
refused (exit 2) with the settings that changed, rather than going on quietly with another
curve. The micro-batch and accumulation come from the checkpoint, not from this attempt's
GPU: ``batch_size: auto`` is re-sized at every start, and a pod that lands on another GPU
type must not change them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from service.checkpoint.store import CheckpointStore, Committed, LoadCheck
from service.distributed import Ranks, barrier, broadcast
from service.errors import DependencyError, ManifestError, SpotloraError
from service.manifest.spec import JobSpec
from service.versions import RESUME_MUST_MATCH, resume_differences

log = structlog.get_logger(__name__)

# The manifest sections that decide the trained weights (as promotion.TRAINING_FIELDS).
ORDER_SECTIONS = ("model", "quantization", "lora", "data", "training")
# Fields in those sections that change neither which rows a step sees nor the update made
# from them. The data paths are compared by content instead (train_rows_sha256), so moving
# the files is allowed; batch_size is compared as the micro-batch actually used.
ORDER_EXEMPT = frozenset(
    {
        "data.train",
        "data.eval",
        "training.batch_size",
        "training.logging_steps",
        "training.eval_steps",
        "training.gradient_checkpointing",
        "training.torch_compile",
        "training.fused_kernels",
        "training.offload_activations",
    }
)


def order_settings(spec: JobSpec) -> dict[str, Any]:
    """The order-deciding manifest fields, flattened to dotted names."""
    flat: dict[str, Any] = {}
    for section in ORDER_SECTIONS:
        for name, value in getattr(spec, section).model_dump(mode="json").items():
            if f"{section}.{name}" not in ORDER_EXEMPT:
                flat[f"{section}.{name}"] = value
    return flat


def rows_sha256(rows: list[dict[str, Any]]) -> str:
    """Content of the training rows as the trainer gets them, in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class RunOrder:
    micro_batch: int
    gradient_accumulation: int
    world_size: int
    train_rows_sha256: str
    settings: dict[str, Any]

    @classmethod
    def of(cls, trainer_args: Any, world_size: int, train_rows: str, spec: JobSpec) -> RunOrder:
        """The order a trainer built with these arguments will follow."""
        return cls(
            int(trainer_args.per_device_train_batch_size),
            int(trainer_args.gradient_accumulation_steps),
            world_size,
            train_rows,
            order_settings(spec),
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> RunOrder | None:
        """None for a checkpoint written before runs recorded their order."""
        if not state:
            return None
        try:
            return cls(
                micro_batch=int(state["micro_batch"]),
                gradient_accumulation=int(state["gradient_accumulation"]),
                world_size=int(state["world_size"]),
                train_rows_sha256=str(state["train_rows_sha256"]),
                settings=dict(state["settings"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class ResumePlan:
    micro_batch: int | None  # None: size it as for a fresh run
    gradient_accumulation: int


def plan_resume(
    recorded: RunOrder | None,
    *,
    step: int,
    spec: JobSpec,
    world_size: int,
    train_rows: str,
) -> ResumePlan:
    """Check this attempt against the checkpoint it would resume (at ``step``); return the
    micro-batch and accumulation to train with, or raise ManifestError naming what changed."""
    accumulation = spec.training.gradient_accumulation
    if recorded is None:
        return ResumePlan(None, accumulation)
    changes = [
        f"spec.{name}: {recorded.settings.get(name)!r} then, {value!r} now"
        for name, value in order_settings(spec).items()
        if name in recorded.settings and recorded.settings[name] != value
    ]
    requested = spec.training.batch_size
    if requested != "auto" and requested * accumulation != (
        recorded.micro_batch * recorded.gradient_accumulation
    ):
        changes.append(
            f"spec.training.batch_size: {recorded.micro_batch} rows per micro-batch then, "
            f"{requested} now"
        )
    if world_size != recorded.world_size:
        changes.append(
            f"processes: {recorded.world_size} then, {world_size} now (launch with the same "
            "number of processes)"
        )
    if train_rows != recorded.train_rows_sha256:
        changes.append("spec.data.train: the training rows' content differs")
    if changes:
        raise ManifestError(
            f"cannot resume the checkpoint at step {step}: it was trained with other settings "
            "that decide the data order, so the run would not continue the same curve:\n  "
            + "\n  ".join(changes)
            + "\nRestore them, or start a new run (a new run id), seeded from this one with "
            "spec.checkpoint.resume_from if you want its weights"
        )
    if requested != "auto":
        return ResumePlan(requested, accumulation)
    log.info(
        "resume_keeps_batch_size",
        micro_batch=recorded.micro_batch,
        gradient_accumulation=recorded.gradient_accumulation,
        reason="batch_size auto: the checkpoint's micro-batch wins over this GPU's",
    )
    return ResumePlan(recorded.micro_batch, recorded.gradient_accumulation)


def check_versions(recorded: dict[str, str] | None, step: int) -> None:
    """Refuse (exit 2) a checkpoint written by another major.minor of a library that reads
    its files back; say why a patch difference is safe. A checkpoint from before versions were
    recorded resumes: refusing would strand every run in flight across an upgrade, and the
    test-load before resuming still falls back from one that does not load."""
    if recorded is None:
        log.warning(
            "resume_versions_unrecorded",
            step=step,
            reason="checkpoint written by an older spotlora: library versions not compared",
        )
        return
    refused, safe = resume_differences(recorded)
    if refused:
        raise ManifestError(
            f"cannot resume the checkpoint at step {step}: it was written by other library "
            f"releases, whose files this image may read differently:\n  "
            + "\n  ".join(refused)
            + f"\nThe major.minor of {', '.join(RESUME_MUST_MATCH)} must match: run the image "
            "that wrote it (its run.json's versions name them), or start a new run (a new run id)"
        )
    if safe:
        log.info(
            "resume_versions_differ",
            step=step,
            differences=safe,
            reason="patch releases only (or libraries whose files the checkpoint does not "
            "hold): the checkpoint's files are read the same way",
        )


def fit_micro_batch(recorded: int, accumulation: int, fits: int) -> tuple[int, int]:
    """The recorded micro-batch when it fits this GPU; else the largest divisor of it that
    does, with the accumulation raised to keep the rows per optimizer step (and so the data
    order) unchanged."""
    if recorded <= fits:
        return recorded, accumulation
    divisor = max(d for d in range(1, min(fits, recorded) + 1) if recorded % d == 0)
    return divisor, accumulation * (recorded // divisor)


class Resumer:
    """Where a run resumes from: its own committed checkpoints once it has any, else the
    seed's (checkpoint.resume_from). Rank 0 reads; one download per node."""

    def __init__(
        self, own: CheckpointStore, seed: CheckpointStore | None, spec: JobSpec, ranks: Ranks
    ) -> None:
        self.stores = [own, *([seed] if seed else [])]
        self.seeded = seed is not None
        self.spec = spec
        self.ranks = ranks

    def plan(self, train_rows: str) -> ResumePlan:
        """Read what the checkpoint to resume recorded (nothing is fetched) and check this
        attempt against it: before any model is loaded or anything claimed."""
        found: tuple[int, dict[str, Any] | None, dict[str, str] | None] | None = None
        if self.ranks.is_main:
            for store in self.stores:
                committed = store.newest_verified()
                if committed is not None:
                    found = (committed.step, committed.state, committed.versions)
                    break
            if found is None and self.seeded:
                raise ManifestError(
                    "spec.checkpoint.resume_from: no committed checkpoint at "
                    f"{self.spec.checkpoint.resume_from}"
                )
        found = broadcast(found)  # type: ignore[assignment]
        if found is None:
            return ResumePlan(None, self.spec.training.gradient_accumulation)
        step, state, versions = found
        check_versions(versions, step)
        recorded = RunOrder.from_state(state)
        if recorded is None:
            log.warning(
                "resume_order_unrecorded",
                step=step,
                reason="checkpoint written by an older spotlora: its data order is not checked",
            )
        return self._check(recorded, step, train_rows)

    def _check(self, recorded: RunOrder | None, step: int, train_rows: str) -> ResumePlan:
        return plan_resume(
            recorded,
            step=step,
            spec=self.spec,
            world_size=self.ranks.world_size,
            train_rows=train_rows,
        )

    def fetch(
        self, local: Path, check: LoadCheck, train_rows: str, planned: ResumePlan
    ) -> Committed | None:
        """Download, verify and test-load the newest usable checkpoint, falling back to older
        ones. A run whose own checkpoints are all unusable stops (keeping them) rather than
        start over and throw every committed step away."""
        committed: Committed | None = None
        if self.ranks.is_local_main:
            for store in self.stores:
                tried = store.committed_keys()
                committed = store.fetch_latest(local, check=check)
                if committed is not None:
                    break
                if tried:
                    raise DependencyError(
                        f"none of the {len(tried)} committed checkpoints under "
                        f"{store.storage.uri} can be resumed (see the log for each); they are "
                        "kept. To start this run over, delete that prefix"
                    )
        committed = broadcast(committed)  # type: ignore[assignment]
        barrier()
        if committed is None:
            return None
        # What was fetched may be older (a fallback) or newer (a pod still committing when
        # this one planned): it must continue the order the trainer was built for.
        check_versions(committed.versions, committed.step)
        plan = self._check(RunOrder.from_state(committed.state), committed.step, train_rows)
        if planned.micro_batch is not None and plan != planned:
            raise SpotloraError(
                f"the checkpoint at step {committed.step} changed while this pod started "
                "(another pod committed with other settings); run again"
            )
        return committed
