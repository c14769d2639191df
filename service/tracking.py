"""Experiment trackers (spec.tracking): TensorBoard, MLflow and Weights & Biases, through
transformers' own callbacks, which this module only points at the right places.

The callbacks read their settings from environment variables when the Trainer is built, so
``configure_tracking`` sets those and returns the ``report_to`` list. Credentials are never
ours to handle: MLflow and W&B read them from their own variables (``SECRET_ENV_VARS``), and
the entrypoint adds those values to the log redaction.

Three things transformers' callbacks leave undone are done here:

1. TensorBoard event files are written to the local work directory; ``publish_tensorboard``
   copies them into the run's output, where a pod's emptyDir would otherwise lose them.
2. MLflowCallback ends its run when training ends, and the evaluation the recipe runs next
   then starts an unnamed second run. So the MLflow run is started here, named by the run id,
   and resumed by that name on every attempt; the callback logs into it and leaves it open;
   ``finish_tracking`` ends it with the run's outcome.
3. W&B runs take the run id as their id, resumed across attempts, and an offline run's files
   can be published beside the adapter (``publish_wandb_offline``) for a later `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from service.errors import DependencyError, ManifestError

if TYPE_CHECKING:  # the entrypoint imports this module for SECRET_ENV_VARS: keep it light
    from service.manifest import FineTuneJob
    from service.manifest.spec import JobSpec
    from service.storage import Storage

log = structlog.get_logger(__name__)

# The variables whose values are credentials for the trackers: the entrypoint scrubs them
# from every log line (service.logging.Redactor), whichever library echoes them.
SECRET_ENV_VARS = ("WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
TENSORBOARD_DIR = "tensorboard"  # under the work dir locally, and under the run's output
WANDB_DIR = "wandb"  # what W&B creates under WANDB_DIR
INSTALL_HINT = "pip install 'spotlora[tracking]' (the spotlora image has it)"
# (field, transformers' report_to name, modules transformers accepts, package to install)
INTEGRATIONS = (
    ("tensorboard", "tensorboard", ("tensorboardX", "tensorboard"), "tensorboardX"),
    ("mlflow_tracking_uri", "mlflow", ("mlflow",), "mlflow-skinny"),
    ("wandb_project", "wandb", ("wandb",), "wandb"),
)
# W&B refuses these in a run id (wandb_settings.validate_run_id), and whitespace at its ends.
_WANDB_ID_RESERVED = re.compile(r"[:;,#?/'\s]")

TrackerStatus = Literal["FINISHED", "KILLED", "FAILED"]


def requested(spec: JobSpec) -> list[str]:
    """The report_to names spec.tracking asks for, in a fixed order."""
    return [name for field, name, _, _ in INTEGRATIONS if getattr(spec.tracking, field)]


def check_tracking(spec: JobSpec) -> None:
    """What can be refused without importing a tracker or reaching one: a missing library, a
    tracking URI MLflow cannot track to, an integration the environment switched off. Cheap
    enough to run before any data or weights load."""
    for field, name, modules, package in INTEGRATIONS:
        if getattr(spec.tracking, field) and all(
            importlib.util.find_spec(m) is None for m in modules
        ):
            raise ManifestError(
                f"spec.tracking.{field}: reporting to {name} needs the {package} package, "
                f"which is not installed; {INSTALL_HINT}"
            )
    uri = spec.tracking.mlflow_tracking_uri
    if uri is None:
        return
    if uri.startswith("s3://"):
        raise ManifestError(
            f"spec.tracking.mlflow_tracking_uri {uri!r}: MLflow tracks runs on a server "
            "(http:// or https://) or in a local directory; s3:// can only hold its artifacts, "
            "which the tracking server is configured with"
        )
    if os.environ.get("DISABLE_MLFLOW_INTEGRATION", "").upper() == "TRUE":
        raise ManifestError(
            "spec.tracking.mlflow_tracking_uri is set but DISABLE_MLFLOW_INTEGRATION=TRUE "
            "switches transformers' MLflow reporting off; unset one of them"
        )


def configure_tracking(job: FineTuneJob, run_id: str, work_dir: Path) -> list[str]:
    """Point transformers' callbacks at the trackers the job asks for; returns ``report_to``
    for the trainer (empty when none). Rank 0 only, before the trainer is built and after the
    work directory is made: TensorBoard and W&B write under ``work_dir``."""
    spec = job.spec
    check_tracking(spec)
    report_to = requested(spec)
    facts: dict[str, object] = {}
    if spec.tracking.mlflow_tracking_uri or spec.tracking.wandb_project:
        # Both look up the git commit through GitPython, which without a git executable (the
        # image has none) prints a page of advice to stderr unless told to be quiet.
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if spec.tracking.tensorboard:
        logdir = work_dir / TENSORBOARD_DIR
        logdir.mkdir(parents=True, exist_ok=True)
        _set_env("TENSORBOARD_LOGGING_DIR", str(logdir))
        facts["tensorboard_dir"] = str(logdir)
    if spec.tracking.mlflow_tracking_uri:
        experiment = spec.tracking.mlflow_experiment or job.metadata.name
        facts |= _start_mlflow(spec.tracking.mlflow_tracking_uri, experiment, run_id)
    if spec.tracking.wandb_project:
        facts |= _configure_wandb(spec.tracking.wandb_project, run_id, work_dir)
    if report_to:
        log.info("tracking_configured", report_to=report_to, **facts)
    return report_to


def _set_env(name: str, value: str) -> None:
    """The manifest wins over a variable the environment already set: say so, without the
    environment's value (a tracking URI there may carry a password; the manifest's cannot)."""
    before = os.environ.get(name)
    if before is not None and before != value:
        log.warning("tracking_env_overridden", variable=name, value=value, source="manifest")
    os.environ[name] = value


def mlflow_uri(uri: str) -> str:
    """A local file store as an absolute file:// URI, which is what MLflow records as its
    artifact location: a relative one would depend on the working directory of each reader."""
    if uri.startswith(("http://", "https://")):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def _start_mlflow(uri: str, experiment: str, run_id: str) -> dict[str, object]:
    """Start, or resume by name, the MLflow run that every attempt of this run logs into."""
    # Read when mlflow is first imported: without it, mlflow gives its loggers a stderr
    # handler of their own, past this service's JSON format and its secret redaction.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    import mlflow

    tracking_uri = mlflow_uri(uri)
    if tracking_uri.startswith("file:"):
        # MLflow 3 refuses its file store unless asked; the manifest documents it as supported.
        _set_env("MLFLOW_ALLOW_FILE_STORE", "true")
    _set_env("MLFLOW_TRACKING_URI", tracking_uri)
    _set_env("MLFLOW_EXPERIMENT_NAME", experiment)
    try:
        mlflow.set_tracking_uri(tracking_uri)
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        earlier = _mlflow_run_named(experiment_id, run_id)
        if mlflow.active_run() is not None:
            mlflow.end_run()
        if earlier is None:
            run = mlflow.start_run(run_name=run_id, tags={"spotlora.run_id": run_id})
        else:
            run = mlflow.start_run(run_id=earlier)
    except Exception as err:  # MlflowException, or requests' errors after its retries
        raise DependencyError(
            f"spec.tracking.mlflow_tracking_uri: MLflow at {tracking_uri} could not start "
            f"run {run_id!r} in experiment {experiment!r}: {err}"
        ) from err
    return {
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_experiment": experiment,
        "mlflow_run_id": run.info.run_id,
        "mlflow_run_resumed": earlier is not None,
    }


def _mlflow_run_named(experiment_id: str, name: str) -> str | None:
    """The newest run of the experiment named ``name``: an earlier attempt's."""
    import mlflow

    quote = "'" if "'" not in name else '"'
    if quote in name:
        return None  # a name no filter string can quote: start a new run
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"attributes.run_name = {quote}{name}{quote}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return str(runs[0].info.run_id) if runs else None


