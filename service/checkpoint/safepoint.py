"""Safe points: where the training loop may checkpoint or stop, and the stop itself.

A trainer callback decides at each step and micro-batch boundary; the run's stop (which
step to save, handing it to the committer, waiting for the commit within the grace
budget) is one method here, so the whole preemption endgame has one owner.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import structlog
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from service.checkpoint.committer import BackgroundCommitter
from service.checkpoint.interval import CheckpointSchedule
from service.distributed import (
    Ranks,
    any_rank,
    barrier,
    broadcast,
    gather_to_main,
    ranks_from_env,
)
from service.ledger import lost_work_seconds
from service.manifest.spec import JobSpec
from service.preemption import PreemptionWatcher

log = structlog.get_logger(__name__)

RNG_STATE_FILE = "rng_state.pth"
TRAINING_ARGS_FILE = "training_args.bin"
# Finish the optimizer step in progress only if that is expected to take at most this
# share of the grace budget; otherwise checkpoint the previous step's state at once.
FINISH_STEP_BUDGET_SHARE = 1 / 3
# How often a wait for the final commit looks for a stop request.
STOP_POLL_SECONDS = 0.1


@dataclass
class StopState:
    preempted: bool = False
    mid_step: bool = False  # stopped between micro-batches: save the previous step's state


@dataclass
class MicroBatchClock:
    """Micro-batch time (a moving average) and how many of this step's are done."""

    seconds: float = 0.0
    done_in_step: int = 0
    _started: float = field(default_factory=time.monotonic)

    def step_begins(self) -> None:
        self.done_in_step, self._started = 0, time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        elapsed, self._started = now - self._started, now
        self.seconds = elapsed if self.seconds == 0 else 0.8 * self.seconds + 0.2 * elapsed


def capture_rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        # As Trainer saves it: all devices' states when distributed.
        distributed = ranks_from_env().distributed
        state["cuda"] = (
            torch.cuda.random.get_rng_state_all()
            if distributed
            else torch.cuda.random.get_rng_state()
        )
    return state


class SafePointListener(Protocol):
    """What the run does around a checkpoint: phase, metrics, the attempt's heartbeat."""

    def checkpoint_started(self) -> None: ...

    def checkpoint_saved(self, step: int, blocking_seconds: float) -> None: ...

    def step_ended(self, step: int) -> None: ...


