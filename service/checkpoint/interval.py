"""How often to checkpoint: ``checkpoint.every_seconds: auto`` chosen from data.

Young and Daly: with a checkpoint that blocks training for C seconds and interruptions
that arrive on average every M seconds, the interval that minimises the expected waste
(checkpoint time plus work lost at an interruption) is about sqrt(2 C M). C is measured on
this run's own saves (the blocking part, including any wait for the previous upload); M comes
from the ledger of this job's attempts (service.ledger), starting from a stated prior.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

# Before any history: as if one interruption had been seen in six hours of running. Spot
# capacity is reclaimed from a few times a day to a few times a month (AWS publishes an
# interruption frequency band per instance type; the T4 types sit in its lower bands), so
# six hours errs towards checkpointing more often than most pools need.
PRIOR_SECONDS = 6 * 3600.0
PRIOR_INTERRUPTIONS = 1.0
# Before the first save is measured: a T4 saving a 7B QLoRA adapter and its optimizer state.
PRIOR_CHECKPOINT_SECONDS = 2.0
MIN_INTERVAL_SECONDS = 30.0  # below this the pointer and manifest writes dominate
MAX_INTERVAL_SECONDS = 3600.0  # an hour of work is the most any interruption may take
CHANGE_TO_LOG = 0.1  # log a new interval when it moves by more than this share


def mean_time_between_interruptions(seconds: float, interruptions: int) -> float:
    """M from observed running time and interruptions, shrunk towards the prior while they
    are few: (prior seconds + seen) / (prior interruptions + seen)."""
    return (PRIOR_SECONDS + max(seconds, 0.0)) / (PRIOR_INTERRUPTIONS + max(interruptions, 0))


def young_daly_seconds(checkpoint_seconds: float, mtbi_seconds: float) -> float:
    return math.sqrt(2.0 * max(checkpoint_seconds, 1e-3) * mtbi_seconds)


@dataclass
class AutoInterval:
    """The interval now, from what has been measured so far."""

    history_seconds: float = 0.0  # running time in the ledger before this attempt
    history_interruptions: int = 0
    checkpoint_seconds: float = PRIOR_CHECKPOINT_SECONDS
    upload_seconds: float = 0.0  # the last upload: an interval shorter would queue them
    log_changes: bool = True
    _saves: int = 0
    _logged: float = 0.0

    def saved(self, blocking_seconds: float, upload_seconds: float | None = None) -> None:
        """A save's blocking cost; the first replaces the prior, later ones average in."""
        self._saves += 1
        weight = 1.0 if self._saves == 1 else 0.3
        self.checkpoint_seconds += weight * (blocking_seconds - self.checkpoint_seconds)
        if upload_seconds is not None:
            self.upload_seconds = upload_seconds

    def seconds(self, running_seconds: float = 0.0) -> float:
        """The interval for this attempt, ``running_seconds`` into it (no interruption yet)."""
        mtbi = mean_time_between_interruptions(
            self.history_seconds + running_seconds, self.history_interruptions
        )
        raw = max(young_daly_seconds(self.checkpoint_seconds, mtbi), self.upload_seconds)
        interval = min(max(raw, MIN_INTERVAL_SECONDS), MAX_INTERVAL_SECONDS)
        if self.log_changes and abs(interval - self._logged) > CHANGE_TO_LOG * max(
            self._logged, 1e-9
        ):
            self._logged = interval
            log.info(
                "checkpoint_interval",
                seconds=round(interval, 1),
                checkpoint_seconds=round(self.checkpoint_seconds, 3),
                upload_seconds=round(self.upload_seconds, 3),
                mean_time_between_interruptions_seconds=round(mtbi),
                history_seconds=round(self.history_seconds + running_seconds),
                history_interruptions=self.history_interruptions,
            )
        return interval


class CheckpointSchedule:
    """When a periodic checkpoint is due: every N steps, every S seconds, or ``auto``."""

    def __init__(self, every_steps: int | None, every_seconds: float | Literal["auto"] | None):
        self.every_steps = every_steps
        self.auto = AutoInterval() if every_seconds == "auto" else None
        self.every_seconds = None if every_seconds == "auto" else every_seconds
        self.start()

    def start(self) -> None:
        self._started = self._last_save = time.monotonic()

    def pace(self, *histories: tuple[float, int]) -> None:
        """The interruptions seen before (running seconds, early ends), for an auto interval."""
        if self.auto is not None:
            self.auto.history_seconds = sum(seconds for seconds, _ in histories)
            self.auto.history_interruptions = sum(count for _, count in histories)

    def interval_seconds(self) -> float | None:
        """Seconds between time-based checkpoints now (None: by steps only)."""
        if self.auto is not None:
            return self.auto.seconds(time.monotonic() - self._started)
        return self.every_seconds

    def time_due(self) -> bool:
        interval = self.interval_seconds()
        return bool(interval and time.monotonic() - self._last_save >= interval)

    def step_due(self, step: int) -> bool:
        return bool(self.every_steps and step % self.every_steps == 0)

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def measured(self, blocking_seconds: float, upload_seconds: float | None) -> None:
        """What a save cost training (the snapshot and any wait for the previous upload)."""
        if self.auto is not None:
            self.auto.saved(blocking_seconds, upload_seconds)