def wandb_run_id(run_id: str) -> str:
    """The run id as a W&B run id: the characters W&B reserves become '-'."""
    return _WANDB_ID_RESERVED.sub("-", run_id)


def _configure_wandb(project: str, run_id: str, work_dir: Path) -> dict[str, object]:
    """WandbCallback calls wandb.init(project=WANDB_PROJECT), which reads the rest from the
    environment. Every attempt of a run resumes one W&B run. WANDB_MODE (offline, disabled)
    and WANDB_API_KEY stay the user's."""
    work_dir.mkdir(parents=True, exist_ok=True)
    _set_env("WANDB_PROJECT", project)
    _set_env("WANDB_NAME", run_id)
    _set_env("WANDB_RUN_ID", wandb_run_id(run_id))
    _set_env("WANDB_RESUME", "allow")
    # wandb's default is the working directory, read-only in the pod.
    _set_env("WANDB_DIR", str(work_dir))
    return {"wandb_project": project, "wandb_mode": os.environ.get("WANDB_MODE", "online")}


def finish_tracking(status: TrackerStatus, trainer: Any | None = None) -> None:
    """End this process's trackers with the run's outcome, so that what they hold is written:
    the trainer's TensorBoard writer (an evaluation after training opens a new one that
    nothing closes, and tensorboardX's flush() leaves queued events unwritten), the MLflow
    run and the W&B run (an offline run's file is complete only then). Call it before the
    publish_* functions. A no-op for a tracker never started; a tracker's failure here is
    logged, never raised over the run's outcome."""
    finishing = (
        ("tensorboard", lambda: _close_tensorboard(trainer)),
        ("mlflow", lambda: _end_mlflow(status)),
        ("wandb", lambda: _finish_wandb(status)),
    )
    for tracker, finish in finishing:
        try:
            finish()
        except Exception as err:
            log.warning(
                "tracking_finish_failed",
                tracker=tracker,
                status=status,
                error=f"{type(err).__name__}: {err}",
            )


