"""A seeded simulation of checkpoint intervals against interruption processes.

A job runs RUNS_PER_JOB times (a nightly retraining, say), each run needing WORK seconds of
training. Interruptions that lose work (a reclaim whose final
checkpoint does not land, a lost node, a kill) arrive as a Poisson process with a given mean
time between them; each costs the work since the last commit plus a restart (the model is
loaded again). Every checkpoint blocks training for CHECKPOINT seconds. A policy's waste is
the wall time beyond WORK, averaged over the job's runs. `auto` is the product's own policy
(service.checkpoint.interval): from the stated prior, it learns the interruption rate from the
ledger, which carries over from one run of the job to the next.

    .venv/bin/python -m tests.interval_sim          prints the table of the docs
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable

from service.checkpoint.interval import AutoInterval

WORK_SECONDS = 8 * 3600.0
CHECKPOINT_SECONDS = 1.0  # blocking part of a save
RESTART_SECONDS = 60.0  # a new pod: imports, model load, resume
FIXED = {"1 min": 60.0, "5 min": 300.0, "30 min": 1800.0}
MTBI = {"15 min": 900.0, "1 h": 3600.0, "4 h": 4 * 3600.0, "1 day": 86400.0}
RUNS_PER_JOB = 5
JOBS = 100

Policy = Callable[[], "Interval"]


class Interval:
    def seconds(self, running_seconds: float) -> float:
        raise NotImplementedError

    def saved(self) -> None:
        pass

    def interrupted(self, seconds: float) -> None:
        pass

    def finished(self, seconds: float) -> None:
        pass


class Fixed(Interval):
    def __init__(self, every: float) -> None:
        self.every = every

    def seconds(self, running_seconds: float) -> float:
        return self.every


class Auto(Interval):
    """What the product does: each attempt starts from the ledger (time run, interruptions)."""

    def __init__(self) -> None:
        self.policy = AutoInterval(log_changes=False)

    def seconds(self, running_seconds: float) -> float:
        return self.policy.seconds(running_seconds)

    def saved(self) -> None:
        self.policy.saved(CHECKPOINT_SECONDS)

    def interrupted(self, seconds: float) -> None:
        self.policy.history_seconds += seconds
        self.policy.history_interruptions += 1

    def finished(self, seconds: float) -> None:
        self.policy.history_seconds += seconds


def waste(policy: Interval, mtbi: float, rng: random.Random) -> float:
    """Wall seconds beyond the work itself, for one run."""
    committed, wall = 0.0, 0.0
    while committed < WORK_SECONDS:
        until_interruption = rng.expovariate(1.0 / mtbi)
        running = 0.0  # in this attempt
        while committed < WORK_SECONDS:
            segment = min(policy.seconds(running), WORK_SECONDS - committed)
            cost = segment + CHECKPOINT_SECONDS
            if until_interruption < cost:
                wall += until_interruption + RESTART_SECONDS
                policy.interrupted(running + until_interruption)
                break
            until_interruption -= cost
            running += cost
            wall += cost
            committed += segment
            policy.saved()
        else:
            policy.finished(running)
    return wall - WORK_SECONDS


def job_waste(make: Callable[[], Interval], mtbi: float, rng: random.Random) -> float:
    """Mean waste per run over one job's runs; the policy (and its ledger) lives across them."""
    policy = make()
    return statistics.fmean(waste(policy, mtbi, rng) for _ in range(RUNS_PER_JOB))


def table(jobs: int = JOBS, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean waste in minutes per run: {mtbi label: {policy label: minutes}}."""
    policies: dict[str, Callable[[], Interval]] = {
        **{name: (lambda every=every: Fixed(every)) for name, every in FIXED.items()},
        "auto": Auto,
    }
    out: dict[str, dict[str, float]] = {}
    for label, mtbi in MTBI.items():
        out[label] = {}
        for name, make in policies.items():
            rng = random.Random(f"{seed}-{label}")  # the same interruptions for every policy
            runs = [job_waste(make, mtbi, rng) for _ in range(jobs)]
            out[label][name] = statistics.fmean(runs) / 60
    return out


def main() -> None:
    result = table()
    names = [*FIXED, "auto"]
    print(
        f"Mean waste per run, minutes beyond {WORK_SECONDS / 3600:g} h of work (checkpoint "
        f"{CHECKPOINT_SECONDS:g} s, restart {RESTART_SECONDS:g} s; {JOBS} seeded jobs of "
        f"{RUNS_PER_JOB} runs each)\n"
    )
    print("| mean time between interruptions | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, row in result.items():
        print(f"| {label} | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
