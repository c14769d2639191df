"""The pieces of examples/readme_report.py, which renders docs/report.png from a real CPU run
preempted twice. The run itself takes minutes, so it is not repeated here: these check that
its job is valid, that each attempt gets the signal it should, that the prices it names
exist, and that the picture carries the bill."""

from __future__ import annotations

import signal
from pathlib import Path

from examples import readme_report
from service.ledger import load_price_table
from service.manifest import validate_document
from service.report import bill_line
from tests.test_report import PNG_MAGIC, run_record


def test_job_is_valid_and_checkpoints_before_each_signal(tmp_path: Path) -> None:
    doc = readme_report.readme_job(
        tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "out"
    )
    job = validate_document(doc, "readme_report")
    assert job.spec.training.batch_size == "auto"
    assert job.spec.evaluation.samples == 0 and not job.spec.evaluation.metrics
    assert not job.spec.export.merged
    every = job.spec.checkpoint.every_steps
    assert every is not None
    steps = [step for step, _ in readme_report.PREEMPTIONS]
    assert steps == sorted(steps) and steps[-1] < readme_report.MAX_STEPS
    # The SIGKILL lands past a checkpoint, so its attempt gains steps and loses some.
    assert steps[1] % every != 0 and steps[1] // every > steps[0] // every


def test_each_preempted_attempt_signals_once_at_its_step() -> None:
    decide = readme_report.signal_for
    assert [decide(step, 0) for step in (39, 40, 41)] == [None, signal.SIGTERM, signal.SIGTERM]
    assert [decide(step, 1) for step in (94, 95)] == [None, signal.SIGKILL]
    assert decide(readme_report.MAX_STEPS, 2) is None
    assert readme_report.EXPECTED_EXITS == (75, -signal.SIGKILL, 0)


def test_the_named_instance_type_is_priced() -> None:
    row = load_price_table(readme_report.PRICES)[readme_report.INSTANCE_TYPE]
    assert 0 < row["spot_hour_usd"] < row["on_demand_hour_usd"]


def test_render_draws_the_bill(tmp_path: Path) -> None:
    import json

    record = run_record()
    record["cost"] = {
        "attempts": 2,
        "total_usd": 0.0123,
        "lost_to_preemption_usd": 0.0011,
        "lost_work_seconds": 30.0,
        "restart_seconds": 30.0,
        "on_demand_usd": 0.0301,
    }
    (tmp_path / "run.json").write_text(json.dumps(record))
    png = readme_report.render(tmp_path / "run.json", tmp_path / "docs" / "report.png")
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert bill_line(record["cost"]) == (
        "cost $0.0123, lost to preemption $0.0011 (1.0 min); on demand, the same run: $0.0301"
    )
    assert bill_line({}) is None
