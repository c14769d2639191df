"""The phases a job reports, exactly one at a time."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    LOADING = "loading"
    TRAINING = "training"
    CHECKPOINTING = "checkpointing"
    EXPORTING = "exporting"
    DONE = "done"
    PREEMPTED = "preempted"  # stopped early to be resumed: not a failure
    FAILED = "failed"
