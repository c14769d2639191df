"""spec.tracking: what configure_tracking sets for transformers' callbacks, what it refuses
(exit 2, naming the field), the MLflow run every attempt resumes, and publishing the files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from service import tracking
from service.errors import DependencyError, ExitCode, ManifestError
from service.logging import REDACTED, Redactor
from service.manifest import FineTuneJob
from service.storage import Storage, open_storage
from service.tracking import (
    check_tracking,
    configure_tracking,
    finish_tracking,
    publish_tensorboard,
    publish_wandb_offline,
    wandb_run_id,
)
from tests.conftest import REPO, free_port
from tests.jobs import manifest

OWNED = (
    "TENSORBOARD_LOGGING_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_ALLOW_FILE_STORE",
    "WANDB_PROJECT",
    "WANDB_NAME",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_DIR",
)


@pytest.fixture(autouse=True)
def restore_environ() -> Iterator[None]:
    """configure_tracking sets process environment variables, as it does in a pod."""
    saved = dict(os.environ)
    for name in (*OWNED, "WANDB_MODE", "DISABLE_MLFLOW_INTEGRATION"):
        os.environ.pop(name, None)
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run()
    os.environ.clear()
    os.environ.update(saved)


def job(**tracking_fields: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        manifest(
            "tracked-job", "/models/tiny", "/data/train.jsonl", "/out", tracking=tracking_fields
        )
    )


def without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make find_spec report these modules as not installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name in modules else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_no_tracking_sets_nothing(tmp_path: Path) -> None:
    assert configure_tracking(job(), "run-1", tmp_path) == []
    assert not {name for name in OWNED if name in os.environ}
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_writes_under_the_work_dir(tmp_path: Path) -> None:
    assert configure_tracking(job(tensorboard=True), "run-1", tmp_path) == ["tensorboard"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard")
    assert (tmp_path / "tensorboard").is_dir()


def test_wandb_settings_come_from_the_job_and_the_mode_stays_the_users(tmp_path: Path) -> None:
    os.environ["WANDB_MODE"] = "offline"
    report_to = configure_tracking(job(wandb_project="proj"), "uid-1", tmp_path)
    assert report_to == ["wandb"]
    assert {k: os.environ[k] for k in OWNED if k.startswith("WANDB_")} == {
        "WANDB_PROJECT": "proj",
        "WANDB_NAME": "uid-1",
        "WANDB_RUN_ID": "uid-1",  # every attempt of the run resumes one W&B run
        "WANDB_RESUME": "allow",
        "WANDB_DIR": str(tmp_path),
    }
    assert os.environ["WANDB_MODE"] == "offline"


def test_a_wandb_run_id_avoids_the_characters_wandb_reserves() -> None:
    assert wandb_run_id("job:a;b,c#d?e'f g") == "job-a-b-c-d-e-f-g"
    assert wandb_run_id("9f1c-uid_x.y") == "9f1c-uid_x.y"


def test_the_manifest_wins_over_the_environment_and_says_so(tmp_path: Path) -> None:
    os.environ["WANDB_PROJECT"] = "from-env"
    with capture_logs() as logs:
        configure_tracking(job(wandb_project="from-job"), "run-1", tmp_path)
    assert os.environ["WANDB_PROJECT"] == "from-job"
    [warning] = [e for e in logs if e["event"] == "tracking_env_overridden"]
    assert warning["variable"] == "WANDB_PROJECT"
    assert (warning["value"], warning["source"]) == ("from-job", "manifest")
    assert "from-env" not in json.dumps(logs)  # the environment's value may be a secret URI


def test_all_three_in_a_fixed_order(tmp_path: Path) -> None:
    spec = job(tensorboard=True, wandb_project="p", mlflow_tracking_uri=str(tmp_path / "ml")).spec
    assert tracking.requested(spec) == ["tensorboard", "mlflow", "wandb"]


def test_mlflow_run_is_named_by_the_run_id_and_resumed_by_the_next_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    the_job = job(mlflow_tracking_uri="mlruns")  # relative: made absolute for the pod
    uri = (tmp_path / "mlruns").as_uri()

    assert configure_tracking(the_job, "uid-7", tmp_path / "work") == ["mlflow"]
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "tracked-job"  # default: metadata.name
    first = mlflow.active_run()
    assert first is not None and first.info.run_name == "uid-7"
    mlflow.log_metric("loss", 2.0, step=1)
    finish_tracking("KILLED")  # preempted
    assert mlflow.active_run() is None

    configure_tracking(the_job, "uid-7", tmp_path / "work")  # the next attempt
    second = mlflow.active_run()
    assert second is not None and second.info.run_id == first.info.run_id
    mlflow.log_metric("loss", 1.0, step=2)
    finish_tracking("FINISHED")

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked-job")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("uid-7", "FINISHED")]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_mlflow_experiment_can_be_named(tmp_path: Path) -> None:
    import mlflow

    configure_tracking(
        job(mlflow_tracking_uri=str(tmp_path / "ml"), mlflow_experiment="sweeps"), "r", tmp_path
    )
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "sweeps"
    run = mlflow.active_run()
    assert run is not None
    assert mlflow.get_experiment(run.info.experiment_id).name == "sweeps"


def test_an_unreachable_mlflow_server_fails_naming_the_field(tmp_path: Path) -> None:
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(DependencyError) as err:
        configure_tracking(job(mlflow_tracking_uri=uri), "r", tmp_path)
    assert err.value.exit_code == ExitCode.DEPENDENCY_UNREACHABLE
    assert str(err.value).startswith(f"spec.tracking.mlflow_tracking_uri: MLflow at {uri}")


@pytest.mark.parametrize(
    ("fields", "missing", "named", "package"),
    [
        ({"tensorboard": True}, ("tensorboardX", "tensorboard"), "tensorboard", "tensorboardX"),
        ({"mlflow_tracking_uri": "/ml"}, ("mlflow",), "mlflow_tracking_uri", "mlflow-skinny"),
        ({"wandb_project": "p"}, ("wandb",), "wandb_project", "wandb"),
    ],
    ids=["tensorboard", "mlflow", "wandb"],
)
def test_a_missing_library_is_exit_2_naming_the_field_and_the_package(
    fields: dict[str, Any],
    missing: tuple[str, ...],
    named: str,
    package: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    without(monkeypatch, *missing)
    with pytest.raises(ManifestError) as err:
        configure_tracking(job(**fields), "r", tmp_path)
    assert err.value.exit_code == ExitCode.INVALID_INPUT == 2
    message = str(err.value)
    assert message.startswith(f"spec.tracking.{named}: ")
    assert f"needs the {package} package" in message
    assert "pip install 'spotlora[tracking]'" in message
    assert not {name for name in OWNED if name in os.environ}


def test_tensorboardx_alone_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "tensorboard")
    assert configure_tracking(job(tensorboard=True), "r", tmp_path) == ["tensorboard"]


def test_s3_is_no_mlflow_tracking_uri() -> None:
    with pytest.raises(
        ManifestError, match=r"^spec\.tracking\.mlflow_tracking_uri 's3://bucket/ml'"
    ):
        check_tracking(job(mlflow_tracking_uri="s3://bucket/ml").spec)


def test_mlflow_switched_off_by_the_environment_is_refused() -> None:
    os.environ["DISABLE_MLFLOW_INTEGRATION"] = "true"
    with pytest.raises(ManifestError, match="DISABLE_MLFLOW_INTEGRATION"):
        check_tracking(job(mlflow_tracking_uri="/ml").spec)


def test_checking_imports_no_tracker() -> None:
    """check_tracking runs before any data or weights load; the entrypoint imports this
    module for SECRET_ENV_VARS on every command."""
    probe = (
        "import sys\n"
        "from service.manifest import FineTuneJob\n"
        "from service.tracking import check_tracking\n"
        "from tests.jobs import manifest\n"
        "tracking = {'tensorboard': True, 'mlflow_tracking_uri': '/m', 'wandb_project': 'p'}\n"
        "doc = manifest('j', '/m', '/d.jsonl', '/o', tracking=tracking)\n"
        "check_tracking(FineTuneJob.model_validate(doc).spec)\n"
        "heavy = ('mlflow', 'wandb', 'tensorboardX', 'tensorboard', 'torch', 'transformers')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_mlflow_logs_through_the_services_chain_not_a_handler_of_its_own(tmp_path: Path) -> None:
    """mlflow's own stderr handler would bypass the JSON format and the secret redaction."""
    tracking_fields = {"mlflow_tracking_uri": str(tmp_path / "ml")}
    probe = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from service.manifest import FineTuneJob\n"
        "from service.tracking import configure_tracking, finish_tracking\n"
        "from tests.jobs import manifest\n"
        f"doc = manifest('j', '/m', '/d.jsonl', '/o', tracking={tracking_fields!r})\n"
        f"configure_tracking(FineTuneJob.model_validate(doc), 'r', Path({str(tmp_path)!r}))\n"
        "finish_tracking('FINISHED')\n"
        "logger = logging.getLogger('mlflow')\n"
        "print(len(logger.handlers), logger.propagate)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_CONFIGURE_LOGGING"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["0", "True"]


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "output"))
    return open_storage(f"s3://{request.getfixturevalue('bucket')}/jobs/run-1/")


