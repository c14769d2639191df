"""Preemption by a real SIGTERM, and exact resume: the same loss curve, the same adapter."""

from __future__ import annotations

import hashlib
import json
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.jobs import (
    RecordingGateway,
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


GRACE_SECONDS = 5.0


def after_training_job(tiny_model: Path, tiny_data: Path, out: Path, *, per_run: bool) -> dict:
    """Held-out rows, samples and a task metric, a merged export: every phase after training
    (held-out rows change nothing that trains). No periodic checkpoint falls due."""
    held_out = out.parent / "eval.jsonl"
    held_out.write_text("".join(tiny_data.read_text().splitlines(keepends=True)[:6]))
    doc = job(
        "resume",
        tiny_model,
        tiny_data,
        out,
        data={"eval": str(held_out)},
        evaluation={"samples": 6, "metrics": ["contains"], "max_new_tokens": 16},
        export={"merged": True},
        checkpoint={"grace_period_seconds": GRACE_SECONDS},
    )
    doc["spec"]["output"]["per_run"] = per_run
    return doc


def merged_files(outputs: Path) -> dict[str, str]:
    """The merged model's files and their sha256; EXPORT.json records times, not the model."""
    merged = outputs / "merged"
    return {
        str(p.relative_to(merged)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(merged.rglob("*"))
        if p.is_file() and p.name != "EXPORT.json"
    }


@pytest.fixture(scope="module")
def reference(
    tiny_model: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One uninterrupted run to compare against, through every phase after training: its
    adapter and its merged model (what runs after training changes nothing that trains)."""
    base = tmp_path_factory.mktemp("reference")
    doc = after_training_job(tiny_model, tiny_data, base / "out", per_run=False)
    done = run_job(["run", "-f", str(write_manifest(base / "job.yaml", doc))], job_env(base / "c"))
    assert done.code == 0, done.stderr[-3000:]
    merged = merged_files(base / "out")
    assert "model.safetensors" in merged, merged
    return {
        "record": json.loads((base / "out" / "run.json").read_text()),
        "adapter": adapter_tensors(base / "out" / "adapter"),
        "merged": merged,
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
    mid = first.named("preemption_stop_mid_step")
    assert mid, "expected a stop between micro-batches"
    # With no time to spare the commit may not finish: then the attempt made no progress
    # (76), and what is resumed is still only what was committed.
    (stop,) = first.named("preempted")
    assert first.code == (75 if stop["progress"] else 76), first.stderr[-3000:]
    assert stop["lost_seconds"] > 0  # the steps trained since the start were not committed
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


class RunsCode:
    """A pickle that runs code when loaded: torch's safe loader must refuse it."""

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, ("touch /tmp/spotlora-pwned",))


def replace_committed_file(checkpoint: Path, name: str, data: bytes) -> None:
    """Swap a committed file and make its MANIFEST vouch for the new bytes, as if it had been
    written that way before it was hashed: only loading it can tell."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


def checkpoint_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "attempts" not in p.parts)


def test_odd_states_after_a_restart_neither_lose_progress_nor_replay(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    """A changed setting, a damaged LATEST, then LATEST moved aside and the newest checkpoint
    unloadable: each restart refuses clearly or resumes exactly, and the run ends as the
    uninterrupted one did."""
    out = tmp_path / "out"
    doc = job("resume", tiny_model, tiny_data, out, checkpoint={"every_steps": 2, "keep": 3})
    path = write_manifest(tmp_path / "job.yaml", doc)
    env = job_env(tmp_path / "cache")
    first = run_job(["run", "-f", str(path)], env, interrupt=at_step(5))
    assert first.code == 75, first.stderr[-3000:]
    committed = sorted(e["step"] for e in first.named("checkpoint_committed"))
    assert committed[:2] == [2, 4] and len(committed) == 3
    root = out / "checkpoints" / "resume"
    files = checkpoint_files(root)

    # 1. What decides the data order is refused when changed, before anything is loaded.
    for override, named in [
        ("training.batch_size=1", "spec.training.batch_size: 2 rows per micro-batch then, 1 now"),
        ("training.max_steps=20", "spec.training.max_steps: 8 then, 20 now"),
    ]:
        refused = run_job(["run", "-f", str(path), "--set", override], env)
        assert refused.code == 2, refused.stderr[-2000:]
        assert named in refused.stderr and "Traceback" not in refused.stderr
        assert not refused.named("model_loaded")
    assert checkpoint_files(root) == files

    # 2. A LATEST that cannot be read is left alone, and nothing is pruned around it.
    (root / "LATEST").write_text("{damaged")
    broken = run_job(["run", "-f", str(path)], env)
    assert broken.code == 69, broken.stderr[-2000:]
    assert "LATEST cannot be read" in broken.stderr and "Traceback" not in broken.stderr
    assert (root / "LATEST").read_text() == "{damaged"
    assert checkpoint_files(root) == files

    # 3. Moved aside, LATEST is rebuilt from the checkpoints that verify; the newest one holds
    #    an optimizer file torch's safe loader refuses, so the one before it is resumed. The
    #    micro-batch comes from the checkpoint, although the manifest now says auto.
    (root / "LATEST").rename(root / "LATEST.damaged")
    newest = next(root.glob(f"*-step-{committed[-1]:08d}"))
    replace_committed_file(newest, "optimizer.pt", pickle.dumps(RunsCode()))
    resumed = run_job(["run", "-f", str(path), "--set", "training.batch_size=auto"], env)
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert resumed.named("checkpoint_pointer_rebuilt")
    assert resumed.named("checkpoint_unloadable")
    assert not Path("/tmp/spotlora-pwned").exists()
    assert resumed.named("resuming")[0]["step"] == committed[1]
    assert resumed.named("resume_keeps_batch_size")[0]["micro_batch"] == 2
    assert_same_run(out, reference)


def test_a_seeded_run_resumes_its_own_checkpoints_after_a_preemption(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    """checkpoint.resume_from seeds a run that has no checkpoint of its own; once the run has
    committed its own, a preempted attempt resumes those, not the seed again. The preempted
    attempt reports itself as such (not failed) and is in the final run record."""
    seed_out = tmp_path / "seed"
    seed_job = write_manifest(
        tmp_path / "seed.yaml", job("seed-run", tiny_model, tiny_data, seed_out)
    )
    env = job_env(tmp_path / "cache")
    seeded = run_job(["run", "-f", str(seed_job)], env, interrupt=at_step(2))
    assert seeded.code == 75, seeded.stderr[-3000:]
    seed_step = seeded.named("checkpoint_committed")[-1]["step"]

    gateway = RecordingGateway()
    out = tmp_path / "out"
    doc = job(
        "resume",
        tiny_model,
        tiny_data,
        out,
        checkpoint={
            "every_steps": 2,
            "resume_from": str(seed_out / "checkpoints" / "seed-run"),
        },
        metrics={"pushgateway_url": gateway.url},
    )
    path = write_manifest(tmp_path / "job.yaml", doc)
    first = run_job(["run", "-f", str(path)], env, interrupt=at_step(seed_step + 2))
    assert first.code == 75, first.stderr[-3000:]
    assert first.named("resuming")[0]["step"] == seed_step
    own_step = first.named("checkpoint_committed")[-1]["step"]
    assert own_step > seed_step
    pushed = gateway.phases()
    assert pushed[0] == "loading" and pushed[-1] == "preempted", pushed
    assert {"training", "checkpointing"} <= set(pushed) and "failed" not in pushed

    second = run_job(["run", "-f", str(path)], env)
    assert second.code == 0, second.stderr[-3000:]
    assert second.named("resuming")[0]["step"] == own_step  # not the seed's step again
    record = assert_same_run(out, reference)
    # The next pod's "loading" replaces the pushed "preempted"; the run ends "done".
    phases = gateway.phases()
    after = phases[phases.index("preempted") + 1 :]
    assert after[0] == "loading" and after[-1] == "done", phases
    # Every attempt is in the record: the preempted one with its stop, the finishing one.
    outcomes = [a["outcome"] for a in record["attempts"]]
    assert outcomes == ["preempted", "done"], outcomes
    (stop,) = record["preemptions"]
    assert stop["reason"] == "SIGTERM" and stop["committed_step"] == own_step
    assert 0 <= stop["lost_seconds"] < 60
    kinds = [e["type"] for e in record["events"]]
    assert kinds.count("resumed") == 2 and kinds.count("preempted") == 1
    assert (out / "report.html").is_file()


def test_a_failed_job_is_resumed_by_hand_as_operations_md_says(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """docs/operations.md, "Resuming a failed Job by hand": the Job (run id = its uid) is
    preempted after committing and then gives up (backoffLimit); `spotlora runs resume URI`
    names the run, and the same manifest run with that SPOTLORA_RUN_ID resumes at the
    committed step instead of starting a new run."""
    import subprocess
    import sys

    from tests.jobs import ENTRYPOINT

    out = tmp_path / "out"
    doc = job("nightly", tiny_model, tiny_data, out, checkpoint={"every_steps": 2})
    path = write_manifest(tmp_path / "job.yaml", doc)
    uid = "0b7d3e52-5f7e-4c1a-9d55-3f1d1f2c9a10"
    first = run_job(
        ["run", "-f", str(path)],
        job_env(tmp_path / "cache", SPOTLORA_RUN_ID=uid),
        interrupt=at_step(3),
    )
    assert first.code == 75, first.stderr[-3000:]
    committed = first.named("checkpoint_committed")[-1]["step"]

    asked = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "runs", "resume", str(out)],
        env=job_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout == f"SPOTLORA_RUN_ID={uid}\n"
    assert f"# {uid}: committed step {committed}" in asked.stderr
    name, _, value = asked.stdout.strip().partition("=")

    second = run_job(["run", "-f", str(path)], job_env(tmp_path / "cache", **{name: value}))
    assert second.code == 0, second.stderr[-3000:]
    assert second.named("resuming")[0]["step"] == committed
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] == uid and record["resumed_from_step"] == committed


@pytest.mark.parametrize(
    ("signal_at", "per_run"),
    [
        # while the samples and the task metrics generate
        pytest.param("evaluated", False, id="evaluation"),
        # after the merge: while the merged files are verified and uploaded
        pytest.param("export_merged", False, id="export"),
        # the adapter published, run.json not yet written (the export is what runs between)
        pytest.param("adapter_uploaded", False, id="publication"),
        # a per-run job's gate decided to promote; nothing of that is written yet
        pytest.param("promotion_decided", True, id="gate"),
    ],
)
def test_a_stop_after_training_keeps_the_last_step_and_the_rerun_trains_nothing(
    tiny_model: Path,
    tiny_data: Path,
    tmp_path: Path,
    reference: dict[str, Any],
    signal_at: str,
    per_run: bool,
) -> None:
    """SIGTERM in a phase after training: the last step is committed, the stop lands within
    the grace period as a preemption with nothing published as done, and the rerun trains no
    step and publishes an adapter and a merged model bitwise like an uninterrupted run's."""
    from service.checkpoint.store import CheckpointStore
    from service.storage import open_storage

    gateway = RecordingGateway()
    out = tmp_path / "out"
    doc = after_training_job(tiny_model, tiny_data, out, per_run=per_run)
    doc["spec"]["metrics"]["pushgateway_url"] = gateway.url
    path = write_manifest(tmp_path / "job.yaml", doc)
    env = job_env(tmp_path / "cache")
    outputs = out / "runs" / "resume" if per_run else out

    def in_phase(event: dict[str, Any]) -> int | None:
        return signal.SIGTERM if event.get("event") == signal_at else None

    first = run_job(["run", "-f", str(path)], env, interrupt=in_phase)
    ended = time.monotonic()
    assert first.signals_sent, "the job ended before it could be interrupted"
    assert first.code == 75, first.stderr[-3000:]
    assert ended - first.signals_sent[0][1] < GRACE_SECONDS
    assert first.named("preempted")[0]["step"] == STEPS
    assert not first.named("export_published") and not first.named("run_complete")
    assert not (outputs / "run.json").exists() and not (outputs / "merged/EXPORT.json").exists()
    assert not (out / "PUBLISHED").exists() and not (outputs / "PUBLISHING.json").exists()
    if signal_at == "evaluated":
        assert not first.named("evaluation")  # stopped in the middle of generating
    if signal_at == "adapter_uploaded":
        assert not first.named("export_merged")  # stopped while the export loads
        assert (outputs / "adapter" / "adapter_model.safetensors").is_file()
    assert gateway.phases()[-1] == "preempted"
    store = CheckpointStore(open_storage(str(out / "checkpoints" / "resume")))
    pointer, _ = store.read_pointer()
    assert pointer is not None and pointer.step == STEPS

    second = run_job(["run", "-f", str(path)], env)
    assert second.code == 0, second.stderr[-3000:]
    assert second.named("resuming")[0]["step"] == STEPS
    assert not second.named("train_log") and second.named("training_already_finished")
    record = assert_same_run(outputs, reference)
    assert merged_files(outputs) == reference["merged"]
    assert record["export"]["verification"]["passed"]
    assert record["evaluation"]["rows_scored"] == 6
    assert [a["outcome"] for a in record["attempts"]] == ["preempted", "done"]
    assert [a["steps_gained"] for a in record["attempts"]] == [STEPS, 0]
    if per_run:
        assert record["promotion"]["promoted"]
        assert json.loads((out / "PUBLISHED").read_text())["run_id"] == "resume"
