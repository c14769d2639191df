"""Every metric a job exposes, defined once: name, help, unit, buckets. Names follow the
Prometheus naming guide (a `spotlora_` prefix, base units, `_total` on counters) and carry no
per-run labels (service.metrics.registry says why)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info

from service.metrics.phase import Phase

# Saving a QLoRA adapter blocks for well under a second on a T4; uploads take seconds to minutes.
SAVE_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
UPLOAD_BUCKETS_SECONDS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Instruments:
    """Every metric a job exposes, defined once: name, help, unit, buckets."""

    def __init__(self, r: CollectorRegistry, success_registry: CollectorRegistry) -> None:
        self.phase = Enum(
            "spotlora_job_phase",
            "Current phase of the job; exactly one state is 1.",
            states=[p.value for p in Phase],
            registry=r,
        )
        self.job_start_time = Gauge(
            "spotlora_job_start_time_seconds",
            "Unix time this process started the job.",
            registry=r,
        )
        self.build_info = Info(
            "spotlora_build",
            "Versions of spotlora and the training libraries in this image.",
            registry=r,
        )
        self.job_info = Info(
            "spotlora_job",
            "What this job trains: base model and manifest hash.",
            registry=r,
        )

        self.global_step = Gauge(
            "spotlora_global_step", "Optimizer steps completed, counting resumed ones.", registry=r
        )
        self.max_steps = Gauge(
            "spotlora_max_steps", "Optimizer steps the run will take in total.", registry=r
        )
        self.epoch = Gauge("spotlora_epoch", "Fractional epoch reached.", registry=r)
        # A label, not two gauges: a labelled series appears only once a value is logged, so
        # there is no fake loss of 0 before the first logging step or evaluation.
        self.loss = Gauge(
            "spotlora_loss",
            "Last logged loss, by split (train: mean over the logging window).",
            ["split"],
            registry=r,
        )
        self.learning_rate = Gauge(
            "spotlora_learning_rate", "Last logged learning rate.", registry=r
        )
        self.grad_norm = Gauge(
            "spotlora_grad_norm", "Last logged gradient norm, before clipping.", registry=r
        )
        self.tokens = Counter(
            "spotlora_train_tokens",
            "Training tokens processed by this process (non-padding, as counted by trl).",
            registry=r,
        )
        self.samples = Counter(
            "spotlora_train_samples",
            "Training sequences processed by this process (packed sequences count once).",
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "spotlora_train_tokens_per_second",
            "Training throughput between the last two logging steps.",
            registry=r,
        )

        self.gpu_memory_allocated = Gauge(
            "spotlora_gpu_memory_allocated_bytes",
            "GPU memory held by tensors (torch.cuda.memory_allocated).",
            registry=r,
        )
        self.gpu_memory_reserved = Gauge(
            "spotlora_gpu_memory_reserved_bytes",
            "GPU memory reserved by torch's caching allocator.",
            registry=r,
        )
        self.gpu_memory_max_allocated = Gauge(
            "spotlora_gpu_memory_max_allocated_bytes",
            "Peak GPU memory held by tensors since the process started.",
            registry=r,
        )
        self.gpu_utilization = Gauge(
            "spotlora_gpu_utilization_ratio",
            "GPU busy fraction over the last sample period, 0..1 (needs pynvml).",
            registry=r,
        )

        self.checkpoint_save = Histogram(
            "spotlora_checkpoint_save_seconds",
            "Time training was blocked while a checkpoint was snapshotted.",
            buckets=SAVE_BUCKETS_SECONDS,
            registry=r,
        )
        self.checkpoint_upload = Histogram(
            "spotlora_checkpoint_upload_seconds",
            "Time to upload and commit a checkpoint, off the training thread.",
            buckets=UPLOAD_BUCKETS_SECONDS,
            registry=r,
        )
        self.checkpoint_upload_bytes = Counter(
            "spotlora_checkpoint_upload_bytes",
            "Bytes of committed checkpoints uploaded.",
            registry=r,
        )
        self.checkpoints_committed = Counter(
            "spotlora_checkpoints_committed", "Checkpoints committed.", registry=r
        )
        self.checkpoint_failures = Counter(
            "spotlora_checkpoint_commit_failures",
            "Checkpoints whose upload or commit failed (the previous commit stands).",
            registry=r,
        )
        self.last_checkpoint_time = Gauge(
            "spotlora_checkpoint_last_committed_timestamp_seconds",
            "Unix time of the last committed checkpoint; 0 until the first one.",
            registry=r,
        )
        self.last_checkpoint_step = Gauge(
            "spotlora_checkpoint_last_committed_step",
            "Global step of the last committed checkpoint.",
            registry=r,
        )
        self.preemptions = Counter(
            "spotlora_preemptions",
            "Preemption notices or stop signals received by this process.",
            registry=r,
        )
        self.resumes = Counter(
            "spotlora_resumes",
            "Runs resumed from a committed checkpoint by this process.",
            registry=r,
        )
        self.runs_skipped = Counter(
            "spotlora_runs_skipped",
            "Scheduled runs that exited early: data and training settings unchanged.",
            registry=r,
        )
        self.rows_skipped_total = Counter(
            "spotlora_data_rows_skipped",
            "Dataset rows dropped as unusable (empty, malformed, too long).",
            registry=r,
        )
        # Money, in dollars (the cost ledger, service.ledger): this attempt's, as counters,
        # and the run's over all its attempts so far, as gauges.
        self.cost = Counter(
            "spotlora_cost_dollars", "What this attempt's GPU time has cost so far.", registry=r
        )
        self.lost_work_seconds = Counter(
            "spotlora_lost_work_seconds",
            "Work this attempt lost when it stopped early (since its last commit).",
            registry=r,
        )
        self.lost_work_cost = Counter(
            "spotlora_lost_work_dollars", "What the work lost by this attempt cost.", registry=r
        )
        self.run_cost = Gauge(
            "spotlora_run_cost_dollars", "The run's cost so far, over all its attempts.", registry=r
        )
        self.run_lost_cost = Gauge(
            "spotlora_run_lost_to_preemption_dollars",
            "What preemptions took from the run so far: lost work and repeated start-ups.",
            registry=r,
        )
        self.run_attempts = Gauge(
            "spotlora_run_attempts",
            "Attempts (pods) the run has had, this one included.",
            registry=r,
        )

        # The speed layer (service.fast): one series per replacement, a handful in all.
        self.fused_kernels = Gauge(
            "spotlora_fused_kernels",
            "Modules each fused kernel replaced (0: none; run.json's kernels says why).",
            ["kernel"],
            registry=r,
        )
        self.fused_kernel_fallbacks = Gauge(
            "spotlora_fused_kernel_fallbacks",
            "Fused kernels that applied but fell back to the code they replace.",
            registry=r,
        )

        self.last_success = Gauge(
            "spotlora_last_success_timestamp_seconds",
            "Unix time the job last finished successfully. Pushed only, and only on success.",
            registry=success_registry,
        )
        self.task_score = Gauge(
            "spotlora_eval_task_score_ratio",
            "Share of eval rows a task metric passes (evaluation.metrics), for the base model "
            "('before') and the trained adapter ('after').",
            ["metric", "model"],
            registry=r,
        )
