"""A whole job on a flaky S3, preempted along the way, ends exactly like a clean run.

Model, data, manifest, checkpoints and outputs all live on S3 (moto), and the job reaches
them through tests/s3faults.py's proxy, which fails about one request in five: 500s, 503
SlowDown, connection resets, slow answers, and writes whose response is lost (so a retried
conditional write meets its own first attempt and gets 412). On top, SIGTERMs at fixed
steps; each restart is a new pod on a new node (fresh cache, new writer). The final adapter
must be bitwise the fault-free run's, with the same per-step losses.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.storage import open_storage
from tests.chaos import chaos_manifest
from tests.jobs import Finished, adapter_tensors, at_step, job_env, run_job, step_losses
from tests.s3faults import FAULTS, FaultProxy

STEPS = 12
PREEMPT_AT_STEPS = (3, 6, 9)
FAULT_PROBABILITY = 0.2
FAULT_SEED = int(os.environ.get("S3_FAULTS_SEED", "2024"))  # another by hand: explore
RUN_ID = "s3-faults-run"


@dataclass(frozen=True)
class Inputs:
    base: str  # s3://bucket

    def manifest_uri(self, name: str) -> str:
        return f"{self.base}/manifests/{name}.yaml"


@pytest.fixture(scope="module")
def s3_inputs(s3_server: str, tiny_model: Path, tiny_data: Path) -> Inputs:
    """The model, the data and two manifests on S3, put there straight (not through faults):
    one writing to ``reference/``, one to ``faulty/``, alike but for that."""
    import boto3

    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    inputs = Inputs(f"s3://{bucket}")
    models = open_storage(f"{inputs.base}/models/tiny/")
    for path in tiny_model.iterdir():
        models.upload_file(path, path.name)
    root = open_storage(f"{inputs.base}/")
    root.upload_file(tiny_data, "data/train.jsonl")
    for name in ("reference", "faulty"):
        doc = chaos_manifest(
            "s3-faults",
            f"{inputs.base}/models/tiny/",
            f"{inputs.base}/data/train.jsonl",
            f"{inputs.base}/{name}/",
            STEPS,
        )
        root.write_bytes(f"manifests/{name}.yaml", yaml.safe_dump(doc).encode())
    return inputs


def published(output_uri: str, tmp: Path) -> dict[str, Any]:
    """run.json and the adapter's tensors, read straight from moto."""
    out = open_storage(output_uri)
    out.download_file("adapter/adapter_model.safetensors", tmp / "adapter_model.safetensors")
    return {
        "record": json.loads(out.read_bytes("run.json")),
        "adapter": adapter_tensors(tmp),
    }


