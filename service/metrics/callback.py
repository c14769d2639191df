"""The training loop's side of the metrics: a trainer callback that feeds JobMetrics, and the
progress line that replaces tqdm's bar in a pod's log."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog
from transformers import (
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from service.metrics.registry import JobMetrics

log = structlog.get_logger(__name__)

DEFAULT_PROGRESS_INTERVAL_SECONDS = 30.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class MetricsCallback(TrainerCallback):
    """Feeds JobMetrics from the trainer, and writes the progress line when asked to.

    Reads the keys transformers 5 and trl 1.16 put in `logs`: `loss`, `grad_norm`,
    `learning_rate`, `epoch`, `num_tokens` (trl: cumulative non-padding training tokens since
    the trainer was built, not restored on resume) and `eval_loss`. Tokens/s is the
    `num_tokens` delta between two logs over the wall time between them.
    """

    def __init__(
        self,
        metrics: JobMetrics,
        *,
        progress_interval_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.progress_interval_seconds = progress_interval_seconds
        self._clock = clock
        self._last_tokens: float | None = None
        self._last_tokens_time = 0.0
        self._tokens_per_second = 0.0
        self._last_loss: dict[str, float] = {}
        self._samples_per_step = 0
        self._begin_time = 0.0
        self._begin_step = 0
        self._last_progress_time = 0.0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = self._clock()
        self._samples_per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        self._begin_time = now
        self._begin_step = state.global_step
        self._last_progress_time = now
        self._last_tokens = None
        self._last_tokens_time = now
        self.metrics.m.max_steps.set(state.max_steps)
        self.metrics.m.global_step.set(state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.metrics.m.global_step.set(state.global_step)
        self.metrics.m.max_steps.set(state.max_steps)
        if state.epoch is not None:
            self.metrics.m.epoch.set(state.epoch)
        self.metrics.m.samples.inc(self._samples_per_step)
        if self.progress_interval_seconds is not None:
            now = self._clock()
            if now - self._last_progress_time >= self.progress_interval_seconds:
                self._last_progress_time = now
                self.log_progress(state, now)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        # transformers appends {**logs, "step": ...} to log_history just before on_log. A wall
        # time on it lets the run report plot tokens/s; it survives resumes in trainer_state.json.
        if state.log_history and "time" not in state.log_history[-1]:
            state.log_history[-1]["time"] = time.time()
        for split, key in (("train", "loss"), ("eval", "eval_loss")):
            loss = _number(logs.get(key))
            if loss is not None:
                self.metrics.m.loss.labels(split=split).set(loss)
                self._last_loss[split] = loss
        gauges = {
            "learning_rate": self.metrics.m.learning_rate,
            "grad_norm": self.metrics.m.grad_norm,
            "epoch": self.metrics.m.epoch,
        }
        for key, gauge in gauges.items():
            value = _number(logs.get(key))
            if value is not None:
                gauge.set(value)
        tokens = _number(logs.get("num_tokens"))
        if tokens is not None:
            self._count_tokens(tokens)
        self.metrics.m.global_step.set(state.global_step)
        self.metrics.sample_gpu()

    def _count_tokens(self, cumulative: float) -> None:
        now = self._clock()
        previous = self._last_tokens
        # A smaller total means a new trainer (its counter starts at 0 again).
        delta = cumulative if previous is None or cumulative < previous else cumulative - previous
        if delta > 0:
            self.metrics.m.tokens.inc(delta)
        elapsed = now - self._last_tokens_time
        if previous is not None and elapsed > 0:
            self._tokens_per_second = delta / elapsed
            self.metrics.m.tokens_per_second.set(self._tokens_per_second)
        self._last_tokens = cumulative
        self._last_tokens_time = now

    def log_progress(self, state: TrainerState, now: float | None = None) -> None:
        """One line, no carriage returns: step/total, percent, tokens/s, ETA and last losses."""
        now = self._clock() if now is None else now
        step, total = state.global_step, state.max_steps
        done = step - self._begin_step
        elapsed = now - self._begin_time
        eta = (total - step) * elapsed / done if done > 0 and total >= step else None
        log.info(
            "progress",
            step=step,
            total_steps=total,
            percent=round(100.0 * step / total, 1) if total else None,
            tokens_per_second=round(self._tokens_per_second, 1),
            eta=format_duration(eta),
            eta_seconds=None if eta is None else round(eta),
            **{f"{split}_loss": round(loss, 4) for split, loss in self._last_loss.items()},
        )


def format_duration(seconds: float | None) -> str | None:
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return None
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def attach(
    trainer: Any,
    metrics: JobMetrics,
    *,
    progress_interval_seconds: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
    stream: TextIO | None = None,
) -> MetricsCallback:
    """Add the metrics callback to a built trainer and pick the progress display.

    On a terminal transformers' tqdm bar stays. Off one (a pod's log), the bar and the
    dict-printing PrinterCallback are removed and the callback logs a progress line every
    `progress_interval_seconds` instead.
    """
    stream = sys.stderr if stream is None else stream
    on_terminal = bool(getattr(stream, "isatty", lambda: False)())
    callback = MetricsCallback(
        metrics, progress_interval_seconds=None if on_terminal else progress_interval_seconds
    )
    if not on_terminal:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    trainer.add_callback(callback)
    return callback
