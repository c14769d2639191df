"""Scheduled retraining, night by night, against S3 over HTTP."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from examples.samples import make_synthetic_rows, write_jsonl
from service.history import PUBLISHED_KEY
from service.storage import open_storage
from tests.jobs import at_step, job_env, manifest, run_job, write_manifest


def nightly(tiny_model: Path, train_uri: str, eval_uri: str, out: str, **extra: Any) -> dict:
    doc = manifest(
        "nightly",
        str(tiny_model),
        train_uri,
        out,
        data={"eval": eval_uri},
        training={"max_steps": 6, "learning_rate": 1e-2},
        checkpoint={"every_steps": 2},
        **extra,
    )
    doc["spec"]["output"]["per_run"] = True
    doc["spec"]["promotion"] = {"keep_runs": 3, **doc["spec"].get("promotion", {})}
    return doc


def night(job: Path, tmp_path: Path, run_id: str, **kw: Any):  # type: ignore[no-untyped-def]
    env = job_env(tmp_path / "cache", SPOTLORA_RUN_ID=run_id)
    return run_job(["run", "-f", str(job)], env, **kw)


def test_nights_train_skip_gate_and_resume(bucket: str, tiny_model: Path, tmp_path: Path) -> None:
    store = open_storage(f"s3://{bucket}/")
    rows = make_synthetic_rows(120, seed=5)
    eval_rows, v1, v2 = rows[:16], rows[16:64], rows[64:]
    write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    store.upload_file(tmp_path / "eval.jsonl", "eval/eval.jsonl")
    write_jsonl(tmp_path / "day1.jsonl", v1)
    store.upload_file(tmp_path / "day1.jsonl", "incoming/day1.jsonl")
    out = f"s3://{bucket}/jobs/nightly/"
    job = write_manifest(
        tmp_path / "job.yaml",
        nightly(
            tiny_model,
            f"s3://{bucket}/incoming/*.jsonl",
            f"s3://{bucket}/eval/eval.jsonl",
            out,
            promotion={"warm_start": True},
        ),
    )
    outputs = open_storage(out)

    def published() -> str:
        return json.loads(outputs.read_bytes(PUBLISHED_KEY))["run_id"]

    # Night 1: the first run trains and publishes.
    n1 = night(job, tmp_path, "night-1")
    assert n1.code == 0, n1.stderr[-3000:]
    assert published() == "night-1"
    assert "runs/night-1/adapter/adapter_model.safetensors" in {
        o.key for o in outputs.list_objects()
    }

    # Night 2: nothing changed: exit 0 at once, without loading the model.
    n2 = night(job, tmp_path, "night-2")
    assert n2.code == 0, n2.stderr[-3000:]
    assert n2.named("run_skipped") and not n2.named("train_log")
    assert not any("Loading weights" in line for line in n2.stderr.splitlines())
    assert published() == "night-1"

    # Night 3: new data arrives; a preemption interrupts it, its own Job resumes it.
    write_jsonl(tmp_path / "day2.jsonl", v2)
    store.upload_file(tmp_path / "day2.jsonl", "incoming/day2.jsonl")
    n3a = night(job, tmp_path, "night-3", interrupt=at_step(2))
    assert n3a.code == 75, n3a.stderr[-3000:]
    assert published() == "night-1"  # a preempted run publishes nothing
    n3 = night(job, tmp_path, "night-3")
    assert n3.code == 0, n3.stderr[-3000:]
    assert n3.named("resuming")[0]["step"] >= 2
    decision = n3.named("promotion_decided")[0]
    assert decision["promoted"], decision
    assert published() == "night-3"
    # The other nights' state was not touched by night 3's resume.
    assert json.loads(outputs.read_bytes("runs/night-1/run.json"))["status"] == "succeeded"

    # Night 4: corrupted labels make a worse model: kept, but not promoted.
    bad = [
        dict(r, output=" ".join(random.Random(i).sample("abcdefghij", 8)))
        for i, r in enumerate(v1 + v2)
    ]
    write_jsonl(tmp_path / "day3.jsonl", bad)
    store.upload_file(tmp_path / "day3.jsonl", "incoming/day3.jsonl")
    n4 = night(job, tmp_path, "night-4")
    assert n4.code == 0, n4.stderr[-3000:]
    decision = n4.named("promotion_decided")[0]
    assert not decision["promoted"] and "not promoted" in decision["reason"]
    assert published() == "night-3"
    record4 = json.loads(outputs.read_bytes("runs/night-4/run.json"))
    assert record4["promotion"]["promoted"] is False

    # The index tells the story; the CLI reads it.
    index = [json.loads(outputs.read_bytes(o.key)) for o in outputs.list_objects("index/")]
    assert [(e["run_id"], e["status"], e["promoted"]) for e in index] == [
        ("night-1", "succeeded", True),
        ("night-2", "skipped", False),
        ("night-3", "succeeded", True),
        ("night-4", "succeeded", False),
    ]
    listing = run_job(["runs", "list", out], job_env(tmp_path / "cache"))
    assert listing.code == 0
    shown = run_job(["runs", "show", out, "night-4"], job_env(tmp_path / "cache"))
    assert shown.code == 0


def test_warm_start_and_retention(bucket: str, tiny_model: Path, tmp_path: Path) -> None:
    store = open_storage(f"s3://{bucket}/")
    rows = make_synthetic_rows(100, seed=9)
    write_jsonl(tmp_path / "eval.jsonl", rows[:10])
    store.upload_file(tmp_path / "eval.jsonl", "eval/eval.jsonl")
    out = f"s3://{bucket}/jobs/warm/"
    doc = nightly(
        tiny_model,
        f"s3://{bucket}/in/*.jsonl",
        f"s3://{bucket}/eval/eval.jsonl",
        out,
        promotion={"warm_start": True, "max_eval_loss_increase": 10.0},
    )
    doc["spec"]["promotion"]["keep_runs"] = 1
    job = write_manifest(tmp_path / "job.yaml", doc)
    for night_no in range(3):
        write_jsonl(tmp_path / f"d{night_no}.jsonl", rows[10 + 30 * night_no : 40 + 30 * night_no])
        store.upload_file(tmp_path / f"d{night_no}.jsonl", f"in/d{night_no}.jsonl")
        done = night(job, tmp_path, f"w-{night_no}")
        assert done.code == 0, done.stderr[-3000:]
        assert bool(done.named("warm_started")) == (night_no > 0)
    runs = {o.key.split("/")[1] for o in open_storage(out).list_objects("runs/")}
    assert runs == {"w-2"}  # keep_runs=1: older runs' outputs are gone, published kept
    ckpts = {o.key.split("/")[0] for o in open_storage(out + "checkpoints/").list_objects()}
    assert "w-0" not in ckpts