def test_tensorboard_files_are_published_under_tensorboard(output: Storage, tmp_path: Path) -> None:
    local = tmp_path / "work" / "tensorboard"
    (local / "sub").mkdir(parents=True)
    (local / "events.out.tfevents.1.host.1.0").write_bytes(b"one")
    (local / "sub" / "events.out.tfevents.2.host.2.0").write_bytes(b"two")
    publish_tensorboard(local, output)
    assert {o.key: o.size for o in output.list_objects()} == {
        "tensorboard/events.out.tfevents.1.host.1.0": 3,
        "tensorboard/sub/events.out.tfevents.2.host.2.0": 3,
    }
    assert output.read_bytes("tensorboard/sub/events.out.tfevents.2.host.2.0") == b"two"


def test_nothing_to_publish_without_tensorboard(tmp_path: Path) -> None:
    output = open_storage(str(tmp_path / "output"))
    publish_tensorboard(tmp_path / "never-made", output)
    assert output.list_objects() == []


def test_wandb_offline_runs_are_published_only_in_offline_mode(tmp_path: Path) -> None:
    local = tmp_path / "wandb"
    run = local / "offline-run-20260101_000000-r1"
    (run / "files").mkdir(parents=True)
    (run / "run-r1.wandb").write_bytes(b"w")
    (run / "files" / "config.yaml").write_bytes(b"c")
    (local / "latest-run").mkdir()
    output = open_storage(str(tmp_path / "output"))
    publish_wandb_offline(local, output)  # online: W&B has them already
    assert output.list_objects() == []
    os.environ["WANDB_MODE"] = "offline"
    publish_wandb_offline(local, output)
    assert {o.key for o in output.list_objects()} == {
        "wandb/offline-run-20260101_000000-r1/run-r1.wandb",
        "wandb/offline-run-20260101_000000-r1/files/config.yaml",
    }


