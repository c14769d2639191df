"""One run of a FineTuneJob: setup -> train -> save -> finish.

This is the only module that wires the others together; read it top to bottom to
know what the service does.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog

from service.attempts import Attempt, AttemptLog
from service.checkpoint import BackgroundCommitter, CheckpointStore, Committed
from service.distributed import barrier, broadcast, init_process_group, ranks_from_env
from service.errors import (
    DependencyError,
    ExitCode,
    ManifestError,
    Preempted,
    PublicationConflict,
    SpotloraError,
    Superseded,
)
from service.manifest import LoadedManifest
from service.preemption import PreemptionWatcher
from service.promotion import Decision, RunHistory, decide, index_entry, training_sha256
from service.resume import ResumePlan, RunOrder, order_settings, plan_resume, rows_sha256
from service.settings import RuntimeSettings
from service.storage import PreconditionFailed, Storage, download_prefix, open_storage, uri_join

log = structlog.get_logger(__name__)

RUN_RECORD = "run.json"
ADAPTER_DIR = "adapter"
VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "spotlora",
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@dataclass
class Timings:
    started_unix: float = field(default_factory=time.time)
    marks: dict[str, float] = field(default_factory=dict)
    _t0: float = field(default_factory=time.monotonic)

    def mark(self, name: str) -> None:
        self.marks[f"{name}_seconds"] = round(time.monotonic() - self._t0, 3)


class FineTuneRun:
    def __init__(self, loaded: LoadedManifest, settings: RuntimeSettings) -> None:
        self.loaded = loaded
        self.job = loaded.job
        self.spec = loaded.job.spec
        self.settings = settings
        self.run_id = settings.run_id or self.job.metadata.name
        self.ranks = ranks_from_env()
        self.cache_dir = settings.cache_dir
        self.work_dir = self.cache_dir / "runs" / self.run_id
        self.timings = Timings()
        self.start_step = 0  # where this attempt started: the resumed step, or 0
        self.resumed_from: int | None = None
        self.resume_dir: Path | None = None
        self.plan = ResumePlan(None, self.spec.training.gradient_accumulation)
        self.train_rows_sha256 = ""
        self.history: RunHistory | None = None
        self.output: Storage = open_storage(self.spec.output.uri)
        if self.spec.output.per_run:
            self.history = RunHistory(self.output)
            self.output = self.history.run_storage(self.run_id)
        self.skipped: str | None = None
        self.decision: Decision | None = None
        # PUBLISHED as this run first read it: the promotion gate's reference.
        self.published: dict[str, Any] | None = None
        self.published_tag: str | None = None
        ckpt_uri = self.spec.checkpoint.uri or uri_join(self.spec.output.uri, "checkpoints")
        self.checkpoint_root = open_storage(ckpt_uri)
        run_checkpoints = self.checkpoint_root.child(self.run_id)
        self.checkpoints = CheckpointStore(run_checkpoints, writer=settings.pod_name)
        seed = self.spec.checkpoint.resume_from
        self.seed = CheckpointStore(open_storage(seed)) if seed else None
        self.attempt = AttemptLog(
            run_checkpoints,
            Attempt(
                writer=self.checkpoints.writer,
                pod=settings.pod_name,
                node=settings.node_name,
                device=None,
                started_unix=self.timings.started_unix,
                start_step=0,
            ),
        )
        self.watcher = PreemptionWatcher(
            self.spec.preemption, self.spec.checkpoint.grace_period_seconds
        )
        self.trainer: Any = None
        self.safepoint: Any = None
        self.committer = BackgroundCommitter(self.checkpoints, self.spec.checkpoint.keep)
        self.data_report: dict[str, Any] = {}
        self.data_fingerprint = ""
        self.device: Any = None
        self.dtype = ""
        from service.metrics import JobMetrics

        auth = settings.pushgateway_auth
        self.metrics = JobMetrics(
            self.job.metadata.name,
            # One pod, one push: rank 0 speaks for the run.
            pushgateway_url=self.spec.metrics.pushgateway_url if self.ranks.is_main else None,
            pushgateway_username=auth[0] if auth else None,
            pushgateway_password=auth[1] if auth else None,
        )

    # ------------------------------------------------------------------ recipe

    def run(self) -> ExitCode:
        from service.metrics import Phase

        if self.spec.metrics.port is not None:
            try:
                # Local rank k serves on port + k: each GPU's throughput is its own.
                port = self.spec.metrics.port
                self.metrics.serve(port + self.ranks.local_rank if port else port)
            except OSError as err:  # metrics are on the side: never a reason not to train
                log.warning(
                    "metrics_server_unavailable", port=self.spec.metrics.port, error=str(err)
                )
        self.metrics.set_info(
            model=self.spec.model.source, manifest_sha256=self.loaded.sha256, run_id=self.run_id
        )
        self.watcher.listeners.append(lambda reason: self.metrics.preempted())
        outcome: Phase | None = Phase.FAILED
        try:
            with self.watcher:
                self.metrics.set_phase(Phase.LOADING)
                if not self._already_done():
                    self.setup()
                    if self.skipped:
                        self.record_skip()
                    else:
                        self.train()
                        self.save()
                # No rank leaves before rank 0 has published: a finished index of an
                # Indexed Job is never rerun, so an early exit could strand a retry.
                barrier()
            outcome = Phase.DONE
            return ExitCode.OK
        except Preempted:
            outcome = Phase.PREEMPTED
            raise
        except Superseded:
            outcome = None  # the pod that took over speaks for the job now
            self._attempt_ended("superseded")
            raise
        except BaseException as err:
            self._attempt_ended("failed", reason=f"{type(err).__name__}: {err}")
            raise
        finally:
            self.metrics.finish(outcome)
            self.metrics.close()

    def _attempt_ended(self, outcome: str, **fields: Any) -> None:
        if self.ranks.is_main and self.attempt.started and self.attempt.attempt.ended_unix is None:
            self.attempt.finish(outcome, last_step=self._step(), **fields)

    def _step(self) -> int:
        return int(self.trainer.state.global_step) if self.trainer else self.start_step

    def _already_done(self) -> bool:
        """A pod restarted after the run finished must not train it again. It repairs what a
        crash right after run.json may have left undone: the run's line in the index."""
        try:
            record = json.loads(self.output.read_bytes(RUN_RECORD))
        except FileNotFoundError:
            return False
        if record.get("run_id") != self.run_id or record.get("status") not in (
            "succeeded",
            "skipped",
        ):
            return False
        log.info("run_already_complete", output=self.output.uri)
        if self.history is not None and self.ranks.is_main:
            promotion = record.get("promotion")
            decision = Decision(promotion["promoted"], promotion["reason"]) if promotion else None
            self._index(record, decision)
        return True

    def setup(self) -> None:
        from service import data, model

        init_process_group(self.ranks)
        # 1. Device and dtype: a bf16 request on a T4 fails here, before any weight loads.
        self.device = model.detect_device()
        self.attempt.attempt.device = self.device.name
        self.dtype = model.resolve_compute_dtype(self.spec.quantization.compute_dtype, self.device)
        if self.spec.training.torch_compile:
            model.check_compile_supported(self.device)
        log.info("device", kind=self.device.kind, name=self.device.name, dtype=self.dtype)
        # 2. Data before the model: bad data fails in seconds, not after a 7B load.
        dataset = data.load_dataset(self.spec.data, self.cache_dir)
        self.data_report, self.data_fingerprint = dataset.report, dataset.fingerprint
        self.train_rows_sha256 = rows_sha256(dataset.train)
        self.metrics.rows_skipped(dataset.report["rows_skipped"])
        log.info("data_loaded", **{k: v for k, v in dataset.report.items() if k != "files"})
        self.timings.mark("data")
        if self._unchanged_since_last_success():
            return
        # 3. What a resumed run must keep (micro-batch, accumulation, processes, data,
        #    settings), read from the checkpoint it would resume and checked before anything
        #    is loaded or claimed. Read-only: an unreadable pointer stops the run here.
        self.plan = self._plan_resume()
        self._stop_if_requested()
        # 4. The 4-bit base and the adapters. A clean working directory: nothing an earlier
        #    pod left is read again.
        if self.ranks.is_local_main:  # the ranks of one node share its cache
            if self.work_dir.exists():
                shutil.rmtree(self.work_dir)
            self.work_dir.mkdir(parents=True)
        barrier()
        model_dir = model.fetch_model(
            self.spec.model,
            self.cache_dir,
            self.settings.hf_token.get_secret_value() if self.settings.hf_token else None,
        )
        tokenizer = model.load_tokenizer(model_dir, self.spec.model.trust_remote_code)
        if self.spec.data.format == "chat" and not tokenizer.chat_template:
            raise ManifestError(
                "spec.data.format: 'chat' needs a tokenizer with a chat template; "
                f"{self.spec.model.source} has none"
            )
        # Seed before the adapters are created: their initial weights are random.
        from transformers import set_seed

        set_seed(self.spec.training.seed)
        peft_model = model.load_for_training(model_dir, self.spec, self.dtype, self.device)
        if self.spec.promotion.warm_start:
            self._warm_start(peft_model)
        self.timings.mark("model")
        log.info(
            "model_loaded",
            path=str(model_dir),
            seconds_since_start=self.timings.marks["model_seconds"],
        )
        # 5. The trainer, with the checkpoint/preemption callback. Building it tokenizes the
        #    rows, and rows that cannot train fail it (exit 65): still nothing written.
        from service.trainer import SafePointCallback, build_trainer

        self.safepoint = SafePointCallback(
            self.spec,
            self.committer,
            self.watcher,
            self.work_dir / "trainer",
            listener=_SafePointEvents(self),
            ranks=self.ranks,
        )
        self.committer.on_commit.append(self._on_commit)
        self.committer.on_failure.append(self._on_commit_failed)
        self.trainer = build_trainer(
            self.spec,
            peft_model,
            tokenizer,
            dataset.train,
            dataset.eval,
            dtype=self.dtype,
            on_cpu=self.device.kind == "cpu",
            work_dir=self.work_dir / "trainer",
            callbacks=[self.safepoint],
            show_progress_bar=sys.stderr.isatty(),
            plan=self.plan,
        )
        self.safepoint.order_state = self._order().state_dict()
        from service.metrics import attach

        attach(self.trainer, self.metrics)
        # 6. Claim the run, the first write: an older pod still running is fenced off from
        #    the checkpoint pointer from here on. Then fetch what to resume from.
        self._stop_if_requested()
        self._claim()
        self.resume_dir = self._fetch_resume_point()
        self.timings.mark("setup")

    def _order(self) -> RunOrder:
        args = self.trainer.args
        return RunOrder(
            micro_batch=int(args.per_device_train_batch_size),
            gradient_accumulation=int(args.gradient_accumulation_steps),
            world_size=self.ranks.world_size,
            train_rows_sha256=self.train_rows_sha256,
            settings=order_settings(self.spec),
        )

    def _resume_stores(self) -> list[CheckpointStore]:
        """This run's own checkpoints first; the seed (checkpoint.resume_from) only for a run
        that has none of its own yet."""
        return [self.checkpoints, *([self.seed] if self.seed else [])]

    def _plan_resume(self) -> ResumePlan:
        found: tuple[int, dict[str, Any] | None] | None = None
        if self.ranks.is_main:
            for store in self._resume_stores():
                committed = store.newest_verified()
                if committed is not None:
                    found = (committed.step, committed.state)
                    break
            if found is None and self.seed is not None:
                raise ManifestError(
                    "spec.checkpoint.resume_from: no committed checkpoint at "
                    f"{self.spec.checkpoint.resume_from}"
                )
        found = broadcast(found)  # type: ignore[assignment]
        if found is None:
            return self.plan
        step, state = found
        recorded = RunOrder.from_state(state)
        if recorded is None:
            log.warning(
                "resume_order_unrecorded",
                step=step,
                reason="checkpoint written by an older spotlora: its data order is not checked",
            )
        return plan_resume(
            recorded,
            step=step,
            spec=self.spec,
            world_size=self.ranks.world_size,
            train_rows=self.train_rows_sha256,
        )

    def _claim(self) -> None:
        if self.ranks.is_main:
            found = self.checkpoints.claim(self.spec.checkpoint.keep)
            log.info(
                "run_claimed", run_id=self.run_id, checkpoint_step=found.step if found else None
            )
            self.attempt.start()
        barrier()

    def _fetch_resume_point(self) -> Path | None:
        """The committed checkpoint to continue from, downloaded, verified and test-loaded,
        falling back to older ones (and to the seed) when one is not usable."""
        from service.trainer import checkpoint_problem

        local = self.work_dir / "resume"
        committed: Committed | None = None
        if self.ranks.is_local_main:  # one download per node; every rank reads the same files
            for store in self._resume_stores():
                tried = store.committed_keys()
                committed = store.fetch_latest(local, check=checkpoint_problem)
                if committed is not None:
                    break
                if tried:
                    # Starting over would throw away every committed step: stop instead, and
                    # keep them (the log says why each one was refused).
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
        # this one planned): it must continue the same order as the trainer was built for.
        plan = plan_resume(
            RunOrder.from_state(committed.state),
            step=committed.step,
            spec=self.spec,
            world_size=self.ranks.world_size,
            train_rows=self.train_rows_sha256,
        )
        if self.plan.micro_batch is not None and plan != self.plan:
            raise SpotloraError(
                f"the checkpoint at step {committed.step} changed while this pod started "
                "(another pod committed with other settings); run again"
            )
        self.start_step = self.resumed_from = committed.step
        self.attempt.attempt.start_step = committed.step
        self.safepoint.mark_resumed(committed.step)
        self.metrics.resumed(committed.step)
        self.attempt.event("resumed", step=committed.step)
        log.info("resuming", step=committed.step, manifest=committed.manifest_key)
        return local

    def _stop_if_requested(self) -> None:
        """A stop asked for before training starts: nothing to commit, no progress made."""
        if self.watcher.requested.is_set():
            self._attempt_ended("preempted", reason=self.watcher.reason, lost_seconds=0.0)
            raise Preempted(
                f"preempted ({self.watcher.reason}) before training started; no progress "
                "was made, run again to resume",
                progress=False,
            )

    def _on_commit(self, committed: Committed, upload_seconds: float, upload_bytes: int) -> None:
        self.attempt.committed(committed.step)
        self.metrics.checkpoint_committed(committed.step, upload_seconds, upload_bytes)

    def _on_commit_failed(self, step: int, error: str) -> None:
        self.attempt.event("checkpoint_failed", step=step, error=error)
        self.metrics.checkpoint_failed(step, error)

    def train(self) -> None:
        from service.metrics import Phase

        self._stop_if_requested()
        try:
            self.trainer.train(
                resume_from_checkpoint=str(self.resume_dir) if self.resume_dir else None
            )
        finally:
            self.timings.mark("train")
        if self.safepoint.stop.preempted:
            self._end_preempted()
        # A periodic upload still in flight: one that fails is counted in run.json and the
        # metrics, never a reason to throw away the finished adapter.
        self.metrics.set_phase(Phase.CHECKPOINTING)
        self.committer.wait()
        eval_loss = None
        if self.trainer.eval_dataset is not None:
            eval_loss = self.trainer.evaluate().get("eval_loss")
            log.info("evaluated", eval_loss=eval_loss)
        if self.history is not None:
            self.decision = self._promotion_decision(eval_loss)

    def _end_preempted(self) -> None:
        """Stop, save the right step, wait for its commit within the grace budget, record the
        attempt, and exit 75, or 76 when this attempt committed nothing new."""
        from service.metrics import Phase

        self.metrics.set_phase(Phase.CHECKPOINTING)
        if self.safepoint.stop.mid_step:
            self.safepoint.save_stopped_step(self.trainer)
        step = self._step()
        in_time = self.committer.wait(max(self.watcher.seconds_left(), 0.0))
        last = self.committer.last
        committed = last.step if last is not None else self.start_step
        progress = bool(broadcast(committed > self.start_step))
        stopped_at = self.watcher.requested_unix or time.time()
        committed_at = self.safepoint.step_ended_unix.get(committed, stopped_at)
        lost = round(max(stopped_at - committed_at, 0.0), 3)
        self.attempt.event("preempted", step=step, reason=self.watcher.reason, lost_seconds=lost)
        self._attempt_ended("preempted", reason=self.watcher.reason, lost_seconds=lost)
        log.warning(
            "preempted",
            reason=self.watcher.reason,
            step=step,
            committed_step=committed,
            lost_seconds=lost,
            progress=progress,
        )
        where = (
            f"at step {step}; checkpoint committed"
            if in_time and committed == step
            else f"at step {step}; the newest committed checkpoint is step {committed}"
        )
        raise Preempted(
            f"preempted ({self.watcher.reason}) {where}, run again to resume", progress=progress
        )

    def save(self) -> None:
        """Adapter first, then run.json: a reader that finds run.json finds it all."""
        from service.metrics import Phase

        self.metrics.set_phase(Phase.EXPORTING)
        if not self.ranks.is_main:
            return  # rank 0 writes for the run
        staging = self.work_dir / ADAPTER_DIR
        self.trainer.model.save_pretrained(staging)
        self.trainer.processing_class.save_pretrained(staging)
        # Fenced off? Then a newer pod owns this run's outputs.
        if not self.checkpoints.still_owner():
            raise Superseded("another process took over this run; not publishing its outputs")
        previous = self.output.head(RUN_RECORD)
        if previous is not None:
            self.output.delete([RUN_RECORD])  # the old record must not vouch for new files
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            self.output.upload_file(path, f"{ADAPTER_DIR}/{path.relative_to(staging).as_posix()}")
        self.timings.mark("save")
        conflict = self._publish()
        self.attempt.attempt.outcome = "done"
        self.attempt.attempt.ended_unix = time.time()
        self.attempt.attempt.last_step = self._step()
        record = self.run_record("succeeded")
        try:
            self.output.write_bytes(
                RUN_RECORD, json.dumps(record, indent=1, default=str).encode(), if_none_match=True
            )
        except PreconditionFailed:
            raise Superseded("another process published this run's outputs first") from None
        self.attempt.save()
        self._write_report(record)
        self._index(record, self.decision)
        log.info(
            "run_complete",
            output=self.output.uri,
            adapter=uri_join(self.output.uri, ADAPTER_DIR),
            steps=record["steps"],
            final_train_loss=record["losses"]["final_train"],
        )
        if conflict is not None:
            raise conflict

    def _publish(self) -> PublicationConflict | None:
        """Move PUBLISHED to this run when the gate promoted it; before run.json, so a pod
        that dies in between re-runs and publishes again. Losing the race to another run is
        recorded in the decision and returned, to be raised once run.json says so."""
        if self.history is None or self.decision is None or not self.decision.promoted:
            return None
        # The version the gate compared against: moved since, it is another run's to keep.
        tag = self.published_tag
        try:
            self.history.publish(
                {
                    "run_id": self.run_id,
                    "adapter": f"runs/{self.run_id}/{ADAPTER_DIR}",
                    "published_unix": time.time(),
                    "eval_loss": self._losses()["final_eval"],
                },
                tag,
            )
        except PublicationConflict as err:
            self.decision = Decision(False, str(err))
            log.error("publication_conflict", run_id=self.run_id, error=str(err))
            return err
        log.info("published", run_id=self.run_id, reason=self.decision.reason)
        return None

    def _index(self, record: dict[str, Any], decision: Decision | None) -> None:
        """The run's line in the index (idempotent by run id), then retention."""
        if self.history is None:
            return
        self.history.append(index_entry(record, decision))
        if self.spec.promotion.keep_runs:
            published, _ = self.history.published()
            protect = {self.run_id} | ({published["run_id"]} if published else set())
            self.history.prune(self.spec.promotion.keep_runs, self.checkpoint_root, protect)

    def _write_report(self, record: dict[str, Any]) -> None:
        """Plots next to run.json. A convenience: a failure here never fails the run."""
        try:
            from service.report import write_report

            for path in write_report(record, self.work_dir / "report"):
                self.output.upload_file(path, path.name)
        except Exception as err:
            log.warning("report_not_written", error=f"{type(err).__name__}: {err}")

    # ------------------------------------------------------------------ retraining

    def _unchanged_since_last_success(self) -> bool:
        if self.history is None or not self.spec.promotion.skip_if_unchanged:
            return False
        last = self.history.last_success()
        if (
            last is None
            or last["data_fingerprint"] != self.data_fingerprint
            or last["training_sha256"] != training_sha256(self.spec)
        ):
            return False
        self.skipped = f"data and training settings unchanged since run {last['run_id']}"
        return True

    def record_skip(self) -> None:
        assert self.history is not None and self.skipped is not None
        if not self.ranks.is_main:
            return
        record = self.run_record("skipped")
        record["reason"] = self.skipped
        self.output.write_bytes(RUN_RECORD, json.dumps(record, indent=1, default=str).encode())
        self.history.append(index_entry(record, None))
        self.metrics.skipped()
        log.info("run_skipped", reason=self.skipped)

    def _published_adapter(self) -> Path | None:
        """The published adapter, local; fetched once per published run (a warm start and
        the promotion gate both need it, and PUBLISHED may move in between)."""
        assert self.history is not None
        if self.published_tag is None:
            self.published, self.published_tag = self.history.published()
        pointer = self.published
        if pointer is None:
            return None
        local = self.work_dir / "published" / pointer["run_id"]
        if not local.is_dir():
            store = self.history.run_storage(pointer["run_id"]).child(ADAPTER_DIR)
            download_prefix(store, local)
        return local

    def _warm_start(self, peft_model: Any) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = self._published_adapter() if self.history else None
        if adapter is None:
            log.info("warm_start_skipped", reason="nothing published yet")
            return
        config = json.loads((adapter / "adapter_config.json").read_text())
        lora = self.spec.lora
        wanted = lora.target_modules if isinstance(lora.target_modules, list) else None
        if config.get("r") != lora.r or (
            wanted is not None and sorted(config.get("target_modules") or []) != sorted(wanted)
        ):
            log.warning("warm_start_skipped", reason="published adapter has another LoRA shape")
            return
        set_peft_model_state_dict(peft_model, load_file(adapter / "adapter_model.safetensors"))
        log.info("warm_started", adapter=str(adapter))

    def _promotion_decision(self, eval_loss: float | None) -> Decision:
        assert self.history is not None
        adapter = self._published_adapter()
        published_loss = None
        if adapter is not None and self.trainer.eval_dataset is not None:
            # The published adapter, measured on this run's eval data with the same base.
            model = self.trainer.model
            model.load_adapter(str(adapter), adapter_name="published")
            model.set_adapter("published")
            try:
                published_loss = self.trainer.evaluate(metric_key_prefix="published")[
                    "published_loss"
                ]
            finally:
                model.set_adapter("default")
                model.delete_adapter("published")
        decision = decide(
            eval_loss,
            published_loss,
            adapter is not None,
            self.spec.promotion.max_eval_loss_increase,
        )
        self.attempt.event("promotion", promoted=decision.promoted, reason=decision.reason)
        log.info(
            "promotion_decided",
            promoted=decision.promoted,
            reason=decision.reason,
            eval_loss=eval_loss,
            published_eval_loss=published_loss,
        )
        return decision

    # ------------------------------------------------------------------ record

    def _losses(self) -> dict[str, float | None]:
        history = list(self.trainer.state.log_history) if self.trainer else []
        train_losses = [h["loss"] for h in history if "loss" in h]
        eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
        return {
            "final_train": train_losses[-1] if train_losses else None,
            "final_eval": eval_losses[-1] if eval_losses else None,
            "best_eval": min(eval_losses) if eval_losses else None,
        }

    def run_record(self, status: str) -> dict[str, Any]:
        attempts = self.attempt.history() if self.attempt.started else []
        events = sorted(
            (e for a in attempts for e in a.get("events", [])), key=lambda e: e.get("time", 0)
        )
        return {
            "run_id": self.run_id,
            "status": status,
            "name": self.job.metadata.name,
            "manifest": self.job.model_dump(mode="json", by_alias=True),
            "manifest_sha256": self.loaded.sha256,
            "manifest_origin": self.loaded.origin,
            "versions": library_versions(),
            "device": {"kind": self.device.kind, "name": self.device.name} if self.device else {},
            "world_size": self.ranks.world_size,
            "compute_dtype": self.dtype,
            "data": {"fingerprint": self.data_fingerprint, **self.data_report},
            "training_sha256": training_sha256(self.spec),
            "data_order": self._order().state_dict() if self.trainer else None,
            "promotion": (
                {"promoted": self.decision.promoted, "reason": self.decision.reason}
                if self.decision
                else None
            ),
            "steps": self._step(),
            "resumed_from_step": self.resumed_from,
            "losses": self._losses(),
            "checkpoints": {
                "committed_step": self.committer.last.step if self.committer.last else None,
                "failed": self.committer.failures,
            },
            "attempts": attempts,
            "preemptions": [
                {
                    "pod": a.get("pod"),
                    "step": a.get("last_step"),
                    "committed_step": a.get("committed_step"),
                    "reason": a.get("reason"),
                    "lost_seconds": a.get("lost_seconds"),
                    "time": a.get("ended_unix"),
                }
                for a in attempts
                if a.get("outcome") == "preempted"
            ],
            "timings": {"started_unix": self.timings.started_unix, **self.timings.marks},
            "finished_unix": time.time(),
            "events": events,
            "log_history": list(self.trainer.state.log_history) if self.trainer else [],
        }


class _SafePointEvents:
    """What the run does around each step and checkpoint (service.trainer.SafePointListener)."""

    def __init__(self, run: FineTuneRun) -> None:
        self.run = run

    def checkpoint_started(self) -> None:
        from service.metrics import Phase

        self.run.metrics.set_phase(Phase.CHECKPOINTING)

    def checkpoint_saved(self, step: int, blocking_seconds: float) -> None:
        from service.metrics import Phase

        self.run.metrics.checkpoint_saved(step, blocking_seconds)
        if not self.run.safepoint.stop.preempted:
            self.run.metrics.set_phase(Phase.TRAINING)

    def step_ended(self, step: int) -> None:
        if self.run.ranks.is_main:
            self.run.attempt.step(step)


def execute(loaded: LoadedManifest, settings: RuntimeSettings) -> ExitCode:
    ranks = ranks_from_env()
    structlog.contextvars.bind_contextvars(
        job=loaded.job.metadata.name,
        run_id=settings.run_id or loaded.job.metadata.name,
        pod=settings.pod_name,
        **({"rank": ranks.rank} if ranks.distributed else {}),
    )
    return FineTuneRun(loaded, settings).run()
