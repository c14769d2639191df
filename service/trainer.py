"""The training loop: trl's SFTTrainer configured from the manifest, plus the callback
that turns checkpoint schedules and preemption requests into safe stopping points."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from transformers import (
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from service.checkpoint.resume import ResumePlan, fit_micro_batch
from service.errors import DataError
from service.manifest.spec import JobSpec

log = structlog.get_logger(__name__)


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
    report_to: list[str] | None = None,
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
        report_to=report_to or "none",  # experiment trackers: service.tracking
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
    trainer.offload_activations = t.offload_activations
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
    from service.memory import CPU_BATCH_SIZE, auto_batch_size, estimate_memory, memory_limit_bytes

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
        offload_activations=spec.training.offload_activations,
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
    trainer.train_dataset = pack_rows(trainer.train_dataset, max_length)
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = pack_rows(trainer.eval_dataset, max_length)


def pack_rows(dataset: Any, max_length: int) -> Any:
    from trl.data_utils import pack_dataset

    # The prompt/completion text columns are spent once tokenized, and cannot be packed.
    keep = [c for c in ("input_ids", "labels") if c in dataset.column_names]
    return pack_dataset(dataset.select_columns(keep), max_length, strategy="bfd")


def _packed_sft_trainer() -> type:
    from trl import SFTTrainer

    from service.fast.offload import activations_on_host

    class PackedSFTTrainer(SFTTrainer):
        """trl counts a micro-batch without an attention mask as one padding-free row
        (position_ids.size(1) tokens); packed rows come several to a micro-batch, so the
        collator passes the true count and it replaces trl's in the token total. With
        training.offload_activations, each step's saved activations wait in host memory."""

        offload_activations = False

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            with activations_on_host(self.offload_activations):
                return super().training_step(*args, **kwargs)

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


def release_model(trainer: Any) -> None:
    """Drop every reference the trainer keeps to the trained model, so that it is freed
    before a merge loads the base again: Trainer itself (model, the wrapped model, the
    optimizer and scheduler, whose state holds the adapter's parameters), its callback
    handler, and accelerate's lists of prepared objects. Its state (steps, log history)
    stays for the run record."""
    import gc

    trainer.accelerator.free_memory()
    for owner in (trainer, trainer.callback_handler):
        for name in ("model", "model_wrapped", "optimizer", "lr_scheduler"):
            if hasattr(owner, name):
                setattr(owner, name, None)
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@contextmanager
def other_adapter(model: Any, adapter: Path, name: str = "published") -> Iterator[None]:
    """Another adapter beside the trained one, active inside the block and removed after."""
    model.load_adapter(str(adapter), adapter_name=name)
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")
        model.delete_adapter(name)


def evaluate_adapter(trainer: Any, adapter: Path) -> float:
    """Another adapter's eval loss on the trainer's eval data, on the same base."""
    with other_adapter(trainer.model, adapter):
        return float(trainer.evaluate(metric_key_prefix="published")["published_loss"])


def restored_if_finished(trainer: Any, folder: Path) -> bool:
    """When the checkpoint holds the last step (a stop came after training), its weights and
    state, without training: Trainer's resume from the last step runs one more step (its
    loop skips the trained batches, then steps before it looks at max_steps)."""
    state = TrainerState.load_from_json(str(folder / TRAINER_STATE_FILE))
    if not 0 < state.max_steps <= state.global_step:
        return False
    trainer._load_from_checkpoint(str(folder))
    trainer.state = state
    log.info("training_already_finished", step=state.global_step)
    return True


def train_or_restore(trainer: Any, resume_dir: Path | None) -> None:
    """Train from the start or on from ``resume_dir``; a checkpoint of the last step is
    only restored."""
    if resume_dir is None or not restored_if_finished(trainer, resume_dir):
        trainer.train(resume_from_checkpoint=resume_dir and str(resume_dir))


TRAINER_STATE_FILE = "trainer_state.json"
