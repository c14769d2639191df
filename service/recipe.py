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

from service.checkpoint import BackgroundCommitter, CheckpointStore, Fenced
from service.distributed import barrier, broadcast, init_process_group, ranks_from_env
from service.errors import ExitCode, ManifestError, Preempted
from service.manifest import LoadedManifest
from service.preemption import PreemptionWatcher
from service.promotion import Decision, RunHistory, decide, index_entry, training_sha256
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
        self.events: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.history: RunHistory | None = None
        self.output: Storage = open_storage(self.spec.output.uri)
        if self.spec.output.per_run:
            self.history = RunHistory(self.output)
            self.output = self.history.run_storage(self.run_id)
        self.skipped: str | None = None
        self.decision: Decision | None = None
        ckpt_uri = self.spec.checkpoint.uri or uri_join(self.spec.output.uri, "checkpoints")
        self.checkpoint_root = open_storage(ckpt_uri)
        self.checkpoints = CheckpointStore(
            self.checkpoint_root.child(self.run_id), writer=settings.pod_name
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

        self.metrics = JobMetrics(
            self.job.metadata.name,
            # One pod, one push: rank 0 speaks for the run.
            pushgateway_url=self.spec.metrics.pushgateway_url if self.ranks.is_main else None,
        )

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.append({"type": kind, "time": time.time(), **fields})

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
        success = False
        try:
            with self.watcher:
                if not self._already_done():
                    self.metrics.set_phase(Phase.LOADING)
                    self.setup()
                    if self.skipped:
                        self.record_skip()
                    else:
                        self.train()
                        self.metrics.set_phase(Phase.EXPORTING)
                        self.save()
                    # No rank leaves before rank 0 has published: a finished index of an
                    # Indexed Job is never rerun, so an early exit could strand a retry.
                    barrier()
            success = True
            self.metrics.set_phase(Phase.DONE)
            return ExitCode.OK
        except Preempted:
            raise
        except BaseException:
            self.metrics.set_phase(Phase.FAILED)
            raise
        finally:
            self.metrics.finish(success)
            self.metrics.close()

    def _already_done(self) -> bool:
        """A pod restarted after the run finished must not train it again."""
        try:
            record = json.loads(self.output.read_bytes(RUN_RECORD))
        except FileNotFoundError:
            return False
        if record.get("run_id") == self.run_id and record.get("status") in ("succeeded", "skipped"):
            log.info("run_already_complete", output=self.output.uri)
            return True
        return False

    def setup(self) -> None:
        from service import data, model

        init_process_group(self.ranks)
        # 1. Device and dtype: a bf16 request on a T4 fails here, before any weight loads.
        self.device = model.detect_device()
        self.dtype = model.resolve_compute_dtype(self.spec.quantization.compute_dtype, self.device)
        if self.spec.training.torch_compile:
            model.check_compile_supported(self.device)
        log.info("device", kind=self.device.kind, name=self.device.name, dtype=self.dtype)
        # 2. Data before the model: bad data fails in seconds, not after a 7B load.
        dataset = data.load_dataset(self.spec.data, self.cache_dir)
        self.data_report, self.data_fingerprint = dataset.report, dataset.fingerprint
        self.metrics.rows_skipped(dataset.report["rows_skipped"])
        log.info("data_loaded", **{k: v for k, v in dataset.report.items() if k != "files"})
        self.timings.mark("data")
        if self._unchanged_since_last_success():
            return
        # 3. Claim the run before the expensive work, so an older pod still running
        #    is fenced off from the checkpoint pointer from here on. Bad input has
        #    failed by now, leaving nothing behind.
        if self.ranks.is_main:
            found = self.checkpoints.claim()
            log.info(
                "run_claimed", run_id=self.run_id, checkpoint_step=found.step if found else None
            )
        # A clean working directory: nothing an earlier pod left is read again.
        if self.ranks.is_local_main:  # the ranks of one node share its cache
            if self.work_dir.exists():
                shutil.rmtree(self.work_dir)
            self.work_dir.mkdir(parents=True)
        barrier()
        # 4. The 4-bit base and the adapters.
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
        # 5. The trainer, with the checkpoint/preemption callback.
        from service.trainer import SafePointCallback, build_trainer

        self.safepoint = SafePointCallback(
            self.spec,
            self.committer,
            self.watcher,
            self.work_dir / "trainer",
            on_checkpoint_saved=self.metrics.checkpoint_saved,
            ranks=self.ranks,
        )
        self.committer.on_commit.append(self._on_commit)
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
        )
        from service.metrics import attach

        attach(self.trainer, self.metrics)
        self.timings.mark("setup")

    def _on_commit(self, committed: Any, upload_seconds: float, upload_bytes: int) -> None:
        self._event("checkpoint", step=committed.step, upload_seconds=upload_seconds)
        self.metrics.checkpoint_committed(committed.step, upload_seconds, upload_bytes)

    def _resume_point(self) -> Path | None:
        """The committed checkpoint to continue from: an explicit one from the manifest,
        else this run's latest that verifies (falling back to older ones)."""
        local = self.work_dir / "resume"
        explicit = self.spec.checkpoint.resume_from
        store = CheckpointStore(open_storage(explicit)) if explicit else self.checkpoints
        # One download per node; every rank then reads the same files.
        committed = store.fetch_latest(local) if self.ranks.is_local_main else None
        committed = broadcast(committed)  # type: ignore[assignment]
        barrier()
        if committed is None:
            if explicit:
                raise ManifestError(
                    f"spec.checkpoint.resume_from: no committed checkpoint at {explicit}"
                )
            return None
        self.resumed_from = committed.step
        self.safepoint.mark_resumed(committed.step)
        self.metrics.resumed(committed.step)
        self._event("resumed", step=committed.step)
        log.info("resuming", step=committed.step, manifest=committed.manifest_key)
        return local

    def train(self) -> None:
        from service.trainer import save_previous_step

        resume = self._resume_point()
        try:
            self.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        finally:
            self.timings.mark("train")
        stop = self.safepoint.stop
        if stop.preempted:
            if stop.mid_step and self.trainer.state.global_step > self.safepoint.last_saved_step:
                save_previous_step(self.trainer, self.safepoint)
            self._event("preempted", step=self.trainer.state.global_step)
            budget = max(self.watcher.seconds_left(), 0.0)
            if not self.committer.wait(budget):
                raise Preempted(
                    f"preempted ({self.watcher.reason}); the checkpoint did not commit within "
                    "the grace budget, the previous committed one stands"
                )
            raise Preempted(
                f"preempted ({self.watcher.reason}) at step {self.trainer.state.global_step}; "
                "checkpoint committed, run again to resume"
            )
        self.committer.wait()  # a periodic upload still in flight, and its errors
        eval_loss = None
        if self.trainer.eval_dataset is not None:
            eval_loss = self.trainer.evaluate().get("eval_loss")
            log.info("evaluated", eval_loss=eval_loss)
        if self.history is not None:
            self.decision = self._promotion_decision(eval_loss)

    def save(self) -> None:
        """Adapter first, then run.json: a reader that finds run.json finds it all."""
        if not self.ranks.is_main:
            return  # rank 0 writes for the run
        staging = self.work_dir / ADAPTER_DIR
        self.trainer.model.save_pretrained(staging)
        self.trainer.processing_class.save_pretrained(staging)
        # Fenced off? Then a newer pod owns this run's outputs.
        pointer, _ = self.checkpoints.read_pointer()
        if pointer is not None and pointer.owner != self.checkpoints.writer:
            raise Fenced("another process took over this run; not publishing its outputs")
        previous = self.output.head(RUN_RECORD)
        if previous is not None:
            self.output.delete([RUN_RECORD])  # the old record must not vouch for new files
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            self.output.upload_file(path, f"{ADAPTER_DIR}/{path.relative_to(staging).as_posix()}")
        self.timings.mark("save")
        record = self.run_record("succeeded")
        if self.history is not None and self.decision is not None and self.decision.promoted:
            # Before run.json: a pod that dies in between re-runs and publishes again.
            _, tag = self.history.published()
            self.history.publish(
                {
                    "run_id": self.run_id,
                    "adapter": f"runs/{self.run_id}/{ADAPTER_DIR}",
                    "published_unix": time.time(),
                    "eval_loss": record["losses"]["final_eval"],
                },
                tag,
            )
            log.info("published", run_id=self.run_id, reason=self.decision.reason)
        try:
            self.output.write_bytes(
                RUN_RECORD, json.dumps(record, indent=1, default=str).encode(), if_none_match=True
            )
        except PreconditionFailed:
            raise Fenced("another process published this run's outputs first") from None
        self._write_report(record)
        if self.history is not None:
            self.history.append(index_entry(record, self.decision))
            if self.spec.promotion.keep_runs:
                published, _ = self.history.published()
                protect = {self.run_id} | ({published["run_id"]} if published else set())
                self.history.prune(self.spec.promotion.keep_runs, self.checkpoint_root, protect)
        log.info(
            "run_complete",
            output=self.output.uri,
            adapter=uri_join(self.output.uri, ADAPTER_DIR),
            steps=record["steps"],
            final_train_loss=record["losses"]["final_train"],
        )

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
        pointer, _ = self.history.published()
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
        self._event("promotion", promoted=decision.promoted, reason=decision.reason)
        log.info(
            "promotion_decided",
            promoted=decision.promoted,
            reason=decision.reason,
            eval_loss=eval_loss,
            published_eval_loss=published_loss,
        )
        return decision

    # ------------------------------------------------------------------ record

    def run_record(self, status: str) -> dict[str, Any]:
        history = list(self.trainer.state.log_history) if self.trainer else []
        train_losses = [h["loss"] for h in history if "loss" in h]
        eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
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
            "promotion": (
                {"promoted": self.decision.promoted, "reason": self.decision.reason}
                if self.decision
                else None
            ),
            "steps": self.trainer.state.global_step if self.trainer else 0,
            "resumed_from_step": self.resumed_from,
            "losses": {
                "final_train": train_losses[-1] if train_losses else None,
                "final_eval": eval_losses[-1] if eval_losses else None,
                "best_eval": min(eval_losses) if eval_losses else None,
            },
            "timings": {"started_unix": self.timings.started_unix, **self.timings.marks},
            "finished_unix": time.time(),
            "events": self.events,
            "log_history": history,
        }


def execute(loaded: LoadedManifest, settings: RuntimeSettings) -> ExitCode:
    ranks = ranks_from_env()
    structlog.contextvars.bind_contextvars(
        job=loaded.job.metadata.name,
        run_id=settings.run_id or loaded.job.metadata.name,
        pod=settings.pod_name,
        **({"rank": ranks.rank} if ranks.distributed else {}),
    )
    return FineTuneRun(loaded, settings).run()
