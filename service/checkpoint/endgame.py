"""How a stop ends an attempt, in training or after it.

In training the loop stops at a safe point and the step is committed (SafePointCallback).
After training the last step is committed already (SafePointCallback.commit_final), so every
phase after it (Trainer's evaluation, the samples and task metrics, the gate, save, the export,
publication) ends the attempt where it is when a stop comes: it calls ``AfterTraining.check``
at its boundaries and in its long loops, and Trainer's evaluation calls it at each batch.
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from service.checkpoint.safepoint import SafePointCallback, Stop
from service.errors import Preempted


class StopListener(Protocol):
    """What the run reports of a stop: the phase, the attempt's end, the work lost."""

    def stopping(self) -> None: ...

    def stopped(self, stop: Stop) -> None: ...


def end_early(
    safepoint: SafePointCallback,
    listener: StopListener,
    trainer: Any,
    start_step: int,
    *,
    agree: bool = True,
) -> NoReturn:
    """The committed step waited for within the grace budget, reported, and raised as the
    attempt's outcome (exit 75, or 76 without new progress)."""
    listener.stopping()
    stop = safepoint.stop_and_commit(trainer, start_step, agree=agree)
    listener.stopped(stop)
    raise Preempted(stop.message(), progress=stop.progress)


class AfterTraining(TrainerCallback):
    def __init__(
        self, safepoint: SafePointCallback, listener: StopListener, trainer: Any, start_step: int
    ) -> None:
        self.safepoint, self.listener = safepoint, listener
        self.trainer, self.start_step = trainer, start_step
        self._ended = False

    @classmethod
    def begin(
        cls, safepoint: SafePointCallback, listener: StopListener, trainer: Any, start_step: int
    ) -> AfterTraining:
        """When training has ended: its last step committed (a commit that fails is counted,
        never a reason to throw the finished adapter away), then a stop checked for."""
        safepoint.commit_final(trainer)
        after = cls(safepoint, listener, trainer, start_step)
        trainer.add_callback(after)  # Trainer's evaluation, at each batch
        after.check()
        return after

    def check(self) -> None:
        """Raises Preempted once a stop was requested; the ranks are not asked to agree, as
        each may see the request at another point of these phases."""
        if self._ended or not self.safepoint.watcher.requested.is_set():
            return
        self._ended = True  # the endgame evaluates nothing, but once is enough
        end_early(self.safepoint, self.listener, self.trainer, self.start_step, agree=False)

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.check()
