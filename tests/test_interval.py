"""checkpoint.every_seconds: auto, against fixed intervals, over seeded interruption processes."""

from __future__ import annotations

import math

import pytest

from service.checkpoint.interval import (
    MAX_INTERVAL_SECONDS,
    MIN_INTERVAL_SECONDS,
    AutoInterval,
    mean_time_between_interruptions,
    young_daly_seconds,
)
from tests import interval_sim


def test_young_daly_and_the_prior() -> None:
    assert young_daly_seconds(2.0, 3600) == pytest.approx(120.0)
    # No history: the prior alone (one interruption in six hours).
    assert mean_time_between_interruptions(0, 0) == 6 * 3600
    # Much history: the observed rate wins.
    assert mean_time_between_interruptions(1000 * 3600, 1000) == pytest.approx(3600, rel=0.01)


def test_auto_follows_measured_costs_and_stays_in_bounds() -> None:
    policy = AutoInterval(history_seconds=10 * 3600, history_interruptions=9, log_changes=False)
    before = policy.seconds()
    policy.saved(blocking_seconds=8.0)  # the first measurement replaces the prior
    assert policy.seconds() == pytest.approx(math.sqrt(2 * 8.0 * (6 + 10) * 3600 / (1 + 9)))
    assert policy.seconds() > before
    policy.saved(blocking_seconds=0.1, upload_seconds=900.0)  # uploads slower than saves
    assert policy.seconds() == 900.0  # never queue uploads behind each other
    assert AutoInterval(checkpoint_seconds=1e-6, log_changes=False).seconds() == (
        MIN_INTERVAL_SECONDS
    )
    slow = AutoInterval(checkpoint_seconds=600, history_seconds=1e7, log_changes=False)
    assert slow.seconds() == MAX_INTERVAL_SECONDS


def test_auto_loses_less_than_fixed_intervals_across_interruption_rates() -> None:
    result = interval_sim.table()
    for fixed in interval_sim.FIXED:
        total_fixed = sum(row[fixed] for row in result.values())
        total_auto = sum(row["auto"] for row in result.values())
        assert total_auto < total_fixed, (fixed, result)
        for rate, row in result.items():
            # Near a fixed interval's own optimum the waste curve is flat: within 2% there.
            assert row["auto"] <= row[fixed] * 1.02, (rate, fixed, row)
