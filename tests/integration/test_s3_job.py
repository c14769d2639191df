"""A whole job against S3 over HTTP: manifest, model, data, checkpoints and outputs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from service.storage import open_storage
from tests.jobs import job_env, manifest, run_job


def upload_dir(local: Path, uri: str) -> None:
    store = open_storage(uri)
    for path in local.iterdir():
        store.upload_file(path, path.name)


def test_everything_from_and_to_s3(
    bucket: str, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    base = f"s3://{bucket}"
    upload_dir(tiny_model, f"{base}/models/tiny/")
    open_storage(f"{base}/").upload_file(tiny_data, "data/train.jsonl")
    doc = manifest(
        "s3-job",
        f"{base}/models/tiny/",
        f"{base}/data/train.jsonl",
        f"{base}/jobs/s3-job/",
        checkpoint={"every_steps": 3},
    )
    open_storage(f"{base}/").write_bytes("manifests/job.yaml", yaml.safe_dump(doc).encode())
    hf_token = "hf_" + "q" * 34  # shaped like a real Hub token
    env = job_env(
        tmp_path / "cache",
        SPOTLORA_MANIFEST_URI=f"{base}/manifests/job.yaml",
        SPOTLORA_RUN_ID="job-uid-1234",
        HF_TOKEN=hf_token,
    )
    done = run_job(["run"], env)
    assert done.code == 0, done.stderr[-3000:]

    out = open_storage(f"{base}/jobs/s3-job/")
    keys = {o.key for o in out.list_objects()}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "run.json"} <= keys
    record = json.loads(out.read_bytes("run.json"))
    # Secrets given through the environment appear in neither the logs nor the record.
    secrets = [hf_token, env["AWS_SECRET_ACCESS_KEY"]]
    for secret in secrets:
        assert secret not in done.stderr
        assert secret not in out.read_bytes("run.json").decode()
    assert record["run_id"] == "job-uid-1234"
    assert record["manifest_origin"] == f"{base}/manifests/job.yaml"
    assert record["data"]["files"][0]["uri"] == f"{base}/data/train.jsonl"
    # Checkpoints live under the run's own prefix, committed with a pointer.
    assert "checkpoints/job-uid-1234/LATEST" in keys
    assert [e["step"] for e in done.named("checkpoint_committed")] == [3, 6]
    assert done.named("model_download")

    # A new Job (new run id) on the same node reuses the cached model files.
    env["SPOTLORA_RUN_ID"] = "job-uid-5678"
    again = run_job(["run"], env)
    assert again.code == 0, again.stderr[-3000:]
    assert again.named("model_cache_hit") and not again.named("model_download")
    assert not again.named("resuming")  # a new identity starts fresh