@pytest.fixture(scope="module")
def fault_free_reference(
    s3_inputs: Inputs, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same job, S3 straight, no faults, no preemption."""
    tmp = tmp_path_factory.mktemp("s3-faults-reference")
    env = job_env(
        tmp / "cache",
        SPOTLORA_MANIFEST_URI=s3_inputs.manifest_uri("reference"),
        SPOTLORA_RUN_ID=RUN_ID,
    )
    started = time.monotonic()
    done = run_job(["run"], env)
    assert done.code == 0, done.stderr[-3000:]
    return {**published(f"{s3_inputs.base}/reference/", tmp), "seconds": time.monotonic() - started}


def story(done: Finished, chars: int = 6000) -> str:
    """An attempt's log without the per-step lines and the retry chatter: what to read
    when it went wrong."""
    skip = {"train_log"}
    lines = [
        json.dumps({k: v for k, v in e.items() if k not in ("timestamp", "level")})
        for e in done.events
        if e.get("event") not in skip and e.get("logger") != "botocore"
    ]
    return f"exit {done.code}\n" + "\n".join(lines)[-chars:]


@dataclass
class AttemptSummary:
    code: int
    signalled: bool
    resumed_from: int | None
    last_step: int
    committed: list[int]
    already_applied: int  # conditional writes found applied after a lost response
    seconds: float

    @classmethod
    def of(cls, done: Finished, seconds: float) -> AttemptSummary:
        resumed = done.named("resuming")
        steps = [e["step"] for e in done.named("train_log")]
        return cls(
            code=done.code,
            signalled=bool(done.signals_sent),
            resumed_from=resumed[0]["step"] if resumed else None,
            last_step=max(steps, default=0),
            committed=[e["step"] for e in done.named("checkpoint_committed")],
            already_applied=len(done.named("s3_conditional_write_already_applied")),
            seconds=seconds,
        )


@pytest.fixture
def flaky(s3_faults: FaultProxy) -> Iterator[FaultProxy]:
    s3_faults.configure(p=FAULT_PROBABILITY, seed=FAULT_SEED, kinds=FAULTS, slow_seconds=0.5)
    # Random faults land on a conditional write only now and then; these make sure each
    # kind of conditional write loses its response at least once: the claim of the run,
    # a move of the checkpoint pointer, a checkpoint's manifest, and the run record.
    pointer = r"/faulty/checkpoints/.*/LATEST$"
    for header in ("If-None-Match", "If-Match"):
        s3_faults.add_rule("lost_response", method="PUT", path=pointer, header=header, times=1)
    s3_faults.add_rule("lost_response", method="PUT", path=r"/MANIFEST\.json$", times=1)
    s3_faults.add_rule("lost_response", method="PUT", path=r"/faulty/run\.json$", times=1)
    yield s3_faults


@pytest.mark.slow
def test_job_on_flaky_s3_with_preemptions_ends_like_a_clean_run(
    s3_inputs: Inputs,
    fault_free_reference: dict[str, Any],
    flaky: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    attempts: list[AttemptSummary] = []
    logs: list[Finished] = []
    failures: list[str] = []
    for i in range(len(PREEMPT_AT_STEPS) + 2):
        env = job_env(
            tmp_path / f"cache-{i}",  # a new node each time: everything comes from S3 again
            AWS_ENDPOINT_URL_S3=flaky.endpoint,
            SPOTLORA_MANIFEST_URI=s3_inputs.manifest_uri("faulty"),
            SPOTLORA_RUN_ID=RUN_ID,
            SPOTLORA_POD_NAME=f"pod-{i}",
        )
        interrupt = at_step(PREEMPT_AT_STEPS[i]) if i < len(PREEMPT_AT_STEPS) else None
        started = time.monotonic()
        done = run_job(["run"], env, interrupt=interrupt)
        attempts.append(AttemptSummary.of(done, time.monotonic() - started))
        logs.append(done)
        expected = 75 if done.signals_sent else 0
        if done.code != expected:
            failures.append(f"attempt {i}: exit {done.code}, expected {expected}:\n{story(done)}")
            break
        if done.named("checkpoint_commit_failed"):
            failures.append(f"attempt {i}: a checkpoint commit failed:\n{story(done)}")
        if done.code == 0:
            break

    counts = flaky.counts()
    lost_conditional = sum(e.conditional and e.fault == "lost_response" for e in list(flaky.events))
    already_applied = sum(a.already_applied for a in attempts)
    with capsys.disabled():
        print(f"\n{flaky.summary()}")
        print(
            f"s3 faults job: {sum(a.signalled for a in attempts)} preemptions over "
            f"{len(attempts)} attempts; conditional PUTs whose response was lost: "
            f"{lost_conditional}, writes found already applied on retry: {already_applied}; "
            f"fault-free run {fault_free_reference['seconds']:.0f}s, "
            f"flaky runs {sum(a.seconds for a in attempts):.0f}s"
        )
        for e in flaky.events:
            if e.conditional and (e.fault or e.status == 412):
                print(f"  conditional {e.method} {e.target} fault {e.fault} status {e.status}")
        for n, a in enumerate(attempts):
            print(
                f"  attempt {n}: exit {a.code} resumed from {a.resumed_from} last step "
                f"{a.last_step} committed {a.committed} ({a.seconds:.0f}s)"
            )
    assert not failures, failures[0]
    assert attempts[-1].code == 0
    assert sum(a.signalled for a in attempts) == len(PREEMPT_AT_STEPS)
    # A SIGTERM loses no step, faults or not: each restart resumes where the last stopped.
    for n, (before, after) in enumerate(itertools.pairwise(attempts), start=1):
        assert after.resumed_from == before.last_step, f"attempt {n}: {story(logs[n])}"

    result = published(f"{s3_inputs.base}/faulty/", tmp_path)
    assert step_losses(result["record"]) == step_losses(fault_free_reference["record"])
    reference = fault_free_reference["adapter"]
    assert result["adapter"].keys() == reference.keys()
    import torch

    for name, tensor in reference.items():
        assert torch.equal(result["adapter"][name], tensor), name

    # The faults did happen, every kind of them, and a lost conditional write was retried.
    assert all(counts.faults.get(kind, 0) > 0 for kind in FAULTS), counts.faults
    assert counts.faulted >= 0.1 * counts.requests
    # Each targeted conditional write was retried into a 412 and taken for the success it
    # was (storage logs s3_conditional_write_already_applied), not for a lost race.
    assert lost_conditional >= 4 and counts.statuses.get(412, 0) >= 4
    assert already_applied >= 4
