"""The training loop: trl's SFTTrainer configured from the manifest, plus the callback
that turns checkpoint schedules and preemption requests into safe stopping points."""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import structlog
from transformers import (
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from service.checkpoint import BackgroundCommitter
from service.distributed import Ranks, any_rank, barrier, gather_to_main, ranks_from_env
from service.errors import DataError
from service.manifest.spec import JobSpec
from service.preemption import PreemptionWatcher
from service.resume import ResumePlan, fit_micro_batch

log = structlog.get_logger(__name__)

RNG_STATE_FILE = "rng_state.pth"
TRAINING_ARGS_FILE = "training_args.bin"
# Finish the optimizer step in progress only if that is expected to take at most this
# share of the grace budget; otherwise checkpoint the previous step's state at once.
FINISH_STEP_BUDGET_SHARE = 1 / 3


def build_trainer(
    spec: JobSpec,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    *,
    dtype: str,
    on_cpu: bool,
    work_dir: Path,
    callbacks: list[TrainerCallback],
    show_progress_bar: bool,
    plan: ResumePlan | None = None,
) -> Any:
    """``plan`` carries the micro-batch and accumulation a resumed run must keep."""
    import datasets
    from trl import SFTConfig

    from service.model import upcast_trainable_to_fp32

    t = spec.training
    upcast_trainable_to_fp32(model)
    plan = plan or ResumePlan(None, t.gradient_accumulation)
    batch_size, accumulation = choose_batch(spec, model, on_cpu=on_cpu, plan=plan)
    # Packing is done here, not by trl: trl's packing turns on its padding-free mode, which
    # concatenates a whole micro-batch into one row. Without FlashAttention (a T4 has none)
    # attention then runs over the full concatenation with a block-diagonal mask, quadratic
    # in batch_size * max_length. Packed rows of max_length keep the mask per row.
    args = SFTConfig(
        output_dir=str(work_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="no",  # checkpoints are driven by SafePointCallback
        report_to="none",
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=on_cpu,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        max_length=spec.data.max_length,
        packing=False,
        completion_only_loss=spec.data.loss_on_completion_only,
        dataloader_num_workers=0,
        disable_tqdm=not show_progress_bar,
        dataset_num_proc=None,
    )
    if not on_cpu and args.n_gpu > 1:
        # One process with several GPUs visible: Trainer would wrap the model in
        # DataParallel, which trl refuses. Train on this process's GPU and say how to use all.
        log.warning(
            "several_gpus_one_process",
            visible=args.n_gpu,
            hint="spotlora launch --nproc-per-node N -- run ... trains on all of them",
        )
        args._n_gpu = 1
    trainer = _packed_sft_trainer()(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=callbacks,
        data_collator=PackedRowsCollator(tokenizer.pad_token_id) if spec.data.packing else None,
    )
    # Its print() of every log dict bypasses structured logging; LogCallback replaces it.
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogCallback())
    upcast_trainable_to_fp32(trainer.model)
    check_rows_survived(trainer, len(train_rows), spec)
    if spec.data.packing:
        pack_datasets(trainer, spec.data.max_length)
    return trainer


def choose_batch(spec: JobSpec, model: Any, *, on_cpu: bool, plan: ResumePlan) -> tuple[int, int]:
    """Micro-batch and accumulation: the resumed checkpoint's when there is one (split
    further, order kept, when its micro-batch does not fit this GPU), else the manifest's."""
    if plan.micro_batch is None:
        return resolve_batch_size(spec, model, on_cpu=on_cpu), plan.gradient_accumulation
    if spec.training.batch_size != "auto" or on_cpu:
        return plan.micro_batch, plan.gradient_accumulation
    fits = resolve_batch_size(spec, model, on_cpu=on_cpu)
    micro, accumulation = fit_micro_batch(plan.micro_batch, plan.gradient_accumulation, fits)
    if micro != plan.micro_batch:
        log.warning(
            "resume_batch_split_to_fit",
            recorded_micro_batch=plan.micro_batch,
            fits=fits,
            micro_batch=micro,
            gradient_accumulation=accumulation,
        )
    return micro, accumulation


def resolve_batch_size(spec: JobSpec, model: Any, *, on_cpu: bool) -> int:
    """training.batch_size, with 'auto' sized from a memory estimate made before any step."""
    from service.model import CPU_BATCH_SIZE, auto_batch_size, estimate_memory, memory_limit_bytes

    requested = spec.training.batch_size
    if requested != "auto":
        return requested
    if on_cpu:
        return CPU_BATCH_SIZE
    import torch

    estimate = estimate_memory(
        model,
        max_length=spec.data.max_length,
        gradient_checkpointing=spec.training.gradient_checkpointing,
        weight_bytes=torch.cuda.memory_allocated(),
    )
    limit = memory_limit_bytes()
    chosen = auto_batch_size(estimate, limit)
    log.info(
        "batch_size_auto",
        batch_size=chosen,
        estimated_peak_bytes=estimate.total_bytes(chosen),
        memory_limit_bytes=limit,
    )
    return chosen


def pack_datasets(trainer: Any, max_length: int) -> None:
    """Best-fit-decreasing packing of the tokenized rows into sequences of max_length."""
    from trl.data_utils import pack_dataset

    def pack(dataset: Any) -> Any:
        # The prompt/completion text columns are spent once tokenized, and cannot be packed.
        keep = [c for c in ("input_ids", "labels") if c in dataset.column_names]
        return pack_dataset(dataset.select_columns(keep), max_length, strategy="bfd")

    trainer.train_dataset = pack(trainer.train_dataset)
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = pack(trainer.eval_dataset)


def _packed_sft_trainer() -> type:
    from trl import SFTTrainer

    class PackedSFTTrainer(SFTTrainer):
        """trl counts a micro-batch without an attention mask as one padding-free row
        (position_ids.size(1) tokens); packed rows come several to a micro-batch, so the
        collator passes the true count and it replaces trl's in the token total."""

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any
        ) -> Any:
            real = inputs.pop(REAL_TOKENS_KEY, None)
            before = self._total_train_tokens
            out = super().compute_loss(model, inputs, *args, **kwargs)
            if real is not None and model.training:
                total = self.accelerator.gather_for_metrics(real.reshape(1)).sum().item()
                self._total_train_tokens = before + total
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return out

    return PackedSFTTrainer


