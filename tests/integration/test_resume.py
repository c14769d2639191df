"""Preemption by a real SIGTERM, and exact resume: the same loss curve, the same adapter."""

from __future__ import annotations

import json
import signal
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

STEPS = 8


def job(name: str, tiny_model: Path, tiny_data: Path, out: Path, **sections: Any) -> dict:
    training = {"max_steps": STEPS, "gradient_accumulation": 3, **sections.pop("training", {})}
    return manifest(name, str(tiny_model), str(tiny_data), str(out), training=training, **sections)


@pytest.fixture(scope="module")
def reference(
    tiny_model: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One uninterrupted run to compare against."""
    base = tmp_path_factory.mktemp("reference")
    path = write_manifest(base / "job.yaml", job("resume", tiny_model, tiny_data, base / "out"))
    done = run_job(["run", "-f", str(path)], job_env(base / "cache"))
    assert done.code == 0, done.stderr[-3000:]
    return {
        "record": json.loads((base / "out" / "run.json").read_text()),
        "adapter": adapter_tensors(base / "out" / "adapter"),
    }


def assert_same_run(out: Path, reference: dict[str, Any]) -> dict[str, Any]:
    record = json.loads((out / "run.json").read_text())
    assert step_losses(record) == step_losses(reference["record"])  # bitwise on CPU
    assert len(step_losses(record)) == STEPS
    got, want = adapter_tensors(out / "adapter"), reference["adapter"]
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    return record


def test_sigterm_checkpoints_exits_75_and_resume_matches(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    out = tmp_path / "out"
    path = write_manifest(tmp_path / "job.yaml", job("resume", tiny_model, tiny_data, out))
    env = job_env(tmp_path / "cache")
    first = run_job(["run", "-f", str(path)], env, interrupt=at_step(3))
    assert first.signals_sent, "the job ended before it could be interrupted"
    assert first.code == 75, first.stderr[-3000:]
    stopped_at = first.named("checkpoint_committed")[-1]["step"]
    assert stopped_at >= 3
    assert not (out / "run.json").exists()  # nothing is published by a preempted run

    second = run_job(["run", "-f", str(path)], env)
    assert second.code == 0, second.stderr[-3000:]
    assert second.named("resuming")[0]["step"] == stopped_at
    # No step was lost: training restarted right after the committed one.
    assert min(e["step"] for e in second.named("train_log")) == stopped_at + 1
    record = assert_same_run(out, reference)
    assert record["resumed_from_step"] == stopped_at


def test_stop_mid_step_when_the_step_cannot_finish_in_the_grace_budget(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    """A budget too short to finish the optimizer step: the state of the last completed
    step is committed at the next micro-batch boundary, and the partial step is replayed."""
    out = tmp_path / "out"
    doc = job("resume", tiny_model, tiny_data, out, checkpoint={"grace_period_seconds": 0.001})
    path = write_manifest(tmp_path / "job.yaml", doc)
    env = job_env(tmp_path / "cache")
    first = run_job(["run", "-f", str(path)], env, interrupt=at_step(2))
    assert first.code == 75, first.stderr[-3000:]
    mid = first.named("preemption_stop_mid_step")
    assert mid, "expected a stop between micro-batches"
    # With no time to spare the commit may not finish; either way what is resumed is committed.
    second = run_job(["run", "-f", str(path)], env)
    assert second.code == 0, second.stderr[-3000:]
    assert_same_run(out, reference)


def test_second_sigterm_does_not_break_the_commit(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    """Kubernetes sends one SIGTERM, but a user at a terminal presses Ctrl-C twice."""
    out = tmp_path / "out"
    path = write_manifest(tmp_path / "job.yaml", job("resume", tiny_model, tiny_data, out))
    env = job_env(tmp_path / "cache")
    first_signal = at_step(2)

    def twice(event: dict[str, Any]) -> int | None:
        if event.get("event") == "preemption_requested":
            return signal.SIGINT  # the second, while the first is being handled
        return first_signal(event)

    first = run_job(["run", "-f", str(path)], env, interrupt=twice)
    assert [name for name, _ in first.signals_sent] == ["SIGTERM", "SIGINT"]
    assert first.code == 75, first.stderr[-3000:]
    assert first.named("preemption_already_stopping")
    second = run_job(["run", "-f", str(path)], env)
    assert second.code == 0, second.stderr[-3000:]
    assert_same_run(out, reference)
