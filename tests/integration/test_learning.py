"""A real pretrained model learns a task it could not do, through the product, and the merged
model it publishes answers as the adapter does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from examples.quickstart import merged_exact_match, prepare
from examples.samples import read_jsonl
from tests.jobs import job_env, run_job


@pytest.mark.slow
def test_smollm2_learns_the_synthetic_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job, _, held_out = prepare(tmp_path)
    # Every core, as a user's quickstart runs: nothing here is compared bit for bit across
    # processes (job_env's one OpenMP thread nearly doubles this job's 45 steps).
    threads = str(len(os.sched_getaffinity(0)))
    done = run_job(
        ["run", "--manifest", str(job)], job_env(tmp_path / "cache", OMP_NUM_THREADS=threads)
    )
    assert done.code == 0, done.stderr[-3000:]
    output = tmp_path / "output"
    record = json.loads((output / "run.json").read_text())
    rows = read_jsonl(held_out)
    scores = record["evaluation"]["metrics"]
    figures = {
        "exact_match_before": scores["before"]["exact_match"],
        "exact_match_after": scores["after"]["exact_match"],
        "exact_match_merged": merged_exact_match(output / "merged", rows),
        "rows": record["evaluation"]["rows_scored"],
        "steps": record["steps"],
        "train_seconds": record["timings"]["train_seconds"],
        "merge_seconds": record["export"]["seconds"]["total"],
        "merge_peak_host_gib": record["export"]["peak_host_memory_bytes"] / 2**30,
        "merge_peak_anonymous_gib": record["export"]["peak_anonymous_memory_bytes"] / 2**30,
    }
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    with capsys.disabled():
        print(f"\nSmolLM2-135M held-out exact match: {figures}")
    assert figures["rows"] == len(rows)
    assert figures["exact_match_before"] <= 0.1
    assert figures["exact_match_after"] >= 0.8
    # Merged into the base it trained on, dequantized, the model answers as base + adapter
    # did (1.0 and 1.0 measured; merged into the original weights instead, 0.66).
    assert figures["exact_match_merged"] >= figures["exact_match_after"] - 0.1
    assert record["export"]["verification"]["passed"]
    page = (output / "report.html").read_text()
    assert "<h2>Samples</h2>" in page and len(record["evaluation"]["samples"]) == 4