class SafePointCallback(TrainerCallback):
    """Decides at each step and micro-batch boundary whether to checkpoint or stop, and
    owns the stop: which step is saved, and handing it to the committer.

    Periodic checkpoints: Trainer writes the snapshot (the blocking part), then the
    committer uploads it in the background. On a preemption request: finish the current
    optimizer step if it fits in a share of the grace budget and checkpoint it; if not,
    stop at the next micro-batch boundary and checkpoint the state as of the last
    completed step (weights and optimizer only change at the step, and the RNG state of
    that moment was kept), so the resumed run replays the partial step exactly.
    """

    def __init__(
        self,
        spec: JobSpec,
        committer: BackgroundCommitter,
        watcher: PreemptionWatcher,
        work_dir: Path,
        listener: SafePointListener | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        self.ranks = ranks or Ranks()
        # With checkpoint.every_seconds: auto, the recipe paces it from the ledger's history.
        self.schedule = CheckpointSchedule(
            spec.checkpoint.every_steps, spec.checkpoint.every_seconds
        )
        self.clock = MicroBatchClock()
        self.committer = committer
        self.watcher = watcher
        self.work_dir = work_dir
        self.listener = listener
        self.order_state: dict[str, Any] | None = None  # committed with every checkpoint
        self.stop = StopState()
        self.step_rng: dict[str, Any] | None = None
        self.step_ended_unix: dict[int, float] = {}
        self.last_saved_step = -1
        self._save_requested_at: float | None = None
        self._staging = itertools.count()

    def mark_resumed(self, step: int) -> None:
        self.last_saved_step = step
        self.step_ended_unix[step] = time.time()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Work lost by a stop is counted from the last committed step: the start, until one.
        self.step_ended_unix[state.global_step] = time.time()
        self.schedule.start()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.clock.step_begins()

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.clock.tick()
        self.clock.done_in_step += 1
        expected = (args.gradient_accumulation_steps - self.clock.done_in_step) * self.clock.seconds
        requested = self.watcher.requested.is_set()
        too_long = requested and expected > self.watcher.seconds_left() * FINISH_STEP_BUDGET_SHARE
        requested, too_long = any_rank(requested, too_long)
        if requested and too_long:
            log.warning(
                "preemption_stop_mid_step",
                step=state.global_step,
                micro_batches_done=self.clock.done_in_step,
                expected_finish_seconds=round(expected, 2),
            )
            self.stop = StopState(preempted=True, mid_step=True)
            control.should_training_stop = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.clock.tick()
        self.step_rng = capture_rng_state()
        step = state.global_step
        self.step_ended_unix[step] = time.time()
        if self.listener is not None:
            self.listener.step_ended(step)
        # Rank 0's clock decides, as it measures the saves: every rank then agrees below.
        time_due = self.ranks.is_main and self.schedule.time_due()
        requested, time_due = any_rank(self.watcher.requested.is_set(), time_due)
        # The last step is always committed: evaluation, the gate and the export start from it,
        # and a stop in any of them resumes there with nothing to train again.
        last = 0 < state.max_steps <= step
        if requested:
            self.stop = StopState(preempted=True)
            control.should_training_stop = True
            if step != self.last_saved_step:
                control.should_save = True
        elif step != self.last_saved_step and (last or self.schedule.step_due(step) or time_due):
            control.should_save = True
        if control.should_save:
            self._save_started()

    def commit_final(self, trainer: Any) -> None:
        """When training has ended: the last step committed before anything else starts (the
        loop saved it at its last step; a loop that ended otherwise is saved here). A stop
        requested meanwhile leaves the commit what is left of the grace budget."""
        if trainer.state.global_step > self.last_saved_step:
            self.save_stopped_step(trainer)
        while not self.committer.wait(STOP_POLL_SECONDS):
            if self.watcher.requested.is_set():
                self.committer.wait(max(self.watcher.seconds_left(), 0.0))
                return

    def _save_started(self) -> None:
        self._save_requested_at = time.monotonic()
        if self.listener is not None:
            self.listener.checkpoint_started()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        self.submit(folder, state.global_step)

    def submit(self, folder: Path, step: int) -> None:
        """Move the snapshot out of Trainer's way (a rename) and hand it to the committer.
        Rank 0 alone commits, so it first gathers every rank's RNG state: on several nodes
        the other ranks wrote theirs to their own node's disk."""
        barrier()
        if self.ranks.distributed:
            self._gather_rng_files(folder)
        self.schedule.saved()
        if not self.ranks.is_main:
            self.last_saved_step = step
            return
        staged = self.work_dir / f"staged-{step:08d}-{next(self._staging)}"
        os.replace(folder, staged)
        blocking = time.monotonic() - (self._save_requested_at or time.monotonic())
        self._save_requested_at = None
        self.last_saved_step = step
        log.info("checkpoint_saved", step=step, blocking_seconds=round(blocking, 3))
        if self.listener is not None:
            self.listener.checkpoint_saved(step, blocking)
        queued = time.monotonic()
        self.committer.submit(staged, step, self.order_state)  # waits for the previous upload
        waited = time.monotonic() - queued
        self.schedule.measured(blocking + waited, self.committer.last_upload_seconds)

    def _gather_rng_files(self, folder: Path) -> None:
        name = f"rng_state_{self.ranks.rank}.pth"
        own = (folder / name).read_bytes() if (folder / name).is_file() else None
        gathered = cast(list[tuple[str, bytes | None]] | None, gather_to_main((name, own)))
        for rank_name, data in gathered or []:
            if data is not None and not (folder / rank_name).is_file():
                (folder / rank_name).write_bytes(data)

    def save_stopped_step(self, trainer: Any) -> None:
        """After a mid-step stop: snapshot the last completed step. The weights, optimizer,
        scheduler and trainer state in memory are still that step's (the partial step only
        accumulated gradients); the RNG state is replaced by the one kept at that step.
        Trainer has no public "save a checkpoint now"; _save_checkpoint is what its own
        save strategy calls."""
        import torch

        step = trainer.state.global_step
        if step <= self.last_saved_step:
            return
        trainer.model.zero_grad(set_to_none=True)
        self._save_started()
        trainer._save_checkpoint(trainer.model, None)
        folder = Path(str(trainer.args.output_dir)) / f"checkpoint-{step}"
        if self.step_rng is not None:
            # Trainer's names: one file per process when distributed.
            name = f"rng_state_{self.ranks.rank}.pth" if self.ranks.distributed else RNG_STATE_FILE
            torch.save(self.step_rng, folder / name)
        self.submit(folder, step)

    def stop_and_commit(self, trainer: Any, start_step: int, *, agree: bool = True) -> Stop:
        """After the loop stopped on a request: save the right step (the last completed one
        after a mid-step stop), wait for its commit within what is left of the grace
        budget, and say what was kept. With ``agree`` every rank calls it and they agree on
        the progress; after training (``agree`` False) each rank stops where it sees the
        request, and a rank other than 0, which commits nothing, counts the last step as
        committed (commit_final saw to it)."""
        if self.stop.mid_step:
            self.save_stopped_step(trainer)
        step = int(trainer.state.global_step)
        in_time = self.committer.wait(max(self.watcher.seconds_left(), 0.0))
        last = self.committer.last
        if last is not None:
            committed = last.step
        else:
            committed = step if not agree and not self.ranks.is_main else start_step
        progress = committed > start_step
        if agree:
            progress = bool(broadcast(progress))
        stopped_at = self.watcher.requested_unix or time.time()
        committed_at = self.step_ended_unix.get(committed)
        return Stop(
            reason=self.watcher.reason,
            step=step,
            committed_step=committed,
            in_time=in_time,
            progress=progress,
            lost_seconds=round(lost_work_seconds(committed_at, None, stopped_at), 3),
        )


@dataclass(frozen=True)
class Stop:
    """How an early stop ended."""

    reason: str | None
    step: int  # the step training stopped at
    committed_step: int  # the newest committed step now
    in_time: bool  # the final commit landed within the grace budget
    progress: bool  # something was committed beyond where this attempt started
    lost_seconds: float  # from the end of the committed step to the stop request

    def message(self) -> str:
        kept = (
            "checkpoint committed"
            if self.in_time and self.committed_step == self.step
            else f"the newest committed checkpoint is step {self.committed_step}"
        )
        return f"preempted ({self.reason}) at step {self.step}; {kept}, run again to resume"


def checkpoint_problem(folder: Path) -> str | None:
    """Why a downloaded checkpoint cannot be loaded, or None. Its checksums only prove it is
    what was committed; a file truncated before it was hashed, or a pickle that torch's safe
    loader refuses, would otherwise fail the resume itself."""
    import torch
    from safetensors.torch import load_file
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == TRAINING_ARGS_FILE:
            continue  # Trainer writes it for people to read, and never loads it back
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix in (".pt", ".pth", ".bin"):
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:
            return f"{path.relative_to(folder)}: {type(err).__name__}: {err}"
    return None
