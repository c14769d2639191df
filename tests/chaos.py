"""Chaos harness: kill a real training job at random moments until it finishes, then check
that it ends exactly where an uninterrupted run ends.

Each attempt runs the real entrypoint as a process against S3 (moto's server). The harness
sends SIGTERM at a random step, or SIGKILL at a random time or just as a checkpoint upload
starts, restarts the job, and checks:
  - the final adapter and per-step losses equal the uninterrupted run's;
  - after a SIGTERM no step is lost (training resumes right after the step it stopped at);
  - after a SIGKILL at most the steps since the last committed checkpoint are lost;
  - every checkpoint a run resumed from had been committed (logged as such) before.

In the test suite it runs a short fixed-seed schedule; by hand, for longer runs:
    .venv/bin/python tests/chaos.py --kills 20 --steps 40 --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.jobs import (  # noqa: E402
    Finished,
    adapter_tensors,
    at_step,
    job_env,
    manifest,
    run_job,
    step_losses,
    write_manifest,
)

ACTIONS = ("sigterm_at_step", "sigkill_at_time", "sigkill_at_upload")


@dataclass
class Attempt:
    action: str
    code: int
    last_step: int  # the last step this attempt logged
    committed: list[int]  # steps it committed
    resumed_from: int | None
    seconds: float


@dataclass
class Report:
    attempts: list[Attempt] = field(default_factory=list)
    steps_lost: int = 0
    seconds_lost: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(a.action != "none" for a in self.attempts)

    def summary(self) -> str:
        sigterms = sum(a.action == "sigterm_at_step" for a in self.attempts)
        sigkills = self.kills - sigterms
        return (
            f"chaos: {self.kills} interruptions survived ({sigterms} SIGTERM, {sigkills} SIGKILL) "
            f"over {len(self.attempts)} attempts; steps lost {self.steps_lost}; "
            f"time lost {self.seconds_lost:.1f}s; problems: {len(self.problems)}"
        )


def attempt(
    args: list[str],
    env: dict[str, str],
    action: str,
    rng: random.Random,
    steps: int,
    kill_window: tuple[float, float],
) -> tuple[str, Finished, float]:
    start = time.monotonic()
    if action == "sigterm_at_step":
        done = run_job(args, env, interrupt=at_step(rng.randint(1, max(steps - 1, 1))))
    elif action == "sigkill_at_upload":

        def on_save(event: dict[str, Any]) -> int | None:
            return signal.SIGKILL if event.get("event") == "checkpoint_saved" else None

        done = run_job(args, env, interrupt=on_save)
    elif action == "sigkill_at_time":
        # From a random step's log, a random part of a step later: anywhere in a step,
        # in the forward, the backward, the optimizer or a checkpoint write.
        kill_from = at_step(rng.randint(1, max(steps - 1, 1)), signal.SIGKILL)
        delay = rng.uniform(0, kill_window[1] - kill_window[0]) / steps

        def later(event: dict[str, Any]) -> tuple[int, float] | None:
            return None if kill_from(event) is None else (signal.SIGKILL, delay)

        done = run_job(args, env, interrupt=later)
    else:
        done = run_job(args, env)
    if not done.signals_sent:
        action = "none"  # the job finished (or stopped) before the blow landed
    return action, done, time.monotonic() - start


def chaos(
    job_path: Path,
    env: dict[str, str],
    *,
    kills: int,
    steps: int,
    seed: int,
    reference: dict[str, Any],
    reference_seconds: float,
    output: Path | None = None,
    output_store: Any = None,
) -> Report:
    """``reference_seconds``: how long the uninterrupted run took, to aim timed kills at
    the part of a run that is left (start-up counted as about a third of it)."""
    rng = random.Random(seed)
    report = Report()
    committed_ever: set[int] = {0}
    in_flight: set[int] = set()  # saved by the previous attempt, commit not seen in its log
    args = ["run", "-f", str(job_path)]
    previous: Attempt | None = None
    for i in range(kills + 50):
        action = rng.choice(ACTIONS) if report.kills < kills else "finish"
        left = 1 - max(committed_ever) / steps
        window = (0.3 * reference_seconds, reference_seconds * (0.3 + 0.4 * left))
        action, done, seconds = attempt(args, env, action, rng, steps, window)
        trained = [e["step"] for e in done.named("train_log")]
        resumed = done.named("resuming")
        this = Attempt(
            action=action,
            code=done.code,
            last_step=max(trained, default=resumed[0]["step"] if resumed else 0),
            committed=[e["step"] for e in done.named("checkpoint_committed")],
            resumed_from=resumed[0]["step"] if resumed else None,
            seconds=seconds,
        )
        report.attempts.append(this)
        start_step = this.resumed_from or 0
        if done.named("run_already_complete") and previous is not None:
            start_step = previous.last_step  # the blow landed after the run was published
        if start_step in in_flight:
            # Saved, and its commit was in flight when the process died: it may have finished
            # the pointer write without living to log it. The product's checksum check on
            # resume is what vouches for it; count it as committed from here on.
            committed_ever.add(start_step)
        if start_step not in committed_ever:
            report.problems.append(f"attempt {i} resumed from step {start_step}, never committed")
        if previous is not None and previous.action != "none":
            lost = max(previous.last_step - start_step, 0)
            report.steps_lost += lost
            if previous.action == "sigterm_at_step" and previous.code == 75 and lost:
                report.problems.append(f"attempt {i - 1}: SIGTERM lost {lost} steps")
            if previous.action.startswith("sigkill"):
                bound = previous.last_step - max(
                    [c for c in committed_ever if c <= previous.last_step], default=0
                )
                if lost > bound:
                    report.problems.append(f"attempt {i - 1}: SIGKILL lost {lost} > {bound}")
            report.seconds_lost += previous.seconds if previous.code != 0 else 0.0
        committed_ever.update(this.committed)
        in_flight = {e["step"] for e in done.named("checkpoint_saved")} - committed_ever
        if this.action == "none" and done.code not in (0, 75):
            report.problems.append(f"attempt {i}: exit {done.code}: {done.stderr[-1500:]}")
            break
        if this.action == "sigterm_at_step" and done.code != 75:
            report.problems.append(f"attempt {i}: SIGTERM gave exit {done.code}, not 75")
        previous = this
        if done.code == 0:
            break
    if output is not None:
        record = json.loads((output / "run.json").read_text())
        adapter = adapter_tensors(output / "adapter")
    else:
        import tempfile

        tmp = Path(tempfile.mkdtemp())
        record = json.loads(output_store.read_bytes("run.json"))
        output_store.download_file(
            "adapter/adapter_model.safetensors", tmp / "adapter_model.safetensors"
        )
        adapter = adapter_tensors(tmp)
    if step_losses(record) != step_losses(reference["record"]):
        report.problems.append("per-step losses differ from the uninterrupted run")
    if any(not (adapter[k] == reference["adapter"][k]).all() for k in reference["adapter"]):
        report.problems.append("final adapter differs from the uninterrupted run")
    return report


def chaos_manifest(name: str, model: str, data: str, output: str, steps: int) -> dict[str, Any]:
    return manifest(
        name,
        model,
        data,
        output,
        training={"max_steps": steps, "gradient_accumulation": 2},
        checkpoint={"every_steps": 2, "keep": 2},
    )


def main() -> int:  # pragma: no cover - by hand
    parser = argparse.ArgumentParser(description="kill a real job until it finishes")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/spotlora-chaos"))
    ns = parser.parse_args()
    import os
    import shutil

    import boto3

    from examples.samples import write_synthetic_task, write_tiny_llama
    from service.storage import open_storage
    from tests.conftest import free_port, wait_for_port

    shutil.rmtree(ns.dir, ignore_errors=True)
    ns.dir.mkdir(parents=True)
    port = free_port()
    import subprocess

    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        os.environ.update(
            AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="chaos",
            AWS_SECRET_ACCESS_KEY="chaos",
            AWS_DEFAULT_REGION="us-east-1",
        )
        boto3.client("s3").create_bucket(Bucket="chaos")
        model = write_tiny_llama(ns.dir / "model")
        data = write_synthetic_task(ns.dir / "train.jsonl", n=4 * ns.steps, seed=1)
        ref_out = ns.dir / "reference"
        ref_job = write_manifest(
            ns.dir / "ref.yaml",
            chaos_manifest("chaos", str(model), str(data), str(ref_out), ns.steps),
        )
        started = time.monotonic()
        done = run_job(["run", "-f", str(ref_job)], job_env(ns.dir / "cache-ref"))
        assert done.code == 0, done.stderr[-2000:]
        reference_seconds = time.monotonic() - started
        reference = {
            "record": json.loads((ref_out / "run.json").read_text()),
            "adapter": adapter_tensors(ref_out / "adapter"),
        }
        job = write_manifest(
            ns.dir / "job.yaml",
            chaos_manifest("chaos", str(model), str(data), "s3://chaos/out/", ns.steps),
        )
        report = chaos(
            job,
            job_env(ns.dir / "cache"),
            kills=ns.kills,
            steps=ns.steps,
            seed=ns.seed,
            reference=reference,
            reference_seconds=reference_seconds,
            output_store=open_storage("s3://chaos/out/"),
        )
    finally:
        moto.terminate()
    for a in report.attempts:
        print(
            f"  {a.action:18s} exit {a.code:3d}  resumed from {a.resumed_from}  "
            f"last step {a.last_step:3d}  committed {a.committed}  {a.seconds:.1f}s"
        )
    print(report.summary())
    for p in report.problems:
        print("  PROBLEM:", p)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
