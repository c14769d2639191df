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


def test_each_second_is_counted_once() -> None:
    """Two restarts killed while they loaded (600 s each, no training) between a preempted
    attempt and the one that finishes. Lost: the preempted attempt's 50 s of work and the
    three repeated start-ups (600 + 600 + 60), 1,310 s; a start-up is never lost work too."""
    first = attempt("preempted", 0, 3600, last_step=100, committed_step=100, lost_seconds=50.0)
    loading = [
        attempt("killed", start, start + 600, start_step=100, train_started_unix=None)
        for start in (3700, 4400)
    ]
    last = attempt("done", 5100, 8700, start_step=100, last_step=200)
    rows = [ledger.row(a) for a in (first, *loading, last)]
    assert [r["setup_seconds"] for r in rows] == [60, 600, 600, 60]
    assert [r["lost_seconds"] for r in rows] == [50, 0, 0, 0]
    bill = ledger.totals(rows, 1000)
    assert bill["lost_work_seconds"] == 50 and bill["restart_seconds"] == 1260
    assert bill["lost_to_preemption_usd"] == pytest.approx(1310 / 3600 * 0.36)
    seconds = 3600 + 600 + 600 + 3600
    assert bill["on_demand_usd"] == pytest.approx((seconds - 1310) / 3600 * 1.2, abs=1e-4)
    # Whatever an attempt recorded, its lost work fits in its time after setup.
    odd = ledger.row(attempt("preempted", 0, 100, lost_seconds=500.0))
    assert odd["lost_seconds"] == 40 and odd["setup_seconds"] == 60


def test_killed_and_preempted_attempts_lose_work_from_the_committed_step() -> None:
    """One definition: from the end of the step the committed checkpoint holds, not from the
    end of its upload (which ended 100 s later here)."""
    killed = attempt(
        "killed", 0, 1500, last_step=50, committed_step=40, committed_step_ended_unix=1000.0,
        events=[{"type": "checkpoint", "step": 40, "time": 1100.0}],
    )  # fmt: skip
    assert ledger.row(killed)["lost_seconds"] == 500
    no_commit = attempt("killed", 0, 1500, last_step=50)
    assert ledger.row(no_commit)["lost_seconds"] == 1500 - 60  # since training began
    assert ledger.lost_work_seconds(1000.0, 60.0, 1500.0) == 500  # a stop's, the same way
    assert ledger.lost_work_seconds(None, None, 1500.0) == 0  # never trained: nothing lost


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{spot_hour_usd: 1.6, gpus: [4]}", "gpus must be an integer"),
        ("{spot_hour_usd: 1.6, gpus: 0}", "gpus must be an integer"),
        ("{spot_hour_usd: 1.6, gpus: 1.5}", "gpus must be an integer"),
        ("{spot_hour_usd: -0.2}", "spot_hour_usd must be a finite price above 0"),
        ("{spot_hour_usd: .nan}", "spot_hour_usd must be a finite price above 0"),
        ("{spot_hour_usd: 0.2, on_demand_hour_usd: .inf}", "on_demand_hour_usd must be a finite"),
        ('{spot_hour_usd: "0.2"}', "spot_hour_usd must be a number"),
        ("{spot_hour_usd: 0.2, gpu: 4}", "gpu must name one of T4"),
        ("{spot_hour_usd: 0.2, gpu: T5}", "gpu must name one of T4"),
        ("{spot_hour_usd: 0.2, gpus: 1, cuda: 12}", "unknown keys ['cuda']"),
        ("0.2", "expected a mapping"),
    ],
)
def test_a_bad_price_table_entry_leaves_the_attempt_unpriced_with_a_warning(
    tmp_path: Path, entry: str, problem: str
) -> None:
    from structlog.testing import capture_logs

    table = tmp_path / "prices.yaml"
    table.write_text(f"g4dn.xlarge: {entry}\ng4dn.2xlarge: {{spot_hour_usd: 0.3}}\n")
    with capture_logs() as logs:
        price = ledger.resolve_price(
            manifest=(None, None), environment=(None, None), table_path=table,
            instance_type="g4dn.xlarge",
        )  # fmt: skip
    assert price == ledger.NO_PRICE
    (warning,) = [e for e in logs if e["event"] == "price_table_entry_invalid"]
    assert warning["instance_type"] == "g4dn.xlarge" and problem in warning["problem"]
    # The table's other entries still price their attempts.
    other = ledger.resolve_price(
        manifest=(None, None), environment=(None, None), table_path=table,
        instance_type="g4dn.2xlarge",
    )  # fmt: skip
    assert other == ledger.Price(0.3, None, "table:g4dn.2xlarge")


def test_a_price_table_entry_may_name_its_gpu(tmp_path: Path) -> None:
    """`spotlora estimate` reads an entry's ``gpu``; the ledger prices the entry as ever."""
    table = tmp_path / "prices.yaml"
    table.write_text("box: {spot_hour_usd: 0.4, on_demand_hour_usd: 1.0, gpus: 2, gpu: L4}\n")
    price = ledger.resolve_price(
        manifest=(None, None), environment=(None, None), table_path=table, instance_type="box"
    )
    assert price == ledger.Price(0.2, 0.5, "table:box")


def test_records_are_strict_json() -> None:
    import json

    from service.storage import record_bytes

    record = {"loss": float("nan"), "usd": [float("inf"), 1.5], "nested": {"x": -float("inf")}}

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(record_bytes(record), parse_constant=refuse) == {
        "loss": None, "usd": [None, 1.5], "nested": {"x": None},
    }  # fmt: skip