def test_finishing_writes_what_an_evaluation_after_training_logged_to_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorBoardCallback closes its writer when training ends; the evaluation after it opens
    another that nothing closes, and tensorboardX's flush() does not wait for its queue."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerState
    from transformers.integrations import TensorBoardCallback

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", None
    )  # tensorboardX, as in the image
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(tmp_path)
    callback = TensorBoardCallback()
    callback.on_log(None, TrainerState(global_step=6), None, logs={"eval_loss": 1.5})
    trainer = types.SimpleNamespace(callback_handler=types.SimpleNamespace(callbacks=[callback]))
    finish_tracking("FINISHED", trainer)
    assert callback.tb_writer is None
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(6, 1.5)]


def test_finishing_never_raises_over_the_runs_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("tracking server gone")

    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(active_run=broken))
    with capture_logs() as logs:
        finish_tracking("FAILED")
    assert [e["event"] for e in logs] == ["tracking_finish_failed"]
    assert "tracking server gone" in logs[0]["error"]


def test_the_trackers_credentials_are_redacted_by_value_and_by_key() -> None:
    values = {name: f"value-of-{name.lower()}-123" for name in tracking.SECRET_ENV_VARS}
    assert set(values) == {"WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}
    redact = Redactor(secrets=tuple(values.values()))
    event = {
        "event": "x",
        "error": "401 for " + " ".join(values.values()),
        **{name.lower(): "anything" for name in values},
    }
    out = redact(None, "info", event)
    assert all(v not in json.dumps(out) for v in values.values())
    assert all(out[name.lower()] == REDACTED for name in values)
