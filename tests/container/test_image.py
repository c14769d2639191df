"""The image as the pod runs it: the quickstart to completion, a SIGTERM to exit 75
with a committed checkpoint, and the image's own contract (user, entrypoint, labels)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.container.conftest import (
    REPO,
    UID,
    Container,
    docker,
    writable_by_pod_user,
)
from tests.jobs import parse_events as json_events

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]

QUICKSTART_JOB = REPO / "k8s" / "overlays" / "cpu-quickstart" / "job.yaml"
GRACE_SECONDS = 45  # the pod's terminationGracePeriodSeconds in k8s/base

# The job from the quickstart docs, small enough for two CPU cores.
ENV_JOB = {
    "apiVersion": "spotlora/v1",
    "kind": "FineTuneJob",
    "metadata": {"name": "quickstart"},
    "spec": {
        "model": {"source": "/var/cache/spotlora/quickstart/model"},
        "data": {
            "train": "/var/cache/spotlora/quickstart/train.jsonl",
            "format": "alpaca",
            "max_length": 96,
        },
        "training": {
            "max_steps": 6,
            "batch_size": 2,
            "gradient_accumulation": 2,
            "learning_rate": 1.0e-3,
            "logging_steps": 1,
            "gradient_checkpointing": False,
        },
        "checkpoint": {"every_steps": 3, "grace_period_seconds": 15},
        "metrics": {"port": 9090},
        "output": {"uri": "/out"},
    },
}


def assert_finished(out: Path, steps: int) -> dict[str, object]:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "adapter" / name).is_file(), f"adapter/{name} missing in {out}"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "succeeded"
    assert record["steps"] == steps
    return record


def test_quickstart_from_mounted_manifest(container: Container, tmp_path: Path) -> None:
    """The cpu-quickstart overlay's job file, mounted where the ConfigMap goes."""
    out = writable_by_pod_user(tmp_path / "out")
    done = container.run(
        [
            "run",
            "--manifest", "/etc/spotlora/job.yaml",
            "--set", "output.uri=/out",
            "--set", "training.max_steps=6",
        ],
        out=out,
        env={"SPOTLORA_RUN_ID": "quickstart-file", "SPOTLORA_POD_NAME": "pod-a"},
        mounts=[f"{QUICKSTART_JOB}:/etc/spotlora/job.yaml:ro"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert_finished(out, steps=6)
    events = json_events(done.stderr)
    assert any(e.get("event") == "train_log" for e in events), "no JSON train_log lines"


def test_quickstart_from_env_manifest(container: Container, tmp_path: Path) -> None:
    """SPOTLORA_MANIFEST carries the whole job: no file, no --manifest."""
    out = writable_by_pod_user(tmp_path / "out")
    done = container.run(
        ["run"],
        out=out,
        env={"SPOTLORA_MANIFEST": yaml.safe_dump(ENV_JOB), "SPOTLORA_RUN_ID": "quickstart-env"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_finished(out, steps=6)
    # every_steps: 3 -> periodic checkpoints were committed on the way.
    assert (out / "checkpoints" / "quickstart-env" / "LATEST").is_file()


def test_sigterm_commits_a_checkpoint_and_exits_75(container: Container, tmp_path: Path) -> None:
    """`docker stop` is what the kubelet does on a spot reclaim: SIGTERM to PID 1, then
    SIGKILL after the grace period. The trainer must checkpoint and exit 75 before it."""
    out = writable_by_pod_user(tmp_path / "out")
    job = json.loads(json.dumps(ENV_JOB))
    job["metadata"]["name"] = "preempt"
    job["spec"]["training"]["max_steps"] = 5000  # far more than it will reach
    job["spec"]["checkpoint"]["every_steps"] = 100000  # only the stop commits one
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    manifest.chmod(0o644)
    name = container.start(
        ["run", "--manifest", "/etc/spotlora/job.yaml"],
        out=out,
        env={"SPOTLORA_RUN_ID": "preempt"},
        mounts=[f"{manifest}:/etc/spotlora/job.yaml:ro"],
    )
    deadline = time.monotonic() + 300
    logs = ""
    while time.monotonic() < deadline:
        logs = docker("logs", name).stderr
        if any(e.get("event") == "train_log" for e in json_events(logs)):
            break
        state = docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", f"container {state} before training:\n{logs[-4000:]}"
        time.sleep(1)
    else:
        pytest.fail(f"no train_log within 300 s:\n{logs[-4000:]}")

    # The trainer is PID 1 and alone: no init, no worker processes to reap.
    top = docker("top", name, "-eo", "pid,ppid,args").stdout.strip().splitlines()
    assert len(top) == 2, f"expected one process in the container:\n{chr(10).join(top)}"
    host_pid = docker("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    assert top[1].split()[0] == host_pid, top
    assert "spotlora" in top[1]

    started = time.monotonic()
    docker("stop", "--time", str(GRACE_SECONDS), name, timeout=GRACE_SECONDS + 30)
    stop_seconds = time.monotonic() - started
    state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
    logs = docker("logs", name).stderr
    assert state["ExitCode"] == 75, f"exit {state['ExitCode']}:\n{logs[-4000:]}"
    assert not state["OOMKilled"]
    assert stop_seconds < GRACE_SECONDS, "stopped by SIGKILL, not by the trainer"
    latest = out / "checkpoints" / "preempt" / "LATEST"
    assert latest.is_file(), f"no committed checkpoint:\n{logs[-4000:]}"
    assert not (out / "run.json").exists(), "a preempted run must not publish run.json"
    requested = [e for e in json_events(logs) if e.get("event") == "preemption_requested"]
    assert [e.get("reason") for e in requested] == ["SIGTERM"], logs[-4000:]


def test_runs_as_10001_with_help_and_labels(image: str) -> None:
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["spotlora"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == "/tmp"
    assert env["SPOTLORA_CACHE_DIR"] == "/var/cache/spotlora"
    assert env["HF_HOME"].startswith("/var/cache/spotlora/")
    labels = config["Labels"]
    for key in ("title", "version", "revision", "source", "licenses", "created"):
        assert labels.get(f"org.opencontainers.image.{key}"), key

    pod = ["--rm", "--read-only", "--network", "none", "--tmpfs", "/tmp"]
    ids = docker("run", *pod, "--entrypoint", "id", image).stdout.split()
    assert ids[:2] == [f"uid={UID}(spotlora)", f"gid={UID}(spotlora)"], ids

    helped = docker("run", *pod, image, "--help")
    assert "usage: spotlora" in helped.stdout
    # `python entrypoint.py` works as well, with `python` on PATH.
    also = docker("run", *pod, "--entrypoint", "python", image, "entrypoint.py", "--help")
    assert "usage: spotlora" in also.stdout


def test_only_cache_and_tmp_are_written(image: str) -> None:
    """Nothing in the image is writable by the trainer's user but its cache and the
    base's sticky temp dirs: the pod's read-only root would turn any other write into a
    crash, so the image must not count on one."""
    found = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "find", image,
        "/", "-xdev", "-writable", "-not", "-type", "l",
        "-not", "-path", "/proc/*", "-not", "-path", "/sys/*", "-not", "-path", "/dev/*",
        check=False,  # find exits 1 for the directories 10001 may not read
    )  # fmt: skip
    writable = set(found.stdout.split()) - {"/tmp", "/var/tmp", "/run/lock"}
    assert writable == {"/var/cache/spotlora"}, sorted(writable)
