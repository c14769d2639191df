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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_commit_every_ranks_rng_state_and_resume_exactly(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, two_process_reference: dict[str, Any]
) -> None:
    """Two "nodes" (two launchers, each with its own cache disk, one worker each): rank 1's
    RNG state lives only on its node, yet the committed checkpoint holds it, and the run
    resumes as exactly as on one node."""
    import signal
    import subprocess
    import threading

    out = tmp_path / "out"
    path = write_manifest(tmp_path / "job.yaml", job(tiny_model, tiny_data, out))
    port = free_port()

    def launch_args(node: int) -> list[str]:
        return [
            "launch",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--",
            "run",
            "-f",
            str(path),
        ]

    def both(interrupt_at: int | None) -> list[Any]:
        procs: list[subprocess.Popen[str]] = []
        results: list[Any] = [None, None]
        stop = at_step(interrupt_at) if interrupt_at else None

        def on_event(event: dict[str, Any]) -> int | None:
            if stop is not None and stop(event) is not None:
                for proc in procs[1:]:
                    proc.send_signal(signal.SIGTERM)  # the other node is reclaimed too
                return signal.SIGTERM
            return None

        def node(i: int) -> None:
            env = job_env(tmp_path / f"node-{i}-cache")
            results[i] = run_job(
                launch_args(i),
                env,
                interrupt=on_event if i == 0 else None,
                started=procs.append,
            )

        threads = [threading.Thread(target=node, args=(i,)) for i in (0, 1)]
        threads[0].start()
        threads[1].start()
        for t in threads:
            t.join(timeout=600)
        return results

    first = both(interrupt_at=2)
    assert first[0].code == 75, first[0].stderr[-4000:]
    assert first[1].code in (0, 75), first[1].stderr[-4000:]
    checkpoints = list((out / "checkpoints" / "ddp").glob("*-step-*"))
    assert checkpoints
    assert {p.name for p in checkpoints[0].glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }

    second = both(interrupt_at=None)
    assert second[0].code == 0, second[0].stderr[-4000:]
    record = json.loads((out / "run.json").read_text())
    assert step_losses(record) == step_losses(two_process_reference["record"])
    got, want = adapter_tensors(out / "adapter"), two_process_reference["adapter"]
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.slow
def test_a_pod_whose_workers_recorded_no_outcome_exits_with_a_counted_code(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """torchrun SIGKILLs a worker still running at its shutdown timeout (0 s here), before
    it can record how it ended: the pod cannot know whether the run moved forward, so it
    exits 76, which the Job counts, never 75, which it would ignore however often it came."""
    path = write_manifest(tmp_path / "job.yaml", job(tiny_model, tiny_data, tmp_path / "out"))
    launch = ["launch", "--nproc-per-node", "1", "--shutdown-timeout", "0", "--"]
    done = run_job(
        [*launch, "run", "-f", str(path)], job_env(tmp_path / "cache"), interrupt=at_step(1)
    )
    assert done.code == 76, done.stderr[-4000:]
    assert [e["exit_code"] for e in done.named("launcher_signalled")] == [76]
