"""The cost ledger: prices from the manifest, the environment or a price table; rows and totals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service import ledger


def attempt(outcome: str, start: float, end: float, **fields: Any) -> dict[str, Any]:
    return {
        "pod": f"pod-{start:.0f}",
        "started_unix": start,
        "ended_unix": end if outcome != "killed" else None,
        "updated_unix": end,
        "train_started_unix": start + 60,
        "outcome": outcome,
        "start_step": 0,
        "last_step": 0,
        "gpus": 1,
        "gpu_hour_usd": 0.36,
        "on_demand_gpu_hour_usd": 1.2,
        "events": [],
        **fields,
    }


def test_prices_come_from_the_first_source_that_names_one(tmp_path: Path) -> None:
    table = tmp_path / "prices.yaml"
    table.write_text("g4dn.12xlarge: {spot_hour_usd: 1.6, on_demand_hour_usd: 3.912, gpus: 4}\n")
    from_table = ledger.resolve_price(
        manifest=(None, None), environment=(None, None), table_path=table,
        instance_type="g4dn.12xlarge",
    )  # fmt: skip
    assert from_table == ledger.Price(0.4, 0.978, "table:g4dn.12xlarge")
    env = ledger.resolve_price(
        manifest=(None, None), environment=(0.5, 1.0), table_path=table,
        instance_type="g4dn.12xlarge",
    )  # fmt: skip
    assert env.source == "environment" and env.gpu_hour_usd == 0.5
    manifest = ledger.resolve_price(
        manifest=(0.2, None), environment=(0.5, 1.0), table_path=table, instance_type=None
    )
    assert manifest == ledger.Price(0.2, None, "manifest")
    unknown = ledger.resolve_price(
        manifest=(None, None), environment=(None, None), table_path=table, instance_type="p5"
    )
    assert unknown == ledger.NO_PRICE


def test_an_unreadable_price_table_means_no_price_not_a_failed_run(tmp_path: Path) -> None:
    (tmp_path / "prices.yaml").write_text("- not\n- a mapping\n")
    price = ledger.resolve_price(
        manifest=(None, None), environment=(None, None), table_path=tmp_path / "prices.yaml",
        instance_type="g4dn.xlarge",
    )  # fmt: skip
    assert price == ledger.NO_PRICE


def test_rows_and_totals_of_a_run_preempted_then_killed_then_done() -> None:
    first = attempt("preempted", 0, 3600, last_step=100, committed_step=100, lost_seconds=30.0)
    second = attempt(
        "killed", 3700, 5500, start_step=100, last_step=150, committed_step=140,
        events=[{"type": "checkpoint", "step": 140, "time": 5200}],
    )  # fmt: skip
    third = attempt("done", 5600, 9200, start_step=140, last_step=300)
    rows = [ledger.row(a) for a in (first, second, third)]
    assert [r["steps_gained"] for r in rows] == [100, 40, 160]
    assert [r["lost_seconds"] for r in rows] == [30.0, 300.0, 0.0]  # killed: last sign of life
    assert rows[0]["cost_usd"] == pytest.approx(0.36)
    history = [{"loss": 1.0, "num_tokens": 1000}, {"loss": 0.9, "num_tokens": 400}]
    bill = ledger.totals(rows, ledger.trained_tokens(history))
    assert bill["attempts"] == 3 and bill["preemptions"] == 2 and bill["interruptions"] == 2
    assert bill["trained_tokens"] == 1400  # the count restarted with the second trainer
    seconds = 3600 + 1800 + 3600
    assert bill["total_usd"] == pytest.approx(seconds / 3600 * 0.36)
    # Lost: 330 s of work plus two repeated start-ups of 60 s each.
    assert bill["lost_work_seconds"] == 330 and bill["restart_seconds"] == 120
    assert bill["lost_to_preemption_usd"] == pytest.approx(450 / 3600 * 0.36)
    assert bill["on_demand_usd"] == pytest.approx((seconds - 450) / 3600 * 1.2)
    assert bill["per_million_tokens_usd"] == pytest.approx(bill["total_usd"] / 0.0014, rel=1e-3)
    assert ledger.interruptions(rows) == (seconds - 180, 2)


def test_no_total_when_an_attempt_had_no_price() -> None:
    rows = [ledger.row(attempt("done", 0, 60, gpu_hour_usd=None))]
    bill = ledger.totals(rows, 10)
    assert bill["total_usd"] is None and bill["attempts"] == 1
