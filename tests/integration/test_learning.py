"""A real pretrained model learns a task it could not do, through the product."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.evaluate import adapter_exact_match
from examples.quickstart import prepare
from examples.samples import read_jsonl
from tests.jobs import job_env, run_job


@pytest.mark.slow
def test_smollm2_learns_the_synthetic_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job, model_dir, held_out = prepare(tmp_path)
    rows = read_jsonl(held_out)
    before = adapter_exact_match(model_dir, None, rows)
    done = run_job(["run", "--manifest", str(job)], job_env(tmp_path / "cache"))
    assert done.code == 0, done.stderr[-3000:]
    after = adapter_exact_match(model_dir, tmp_path / "output" / "adapter", rows)
    record = json.loads((tmp_path / "output" / "run.json").read_text())
    figures = {
        "exact_match_before": before,
        "exact_match_after": after,
        "rows": len(rows),
        "steps": record["steps"],
        "train_seconds": record["timings"]["train_seconds"],
    }
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    with capsys.disabled():
        print(f"\nSmolLM2-135M held-out exact match: {figures}")
    assert before <= 0.1
    assert after >= 0.8
