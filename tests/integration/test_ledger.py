"""The spot ledger, end to end: a job preempted twice has three attempts, and run.json, the
pushed metrics and `spotlora runs list` all say what they cost and what the preemptions took."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.jobs import RecordingGateway, at_step, job_env, manifest, run_job, write_manifest

GPU_HOUR_USD = 0.36
ON_DEMAND_GPU_HOUR_USD = 1.2


def pushed(body: str, name: str) -> float | None:
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", body, re.M)
    return float(match[1]) if match else None


def test_a_job_preempted_twice_shows_three_attempts_and_their_cost(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    gateway = RecordingGateway()
    out = tmp_path / "out"
    doc = manifest(
        "costed",
        str(tiny_model),
        str(tiny_data),
        str(out),
        training={"max_steps": 8, "gradient_accumulation": 3},
        checkpoint={"every_steps": 2},
        metrics={"pushgateway_url": gateway.url},
    )
    doc["spec"]["output"]["per_run"] = True
    path = write_manifest(tmp_path / "job.yaml", doc)
    env = job_env(
        tmp_path / "cache",
        SPOTLORA_RUN_ID="night-1",
        SPOTLORA_GPU_HOUR_USD=str(GPU_HOUR_USD),
        SPOTLORA_ON_DEMAND_GPU_HOUR_USD=str(ON_DEMAND_GPU_HOUR_USD),
    )
    # 1. A reclaim with no time to finish the step: the work since the start is lost.
    first = run_job(
        ["run", "-f", str(path), "--set", "checkpoint.grace_period_seconds=0.001"],
        env,
        interrupt=at_step(3),
    )
    assert first.code in (75, 76), first.stderr[-3000:]
    first_push = gateway.bodies[-1]
    assert (pushed(first_push, "spotlora_lost_work_seconds_total") or 0) > 0
    assert (pushed(first_push, "spotlora_cost_dollars_total") or 0) > 0
    # 2. A reclaim that commits its step: little lost, but the next start-up is repeated.
    second = run_job(["run", "-f", str(path)], env, interrupt=at_step(5))
    assert second.code == 75, second.stderr[-3000:]
    # 3. The attempt that finishes.
    third = run_job(["run", "-f", str(path)], env)
    assert third.code == 0, third.stderr[-3000:]

    record = json.loads((out / "runs" / "night-1" / "run.json").read_text())
    attempts = record["attempts"]
    assert [a["outcome"] for a in attempts] == ["preempted", "preempted", "done"]
    assert sum(a["steps_gained"] for a in attempts) == 8
    assert attempts[0]["lost_seconds"] > 0 and attempts[0]["lost_usd"] > 0
    assert all(a["gpu_hour_usd"] == GPU_HOUR_USD for a in attempts)
    assert all(a["price_source"] == "environment" for a in attempts)
    bill = record["cost"]
    seconds = sum(a["seconds"] for a in attempts)
    assert bill["attempts"] == 3 and bill["preemptions"] == 2
    assert abs(bill["total_usd"] - seconds / 3600 * GPU_HOUR_USD) < 1e-3
    assert 0 < bill["lost_to_preemption_usd"] < bill["total_usd"]
    assert bill["restart_seconds"] > 0 and bill["lost_work_seconds"] > 0
    assert bill["per_million_tokens_usd"] > 0 and bill["trained_tokens"] > 0
    assert bill["on_demand_usd"] > bill["total_usd"]  # 3.3x the price, for less time
    assert len(record["preemptions"]) == 2

    # The final push carries the run's bill as the Prometheus series a dashboard reads.
    final = gateway.bodies[-1]
    assert pushed(final, "spotlora_run_attempts") == 3
    assert abs((pushed(final, "spotlora_run_cost_dollars") or 0) - bill["total_usd"]) < 1e-6
    assert (
        abs(
            (pushed(final, "spotlora_run_lost_to_preemption_dollars") or 0)
            - bill["lost_to_preemption_usd"]
        )
        < 1e-6
    )

    # The history lists it with its cost.
    listing = subprocess.run(
        [sys.executable, "entrypoint.py", "runs", "list", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    header, line = listing.stdout.splitlines()[:2]
    assert "COST $" in header and "LOST $" in header and "ATTEMPTS" in header
    fields = line.split()
    assert fields[0] == "night-1" and "3" in fields
    assert f"{bill['total_usd']:.6f}" in fields
    assert f"{bill['lost_to_preemption_usd']:.6f}" in fields
    assert (out / "runs" / "night-1" / "report.png").stat().st_size > 10_000
