"""Two processes (torchrun, gloo on CPU): preempted together, resumed together, and ending
where an uninterrupted two-process run ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.jobs import (
    adapter_tensors,
    at_step,
    job_env,
    manifest,
    run_job,
    step_losses,
    write_manifest,
)

STEPS = 6
LAUNCH = ["launch", "--nproc-per-node", "2", "--"]


def job(tiny_model: Path, tiny_data: Path, out: Path) -> dict[str, Any]:
    return manifest(
        "ddp",
        str(tiny_model),
        str(tiny_data),
        str(out),
        training={"max_steps": STEPS, "batch_size": 2},
    )


@pytest.fixture(scope="module")
def two_process_reference(
    tiny_model: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("ddp-reference")
    path = write_manifest(base / "job.yaml", job(tiny_model, tiny_data, base / "out"))
    done = run_job([*LAUNCH, "run", "-f", str(path)], job_env(base / "cache"))
    assert done.code == 0, done.stderr[-4000:]
    record = json.loads((base / "out" / "run.json").read_text())
    assert record["world_size"] == 2
    return {"record": record, "adapter": adapter_tensors(base / "out" / "adapter")}


@pytest.mark.slow
def test_two_ranks_stop_together_and_resume_exactly(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, two_process_reference: dict[str, Any]
) -> None:
    out = tmp_path / "out"
    path = write_manifest(tmp_path / "job.yaml", job(tiny_model, tiny_data, out))
    env = job_env(tmp_path / "cache")
    first = run_job([*LAUNCH, "run", "-f", str(path)], env, interrupt=at_step(2))
    assert first.code == 75, first.stderr[-4000:]
    stops = first.named("preemption_requested")
    assert {e.get("rank") for e in stops} == {0, 1}  # torchrun forwarded it to both ranks
    committed = first.named("checkpoint_committed")
    assert len(committed) == 1 and committed[0].get("rank", 0) == 0  # one writer

    second = run_job([*LAUNCH, "run", "-f", str(path)], env)
    assert second.code == 0, second.stderr[-4000:]
    record = json.loads((out / "run.json").read_text())
    assert step_losses(record) == step_losses(two_process_reference["record"])
    got, want = adapter_tensors(out / "adapter"), two_process_reference["adapter"]
    for name in want:
        assert torch.equal(got[name], want[name]), name
