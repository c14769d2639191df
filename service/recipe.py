"""One run of a FineTuneJob: setup -> train -> save, with every outcome mapped to an exit code.

This is the only module that wires the others together; read it top to bottom to know
what the service does. Each step is one call into the module that owns it.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from service import export, fast, fetch, ledger, record, tracking
from service.attempts import Attempt, AttemptLog, process_started_unix
from service.checkpoint.committer import BackgroundCommitter
from service.checkpoint.resume import ResumePlan, Resumer, RunOrder, rows_sha256
from service.checkpoint.store import CheckpointStore
from service.distributed import barrier, init_process_group, ranks_from_env
from service.errors import ExitCode, Superseded
from service.estimate.run import at_start
from service.history import RunHistory
from service.manifest import LoadedManifest
from service.metrics.registry import JobMetrics, Phase
from service.observer import RunObserver
from service.preemption import PreemptionWatcher
from service.publication import Publisher
from service.retraining import Decision, RetrainingPolicy
from service.settings import RuntimeSettings
from service.storage import open_storage, uri_join

log = structlog.get_logger(__name__)


@dataclass
class Collaborators:
    """What a run works with, each owning one concern; built by ``create_run``."""

    checkpoints: CheckpointStore  # this run's commit protocol
    resumer: Resumer  # where to resume from, and what must not change
    committer: BackgroundCommitter  # uploads off the training thread
    safepoint: Any  # checkpoint.safepoint.SafePointCallback: when to save or stop
    watcher: PreemptionWatcher  # signals, spot notices, the deadline
    attempt: AttemptLog  # this attempt's record
    observer: RunObserver  # phase, metrics, the attempt's events
    publisher: Publisher  # the finished run's outputs
    retraining: RetrainingPolicy | None  # output.per_run: skip, warm start, gate


class FineTuneRun:
    def __init__(
        self, loaded: LoadedManifest, settings: RuntimeSettings, run_id: str, parts: Collaborators
    ) -> None:
        self.spec, self.settings, self.run_id = loaded.job.spec, settings, run_id
        self.ranks = ranks_from_env()
        self.facts = record.RunFacts(loaded, run_id, self.ranks.world_size)
        self.records = record.RunRecord(self.facts, parts.committer, parts.attempt)
        self.work_dir = settings.cache_dir / "runs" / run_id
        self.checkpoints, self.resumer = parts.checkpoints, parts.resumer
        self.committer, self.safepoint = parts.committer, parts.safepoint
        self.watcher, self.attempt = parts.watcher, parts.attempt
        self.observer, self.publisher = parts.observer, parts.publisher
        self.retraining = parts.retraining
        self.trainer: Any = None
        self.eval_rows: list[dict[str, Any]] = []
        self.prompt_rows: list[dict[str, Any]] = []  # the merge's verification prompts
        self.model_dir = Path()
        self.plan = ResumePlan(None, self.spec.training.gradient_accumulation)
        self.start_step = 0  # the step this attempt resumed at
        self.resume_dir: Path | None = None
        self.stop: Callable[[], None] = lambda: None  # after training: ends it on a stop
        self.skipped: str | None = None
        self.decision: Decision | None = None

    def run(self) -> ExitCode:
        self.observer.start(self.spec, self.ranks.local_rank, self.facts.loaded.sha256, self.run_id)
        ending = self.observer.ending(self._step, lambda: self.watcher.reason, lambda: self.trainer)
        with ending, self.watcher:
            self.observer.phase(Phase.LOADING)
            if self.publisher.finished(repair=self.ranks.is_main) is None:
                self.setup()
                if self.skipped:
                    self.record_skip()
                else:
                    self.train()
                    self.save()
            # No rank leaves before rank 0 has published: a finished index of an
            # Indexed Job is never rerun, so an early exit could strand a retry.
            barrier()
        return ExitCode.OK

    def setup(self) -> None:
        from service import data, model

        init_process_group(self.ranks)
        # 1. Device and dtype: a bf16 request on a T4 fails here, before any weight loads.
        device, dtype = model.select_device(self.spec)
        tracking.check_tracking(self.spec)  # a tracker's library missing: exit 2, now
        self.facts.device, self.facts.compute_dtype = vars(device), dtype
        self.attempt.attempt.device = device.name
        # 2. Data before the model: bad data fails in seconds, not after a 7B load.
        dataset = data.load_dataset(self.spec.data, self.settings.cache_dir)
        self.facts.data = {"fingerprint": dataset.fingerprint, **dataset.report}
        self.facts.train_rows = rows_sha256(dataset.train)
        self.observer.metrics.rows_skipped(dataset.report["rows_skipped"])
        self.facts.mark("data")
        if self.retraining is not None:
            self.skipped = self.retraining.unchanged_since_last_success(dataset.fingerprint)
            if self.skipped:
                return
        # 3. What a resumed run must keep (micro-batch, accumulation, processes, rows,
        #    settings), from the checkpoint it would resume: refused now if it changed.
        self.plan = self.resumer.plan(self.facts.train_rows)
        token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
        if self.spec.export.merged:  # host memory and disk for the merge, before the hours
            config = fetch.fetch_config(self.spec.model, token)
            held = export.held_by_this_process()  # the data and libraries, kept to the end
            export.preflight(self.spec, config, self.settings.cache_dir, held_bytes=held)
        self.watcher.raise_if_requested()
        self.observer.opening()  # the attempt's record: a reclaim from here on leaves a trace
        # 4. The 4-bit base and the adapters, in a clean working directory.
        if self.ranks.is_local_main:  # the ranks of one node share its cache
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir.mkdir(parents=True)
        barrier()
        peft_model, tokenizer, self.model_dir = model.prepare(
            self.spec, self.settings.cache_dir, dtype, device, token
        )
        self.facts.kernels = self.observer.kernels(fast.report(peft_model))
        if self.retraining is not None and self.spec.promotion.warm_start:
            self.retraining.warm_start(peft_model)
        log.info(
            "model_loaded", path=str(self.model_dir), seconds_since_start=self.facts.mark("model")
        )
        # 5. The trainer: building it tokenizes the rows, and rows that cannot train fail
        #    it (exit 65). Still nothing written anywhere.
        self._build_trainer(peft_model, tokenizer, dataset, on_cpu=device.kind == "cpu")
        # 6. Claim the run, the first write: an older pod still running is fenced off from
        #    the checkpoint pointer from here on. Then fetch what to resume from.
        self.watcher.raise_if_requested()
        if self.ranks.is_main:
            found = self.checkpoints.claim(self.spec.checkpoint.keep)
            log.info("run_claimed", run_id=self.run_id, checkpoint_step=found and found.step)
            # The attempt's price for the ledger, which also paces checkpoint.every_seconds: auto.
            instance, price = ledger.attempt_price(self.spec, self.settings)
            earlier = self.observer.priced(instance, price, self.ranks.world_size)
            past = self.retraining.history.interruptions() if self.retraining else (0.0, 0)
            self.safepoint.schedule.pace(ledger.interruptions(earlier), past)
            self.attempt.start()
            where = (device.name, self.model_dir, instance, price, self.ranks.world_size)
            self.facts.estimate = at_start(self.spec, self.trainer, *where)
        barrier()
        self._resume()
        self.facts.mark("setup")

    def train(self) -> None:
        from service import evaluation
        from service.checkpoint.endgame import AfterTraining, end_early
        from service.trainer import train_or_restore

        self.watcher.raise_if_requested()
        self.observer.training()
        try:
            train_or_restore(self.trainer, self.resume_dir)
        finally:  # evaluation, generation and the export run the libraries' own code
            fast.uninstall(self.trainer.model)
            self.facts.mark("train")
        if self.safepoint.stop.preempted:
            end_early(self.safepoint, self.observer, self.trainer, self.start_step)
        # The last step committed; from here a stop ends the attempt where it is (endgame).
        self.observer.phase(Phase.CHECKPOINTING)
        after = AfterTraining.begin(self.safepoint, self.observer, self.trainer, self.start_step)
        stop = self.stop = after.check
        # Eval loss, generation samples and task metrics; with per-run outputs, the gate.
        eval_loss, found = evaluation.evaluate_trained(
            self.trainer, self.eval_rows, self.spec.evaluation, stop
        )
        self.facts.evaluation = found
        self.observer.evaluated(found)
        if self.retraining is not None:
            value, measure = evaluation.gate(
                self.trainer, self.eval_rows, self.spec, eval_loss, found, stop
            )
            self.decision = self.retraining.decide(value, measure)
            self.observer.promotion(self.decision.promoted, self.decision.reason)

    def save(self) -> None:
        self.observer.phase(Phase.EXPORTING)
        if not self.ranks.is_main:
            return  # rank 0 writes for the run
        staging = self.work_dir / "adapter"
        self.trainer.model.save_pretrained(staging)
        self.trainer.processing_class.save_pretrained(staging)
        if not self.checkpoints.still_owner():
            raise Superseded("another process took over this run; not publishing its outputs")
        self.facts.mark("save")
        self.stop()
        self.observer.publishing(self.trainer)  # tracker runs closed, files beside the adapter
        self.publisher.upload_adapter(staging)
        failed = None
        if self.spec.export.merged:
            from service.trainer import release_model

            release_model(self.trainer)  # the merge loads the base again: free this copy first
            self.facts.export, failed = self.publisher.export_merged(
                self.spec, self.model_dir, staging, self.prompt_rows, self.work_dir, self.stop
            )
        self.stop()  # the last chance: once run.json is written, the run is done
        written = self.publisher.publish(
            decision=self.decision,
            compared_tag=self.retraining.published_tag if self.retraining else None,
            eval_loss=record.losses(self.trainer.state.log_history)["final_eval"],
            record=self.records.succeeded,
        )
        self.attempt.save()
        self.observer.recorded(written["cost"])
        if failed is not None:
            raise failed

    def record_skip(self) -> None:
        if self.ranks.is_main:
            self.publisher.record_skip({**self.records.build("skipped"), "reason": self.skipped})
            self.observer.metrics.skipped()

    # ------------------------------------------------------------------ the steps' parts

    def _build_trainer(
        self, peft_model: Any, tokenizer: Any, dataset: Any, *, on_cpu: bool
    ) -> None:
        from service.metrics.callback import attach
        from service.trainer import build_trainer

        report_to = self.observer.trackers(self.facts.loaded.job, self.run_id, self.work_dir)
        self.trainer = build_trainer(
            self.spec,
            peft_model,
            tokenizer,
            dataset.train,
            dataset.eval,
            report_to=report_to,
            dtype=self.facts.compute_dtype,
            on_cpu=on_cpu,
            work_dir=self.work_dir / "trainer",
            callbacks=[self.safepoint],
            show_progress_bar=sys.stderr.isatty(),
            plan=self.plan,
        )
        order = RunOrder.of(
            self.trainer.args, self.ranks.world_size, self.facts.train_rows, self.spec
        )
        self.safepoint.order_state = self.facts.data_order = order.state_dict()
        self.eval_rows, self.prompt_rows = dataset.eval, dataset.eval or dataset.train
        self.facts.trainer = self.trainer
        attach(self.trainer, self.observer.metrics)

    def _resume(self) -> None:
        from service.checkpoint.safepoint import checkpoint_problem

        local = self.work_dir / "resume"
        committed = self.resumer.fetch(local, checkpoint_problem, self.facts.train_rows, self.plan)
        if committed is not None:
            self.resume_dir, self.start_step = local, committed.step
            self.facts.resumed_from_step = committed.step
            self.safepoint.mark_resumed(committed.step)
            self.observer.resumed(committed.step)
            log.info("resuming", step=committed.step, manifest=committed.manifest_key)

    def _step(self) -> int:
        return int(self.trainer.state.global_step) if self.trainer else self.start_step


def create_run(loaded: LoadedManifest, settings: RuntimeSettings, run_id: str) -> FineTuneRun:
    """Build a run's collaborators from its manifest and the process settings."""
    from service.checkpoint.safepoint import SafePointCallback

    spec, ranks = loaded.job.spec, ranks_from_env()
    work_dir = settings.cache_dir / "runs" / run_id
    output = open_storage(spec.output.uri)
    history = RunHistory(output) if spec.output.per_run else None
    ckpt_root = open_storage(spec.checkpoint.uri or uri_join(output.uri, "checkpoints"))
    checkpoints = CheckpointStore(ckpt_root.child(run_id), writer=settings.pod_name)
    seed = spec.checkpoint.resume_from
    attempt = AttemptLog(
        ckpt_root.child(run_id),
        Attempt(
            checkpoints.writer,
            settings.pod_name,
            settings.node_name,
            None,
            process_started_unix(),
            0,
        ),
    )
    auth = settings.pushgateway_auth
    metrics = JobMetrics(
        loaded.job.metadata.name,
        # One pod, one push: rank 0 speaks for the run.
        pushgateway_url=spec.metrics.pushgateway_url if ranks.is_main else None,
        pushgateway_username=auth[0] if auth else None,
        pushgateway_password=auth[1] if auth else None,
    )
    outputs = history.run_storage(run_id) if history else output
    observer = RunObserver(metrics, attempt, is_main=ranks.is_main, output=outputs)
    committer = BackgroundCommitter(checkpoints, spec.checkpoint.keep)
    committer.on_commit.append(observer.committed)
    committer.on_failure.append(observer.commit_failed)
    watcher = PreemptionWatcher(spec.preemption, spec.checkpoint.grace_period_seconds)
    watcher.listeners.append(lambda reason: metrics.preempted())
    parts = Collaborators(
        checkpoints=checkpoints,
        resumer=Resumer(
            checkpoints, CheckpointStore(open_storage(seed)) if seed else None, spec, ranks
        ),
        committer=committer,
        safepoint=SafePointCallback(
            spec, committer, watcher, work_dir / "trainer", listener=observer, ranks=ranks
        ),
        watcher=watcher,
        attempt=attempt,
        observer=observer,
        publisher=Publisher(
            outputs,
            history,
            run_id,
            keep_runs=spec.promotion.keep_runs,
            checkpoint_root=ckpt_root,
            work_dir=work_dir,
        ),
        retraining=RetrainingPolicy(history, spec, work_dir) if history else None,
    )
    return FineTuneRun(loaded, settings, run_id, parts)


def execute(loaded: LoadedManifest, settings: RuntimeSettings) -> ExitCode:
    from service.logging import route_library_logging

    fmt = settings.log_format
    route_library_logging(progress_bars=fmt == "console" or (fmt == "auto" and sys.stderr.isatty()))
    ranks = ranks_from_env()
    run_id = settings.run_id or loaded.job.metadata.name
    structlog.contextvars.bind_contextvars(
        job=loaded.job.metadata.name,
        run_id=run_id,
        pod=settings.pod_name,
        **({"rank": ranks.rank} if ranks.distributed else {}),
    )
    return create_run(loaded, settings, run_id).run()