REAL_TOKENS_KEY = "spotlora_real_tokens"


class PackedRowsCollator:
    """Batches packed rows without an attention mask, positions restarting at each packed
    row: transformers then derives a block-diagonal causal mask from the positions
    (masking_utils.find_packed_sequence_indices), so no row sees another."""

    def __init__(self, pad_token_id: int) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id, return_position_ids=True
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        del batch["attention_mask"]  # with a mask present, positions are not read for packing
        # A row's first token must not be predicted from the previous row's last one;
        # padding sits at position 0 too, already unlabelled.
        batch["labels"][batch["position_ids"] == 0] = -100
        import torch

        batch[REAL_TOKENS_KEY] = torch.tensor(sum(len(e["input_ids"]) for e in examples))
        return batch


def check_rows_survived(trainer: Any, rows_given: int, spec: JobSpec) -> None:
    """trl drops rows whose response is cut off entirely by max_length (nothing to learn
    from); count them, and refuse a run that would train on nothing."""
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise DataError(
            f"{spec.data.train}: no row has any response token within data.max_length="
            f"{spec.data.max_length}; raise max_length or shorten the prompts"
        )
    if kept < rows_given:
        log.warning(
            "data_rows_dropped",
            dropped=rows_given - kept,
            kept=kept,
            reason=f"response starts beyond data.max_length={spec.data.max_length}",
        )


class LogCallback(TrainerCallback):
    """The trainer's log dicts (loss, learning rate, grad norm, tokens) as log events."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs:
            event = "eval_log" if any(k.startswith("eval_") for k in logs) else "train_log"
            log.info(event, step=state.global_step, **logs)


@dataclass
class StopState:
    preempted: bool = False
    mid_step: bool = False  # stopped between micro-batches: save the previous step's state


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
        self.every_steps = spec.checkpoint.every_steps
        self.every_seconds = spec.checkpoint.every_seconds
        self.committer = committer
        self.watcher = watcher
        self.work_dir = work_dir
        self.listener = listener
        self.order_state: dict[str, Any] | None = None  # committed with every checkpoint
        self.stop = StopState()
        self.step_rng: dict[str, Any] | None = None
        self.step_ended_unix: dict[int, float] = {}
        self._last_save_time = time.monotonic()
        self.last_saved_step = -1
        self._save_requested_at: float | None = None
        self._micro_seconds = 0.0
        self._micro_started = time.monotonic()
        self._micro_in_step = 0
        self._staging = itertools.count()

    def mark_resumed(self, step: int) -> None:
        self.last_saved_step = step
        self.step_ended_unix[step] = time.time()

    # -- timing of micro-batches, for the finish-or-stop decision ---------------

    def _tick(self) -> None:
        now = time.monotonic()
        elapsed = now - self._micro_started
        self._micro_seconds = (
            elapsed if self._micro_seconds == 0 else (0.8 * self._micro_seconds + 0.2 * elapsed)
        )
        self._micro_started = now

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Work lost by a stop is counted from the last committed step: the start, until one.
        self.step_ended_unix[state.global_step] = time.time()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._micro_in_step = 0
        self._micro_started = time.monotonic()

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._tick()
        self._micro_in_step += 1
        remaining = args.gradient_accumulation_steps - self._micro_in_step
        expected = remaining * self._micro_seconds
        requested = self.watcher.requested.is_set()
        too_long = requested and expected > self.watcher.seconds_left() * FINISH_STEP_BUDGET_SHARE
        requested, too_long = any_rank(requested, too_long)
        if requested and too_long:
            log.warning(
                "preemption_stop_mid_step",
                step=state.global_step,
                micro_batches_done=self._micro_in_step,
                expected_finish_seconds=round(expected, 2),
            )
            self.stop = StopState(preempted=True, mid_step=True)
            control.should_training_stop = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._tick()
        self.step_rng = capture_rng_state()
        step = state.global_step
        self.step_ended_unix[step] = time.time()
        if self.listener is not None:
            self.listener.step_ended(step)
        time_due = bool(
            self.every_seconds and time.monotonic() - self._last_save_time >= self.every_seconds
        )
        requested, time_due = any_rank(self.watcher.requested.is_set(), time_due)
        if requested:
            self.stop = StopState(preempted=True)
            control.should_training_stop = True
            if step != self.last_saved_step:
                control.should_save = True
        elif step != self.last_saved_step and (
            (self.every_steps and step % self.every_steps == 0) or time_due
        ):
            control.should_save = True
        if control.should_save:
            self._save_started()

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
        if not self.ranks.is_main:
            self.last_saved_step = step
            self._last_save_time = time.monotonic()
            return
        staged = self.work_dir / f"staged-{step:08d}-{next(self._staging)}"
        os.replace(folder, staged)
        blocking = time.monotonic() - (self._save_requested_at or time.monotonic())
        self._save_requested_at = None
        self._last_save_time = time.monotonic()
        self.last_saved_step = step
        log.info("checkpoint_saved", step=step, blocking_seconds=round(blocking, 3))
        if self.listener is not None:
            self.listener.checkpoint_saved(step, blocking)
        self.committer.submit(staged, step, self.order_state)

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
