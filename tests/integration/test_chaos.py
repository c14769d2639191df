"""The chaos harness in the suite: a short fixed-seed schedule of SIGTERMs and SIGKILLs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from service.storage import open_storage
from tests.chaos import chaos, chaos_manifest
from tests.jobs import adapter_tensors, job_env, run_job, write_manifest

STEPS = 12


@pytest.mark.slow
def test_job_survives_random_kills_and_ends_like_an_uninterrupted_run(
    bucket: str,
    tiny_model: Path,
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    ref_out = tmp_path / "reference"
    ref = write_manifest(
        tmp_path / "ref.yaml",
        chaos_manifest("chaos", str(tiny_model), str(tiny_data), str(ref_out), STEPS),
    )
    started = time.monotonic()
    done = run_job(["run", "-f", str(ref)], job_env(tmp_path / "cache-ref"))
    assert done.code == 0, done.stderr[-2000:]
    reference_seconds = time.monotonic() - started
    reference = {
        "record": json.loads((ref_out / "run.json").read_text()),
        "adapter": adapter_tensors(ref_out / "adapter"),
    }

    out_uri = f"s3://{bucket}/out/"
    job = write_manifest(
        tmp_path / "job.yaml",
        chaos_manifest("chaos", str(tiny_model), str(tiny_data), out_uri, STEPS),
    )
    report = chaos(
        job,
        job_env(tmp_path / "cache"),
        kills=4,
        steps=STEPS,
        seed=11,
        reference=reference,
        reference_seconds=reference_seconds,
        output_store=open_storage(out_uri),
    )
    with capsys.disabled():
        print("\n" + report.summary())
    assert not report.problems, report.problems
    assert report.kills >= 3
    assert report.attempts[-1].code == 0