def _close_tensorboard(trainer: Any | None) -> None:
    for callback in trainer.callback_handler.callbacks if trainer is not None else []:
        if getattr(callback, "tb_writer", None) is not None:  # TensorBoardCallback's
            callback.tb_writer.close()
            callback.tb_writer = None


def _end_mlflow(status: TrackerStatus) -> None:
    mlflow = sys.modules.get("mlflow")  # never imported here for a run that did not use it
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status=status)


def _finish_wandb(status: TrackerStatus) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if status == "FINISHED" else 1)


def publish_tensorboard(local_dir: Path, output: Storage) -> None:
    """Copy the event files under ``tensorboard/`` of the run's output. Each attempt writes
    files of its own name (time, host, pid), so attempts add up there instead of replacing
    each other, and TensorBoard reads them as one run. Nothing to do when none were written."""
    uploaded = _upload_tree(local_dir, output, TENSORBOARD_DIR)
    if uploaded:
        log.info("tensorboard_published", files=uploaded, uri=f"{output.uri}/{TENSORBOARD_DIR}")


def publish_wandb_offline(local_dir: Path, output: Storage) -> None:
    """With WANDB_MODE=offline, copy W&B's offline runs (``local_dir`` is ``<work dir>/wandb``)
    under ``wandb/`` of the run's output, for `wandb sync` where W&B can be reached. Call it
    after ``finish_tracking``: the run file is complete only then."""
    if os.environ.get("WANDB_MODE", "").lower() not in ("offline", "dryrun"):
        return
    runs = sorted(p for p in local_dir.glob("offline-run-*") if p.is_dir())
    uploaded = sum(_upload_tree(run, output, f"{WANDB_DIR}/{run.name}") for run in runs)
    if uploaded:
        log.info(
            "wandb_offline_published",
            runs=[r.name for r in runs],
            files=uploaded,
            uri=f"{output.uri}/{WANDB_DIR}",
            hint=f"download {WANDB_DIR}/ and run: wandb sync {WANDB_DIR}/offline-run-*",
        )


def _upload_tree(local_dir: Path, output: Storage, prefix: str) -> int:
    if not local_dir.is_dir():
        return 0
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    for path in files:
        output.upload_file(path, f"{prefix}/{path.relative_to(local_dir).as_posix()}")
    return len(files)
