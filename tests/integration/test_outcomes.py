"""How a run ends when something around it goes wrong: each outcome its own exit code and
its own record, and nothing a finished run did is lost to a crash or a storage fault."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.checkpoint.store import CheckpointStore
from service.history import INDEX_PREFIX, PUBLISHED_KEY
from service.storage import open_storage
from tests.conftest import REPO
from tests.jobs import job_env, manifest, run_job, write_manifest
from tests.s3faults import FaultProxy


def paused(proc_box: list[subprocess.Popen[str]], change: Any) -> None:
    """Make ``change`` while the job is stopped: it lands between two of the job's lines."""
    proc = proc_box[0]
    proc.send_signal(signal.SIGSTOP)
    try:
        change()
    finally:
        proc.send_signal(signal.SIGCONT)


def test_a_failed_last_periodic_upload_does_not_throw_away_the_finished_run(
    bucket: str, s3_faults: FaultProxy, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """Storage refuses every upload of the last checkpoint (step 6, due at the last step):
    the run still publishes its adapter, and says which checkpoint failed."""
    s3_faults.add_rule("error500", method="PUT", path=r"-step-00000006/")
    out = tmp_path / "out"
    doc = manifest(
        "upload-fails",
        str(tiny_model),
        str(tiny_data),
        str(out),
        checkpoint={"every_steps": 3, "uri": f"s3://{bucket}/ckpt/"},
    )
    env = job_env(tmp_path / "cache", AWS_ENDPOINT_URL_S3=s3_faults.endpoint, AWS_MAX_ATTEMPTS="2")
    done = run_job(["run", "-f", str(write_manifest(tmp_path / "job.yaml", doc))], env)
    assert done.code == 0, done.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [e["step"] for e in done.named("checkpoint_committed")] == [3]
    assert [e["step"] for e in done.named("checkpoint_commit_failed")] == [6]
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 6
    assert record["checkpoints"]["committed_step"] == 3
    assert [f["step"] for f in record["checkpoints"]["failed"]] == [6]
    assert "checkpoint_failed" in [e["type"] for e in record["events"]]


def test_a_pod_that_lost_its_run_to_a_newer_one_exits_77_without_writing(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    doc = manifest(
        "taken-over",
        str(tiny_model),
        str(tiny_data),
        str(out),
        checkpoint={"every_steps": 2},
    )
    store = CheckpointStore(open_storage(str(out / "checkpoints" / "taken-over")), writer="newer")
    box: list[subprocess.Popen[str]] = []

    def take_over(event: dict[str, Any]) -> None:
        if event.get("event") == "checkpoint_committed" and event["step"] == 2:
            paused(box, store.claim)

    done = run_job(
        ["run", "-f", str(write_manifest(tmp_path / "job.yaml", doc))],
        job_env(tmp_path / "cache"),
        interrupt=take_over,
        started=box.append,
    )
    assert done.code == 77, done.stderr[-3000:]
    assert "another process has taken over this run" in done.stderr
    assert not (out / "run.json").exists() and not (out / "adapter").exists()
    pointer, _ = store.read_pointer()
    assert pointer is not None and pointer.owner == "newer" and pointer.step == 2


def test_publication_conflict_exits_78_with_a_record_and_a_restart_repairs_the_index(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """Another run moves PUBLISHED after this run's gate decided: this run is recorded as not
    promoted and exits 78 (the Job fails: a retry cannot undo the race). A restart finds the
    run done, and puts back its index line if a crash had lost it."""
    out = tmp_path / "out"
    doc = manifest("nightly", str(tiny_model), str(tiny_data), str(out))
    doc["spec"]["output"]["per_run"] = True
    path = write_manifest(tmp_path / "job.yaml", doc)
    env = job_env(tmp_path / "cache", SPOTLORA_RUN_ID="night-1")
    outputs = open_storage(str(out))
    other = json.dumps({"run_id": "night-0", "adapter": "runs/night-0/adapter"}).encode()
    box: list[subprocess.Popen[str]] = []

    def publish_first(event: dict[str, Any]) -> None:
        if event.get("event") == "promotion_decided":
            paused(box, lambda: outputs.write_bytes(PUBLISHED_KEY, other))

    done = run_job(["run", "-f", str(path)], env, interrupt=publish_first, started=box.append)
    assert done.code == 78, done.stderr[-3000:]
    assert outputs.read_bytes(PUBLISHED_KEY) == other  # the other run's publication stands
    record = json.loads(outputs.read_bytes("runs/night-1/run.json"))
    assert record["status"] == "succeeded"
    assert record["promotion"]["promoted"] is False
    assert "PUBLISHED moved" in record["promotion"]["reason"]
    index = [o.key for o in outputs.list_objects(f"{INDEX_PREFIX}/")]
    assert len(index) == 1 and index[0].endswith("-night-1.json")

    # A crash between run.json and the index line: the restart repairs it, once.
    outputs.delete(index)
    again = run_job(["run", "-f", str(path)], env)
    assert again.code == 0, again.stderr[-3000:]
    assert again.named("run_already_complete") and not again.named("train_log")
    assert [o.key for o in outputs.list_objects(f"{INDEX_PREFIX}/")] == index
    assert run_job(["run", "-f", str(path)], env).code == 0
    assert [o.key for o in outputs.list_objects(f"{INDEX_PREFIX}/")] == index


FETCH = """
import sys
from pathlib import Path
from service.manifest.spec import ModelSpec
from service.fetch import fetch_model
fetch_model(ModelSpec(source=sys.argv[1]), Path(sys.argv[2]))
"""


def test_processes_sharing_a_cache_download_each_file_once(
    bucket: str, s3_faults: FaultProxy, tiny_model: Path, tmp_path: Path
) -> None:
    """The ranks of one node start together and share its cache: one of them downloads, the
    others wait and find the files there. Slow responses keep both inside the fetch."""
    store = open_storage(f"s3://{bucket}/models/tiny/")
    for path in tiny_model.iterdir():
        store.upload_file(path, path.name)
    s3_faults.configure(p=1.0, kinds=("slow",), slow_seconds=0.4)
    env = job_env(tmp_path, AWS_ENDPOINT_URL_S3=s3_faults.endpoint)
    cache = tmp_path / "shared-cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH, f"s3://{bucket}/models/tiny/", str(cache)],
            env=env,
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    gets = [e.target for e in s3_faults.events if e.method == "GET" and "list-type" not in e.target]
    files = [p.name for p in tiny_model.iterdir()]
    assert sorted(t.rsplit("/", 1)[-1] for t in gets) == sorted(files)
    assert not list(cache.rglob("*.part"))
