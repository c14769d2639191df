"""What a run cost, attempt by attempt, and what preemptions took from it.

Each attempt (one pod's life, service.attempts) is priced at its start from the first of:
the manifest (``spec.cost``), the environment (``SPOTLORA_GPU_HOUR_USD``), or the price
table a platform engineer keeps in a ConfigMap (``SPOTLORA_PRICE_TABLE``), looked up by the
attempt's instance type (``SPOTLORA_INSTANCE_TYPE``, else the cloud's metadata server). The
ledger then turns the attempts into rows and totals for run.json, the metrics, ``spotlora
runs list`` and the report: dollars spent, dollars lost to preemption (work after the last
commit, and every restart's start-up), dollars per million trained tokens, and what the same
run would have cost on demand.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from service.estimate.gpus import CPU, GPUS
from service.manifest.spec import JobSpec
from service.settings import RuntimeSettings

log = structlog.get_logger(__name__)

METADATA_TIMEOUT_SECONDS = 2.0
MAX_PRICE_TABLE_BYTES = 1 << 20


@dataclass(frozen=True)
class Price:
    gpu_hour_usd: float | None
    on_demand_gpu_hour_usd: float | None
    source: str  # where the figures came from: "manifest", "environment", "table:<type>", "none"


NO_PRICE = Price(None, None, "none")


def load_price_table(path: Path) -> dict[str, dict[str, float]]:
    """``<instance type>: {spot_hour_usd, on_demand_hour_usd, gpus}`` (YAML or JSON); prices
    per instance-hour, as the clouds list them."""
    with path.open("rb") as f:
        raw = f.read(MAX_PRICE_TABLE_BYTES + 1)
    if len(raw) > MAX_PRICE_TABLE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_PRICE_TABLE_BYTES} bytes")
    table = yaml.safe_load(raw.decode())
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a mapping of instance types")
    return table


def price_from_table(table: dict[str, Any], instance_type: str) -> Price:
    """The entry's prices per GPU-hour. An entry that is not what the table's format says
    (a price that is not a finite positive number, ``gpus`` not an integer of at least 1)
    leaves the attempt unpriced, with a warning naming it: a wrong bill is worse than none,
    and a platform engineer's typo must not fail every run on the cluster."""
    entry = table.get(instance_type)
    if entry is None:
        return NO_PRICE
    problem = _entry_problem(entry)
    if problem is not None:
        log.warning("price_table_entry_invalid", instance_type=instance_type, problem=problem)
        return NO_PRICE
    gpus = entry.get("gpus", 1)

    def per_gpu(key: str) -> float | None:
        value = entry.get(key)
        return None if value is None else float(value) / gpus

    return Price(per_gpu("spot_hour_usd"), per_gpu("on_demand_hour_usd"), f"table:{instance_type}")


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"expected a mapping of spot_hour_usd, on_demand_hour_usd, gpus, got {entry!r}"
    unknown = sorted(set(entry) - {"spot_hour_usd", "on_demand_hour_usd", "gpus", "gpu"})
    if unknown:
        return f"unknown keys {unknown}"
    named = entry.get("gpu")  # which GPU the instance carries, for `spotlora estimate`
    if named is not None and not (isinstance(named, str) and (named in GPUS or named == CPU)):
        return f"gpu must name one of {', '.join([*GPUS, CPU])}, got {named!r}"
    gpus = entry.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        return f"gpus must be an integer of at least 1, got {gpus!r}"
    for key in ("spot_hour_usd", "on_demand_hour_usd"):
        value = entry.get(key)
        if key == "on_demand_hour_usd" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{key} must be a number, got {value!r}"
        if not math.isfinite(value) or value <= 0:
            return f"{key} must be a finite price above 0, got {value!r}"
    return None


def resolve_price(
    *,
    manifest: tuple[float | None, float | None],
    environment: tuple[float | None, float | None],
    table_path: Path | None,
    instance_type: str | None,
) -> Price:
    """The first source that names a price wins; each gives spot and on-demand together."""
    if manifest[0] is not None:
        return Price(manifest[0], manifest[1], "manifest")
    if environment[0] is not None:
        return Price(environment[0], environment[1], "environment")
    if table_path is not None and instance_type:
        try:
            return price_from_table(load_price_table(table_path), instance_type)
        except (OSError, ValueError, yaml.YAMLError) as err:
            log.warning("price_table_unreadable", path=str(table_path), error=str(err))
    return NO_PRICE


def detect_instance_type(cloud: str, aws_endpoint: str, gce_endpoint: str) -> str | None:
    """The instance type from the cloud's metadata server (the downward API exposes no node
    labels, so a pod cannot read node.kubernetes.io/instance-type there)."""
    try:
        if cloud == "aws":
            token_req = urllib.request.Request(
                f"{aws_endpoint}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            )
            with urllib.request.urlopen(token_req, timeout=METADATA_TIMEOUT_SECONDS) as resp:
                token = resp.read().decode()
            req = urllib.request.Request(
                f"{aws_endpoint}/latest/meta-data/instance-type",
                headers={"X-aws-ec2-metadata-token": token},
            )
        elif cloud == "gce":
            req = urllib.request.Request(
                f"{gce_endpoint}/computeMetadata/v1/instance/machine-type",
                headers={"Metadata-Flavor": "Google"},
            )
        else:
            return None
        with urllib.request.urlopen(req, timeout=METADATA_TIMEOUT_SECONDS) as resp:
            return resp.read().decode().strip().rsplit("/", 1)[-1] or None
    except OSError as err:
        log.info("instance_type_unknown", cloud=cloud, error=str(err))
        return None


# --------------------------------------------------------------------------- rows and totals


def lost_work_seconds(
    committed_step_ended_unix: float | None, train_started_unix: float | None, until: float
) -> float:
    """The work an attempt that ended early loses, whether it was preempted or killed: the
    next attempt resumes at the step the committed checkpoint holds, so everything after
    training reached that step (or after training began, when this attempt committed none)
    is done again. Nothing before training began is work: start-up is counted apart, once
    (``setup_seconds``)."""
    start = committed_step_ended_unix or train_started_unix
    return 0.0 if start is None else max(until - start, 0.0)


def _committed_step_ended(attempt: dict[str, Any]) -> float | None:
    if attempt.get("committed_step") is None:
        return None
    if attempt.get("committed_step_ended_unix") is not None:
        return float(attempt["committed_step_ended_unix"])
    # A record written before the step's end was kept: its commit is the nearest bound.
    commits = [e["time"] for e in attempt.get("events", []) if e.get("type") == "checkpoint"]
    return max(commits, default=None)


def row(attempt: dict[str, Any]) -> dict[str, Any]:
    """One attempt as a ledger line."""
    started = attempt["started_unix"]
    ended = attempt.get("ended_unix") or attempt.get("updated_unix") or started
    outcome = attempt.get("outcome", "unknown")
    committed = attempt.get("committed_step")
    start_step = attempt.get("start_step", 0)
    if outcome == "done":
        gained, lost = attempt.get("last_step", start_step) - start_step, 0.0
    else:
        gained = (committed if committed is not None else start_step) - start_step
        recorded = attempt.get("lost_seconds")  # a stop's, to the moment it was asked for
        lost = (
            recorded
            if recorded is not None
            else lost_work_seconds(
                _committed_step_ended(attempt), attempt.get("train_started_unix"), ended
            )
        )
    train_started = attempt.get("train_started_unix")
    seconds = max(ended - started, 0.0)
    gpus = attempt.get("gpus") or 1
    rate = attempt.get("gpu_hour_usd")

    def dollars(s: float) -> float | None:
        return None if rate is None else round(s / 3600 * rate * gpus, 6)

    setup = max(train_started - started, 0.0) if train_started else seconds
    lost = min(lost, max(seconds - setup, 0.0))  # each second counted once
    return {
        "pod": attempt.get("pod"),
        "node": attempt.get("node"),
        "instance_type": attempt.get("instance_type"),
        "device": attempt.get("device"),
        "gpus": gpus,
        "started_unix": started,
        "ended_unix": ended,
        "outcome": outcome,
        "reason": attempt.get("reason"),
        "start_step": start_step,
        "last_step": attempt.get("last_step", start_step),
        "committed_step": committed,
        "seconds": round(seconds, 3),
        "setup_seconds": round(min(setup, seconds), 3),
        "steps_gained": max(gained, 0),
        "lost_seconds": round(lost, 3),
        "gpu_hour_usd": rate,
        "on_demand_gpu_hour_usd": attempt.get("on_demand_gpu_hour_usd"),
        "price_source": attempt.get("price_source", "none"),
        "cost_usd": dollars(seconds),
        "lost_usd": dollars(lost),
    }


def trained_tokens(log_history: Sequence[dict[str, Any]]) -> int:
    """Tokens trained over all attempts: trl's count restarts with each new trainer."""
    total, previous = 0.0, 0.0
    for entry in log_history:
        value = entry.get("num_tokens")
        if isinstance(value, int | float) and "loss" in entry:
            total += value - previous if value >= previous else value
            previous = value
    return int(total)


def totals(rows: Sequence[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """The run's bill. Lost to preemption: the work after each early stop's last commit, and
    the start-up every attempt after the first repeated. On demand: the time that was neither,
    at the on-demand price."""
    priced = [r for r in rows if r["cost_usd"] is not None]
    restarts = rows[1:]
    lost_seconds = sum(r["lost_seconds"] for r in rows)
    restart_seconds = sum(r["setup_seconds"] for r in restarts)
    running, ended_early = interruptions(rows)
    out: dict[str, Any] = {
        "currency": "USD",
        "attempts": len(rows),
        "preemptions": sum(r["outcome"] in ("preempted", "killed") for r in rows),
        "running_seconds": round(running, 3),
        "interruptions": ended_early,
        "seconds": round(sum(r["seconds"] for r in rows), 3),
        "lost_work_seconds": round(lost_seconds, 3),
        "restart_seconds": round(restart_seconds, 3),
        "trained_tokens": tokens,
        "total_usd": None,
        "lost_to_preemption_usd": None,
        "per_million_tokens_usd": None,
        "on_demand_usd": None,
    }
    if len(priced) != len(rows) or not rows:
        return out  # an attempt with no price: no total rather than a wrong one
    total = sum(r["cost_usd"] for r in rows)
    lost = sum(r["lost_usd"] for r in rows) + sum(
        r["setup_seconds"] / 3600 * r["gpu_hour_usd"] * r["gpus"] for r in restarts
    )
    out.update(
        total_usd=round(total, 6),
        lost_to_preemption_usd=round(lost, 6),
        per_million_tokens_usd=round(total / (tokens / 1e6), 6) if tokens else None,
    )
    on_demand = [r["on_demand_gpu_hour_usd"] for r in rows]
    if all(p is not None for p in on_demand):
        useful = [
            (r["seconds"] - r["lost_seconds"] - (r["setup_seconds"] if i else 0.0)) / 3600
            for i, r in enumerate(rows)
        ]
        out["on_demand_usd"] = round(
            sum(
                max(u, 0.0) * p * r["gpus"] for u, p, r in zip(useful, on_demand, rows, strict=True)
            ),
            4,
        )
    return out


def interruptions(rows: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """Running seconds and early ends in these rows: the rate the checkpoint interval is
    chosen from (service.checkpoint.interval)."""
    ended_early = sum(r["outcome"] in ("preempted", "killed", "failed") for r in rows)
    return sum(r["seconds"] - r["setup_seconds"] for r in rows), ended_early


def attempt_price(spec: JobSpec, settings: RuntimeSettings) -> tuple[str | None, Price]:
    """This attempt's instance type and price (see the module's docstring for the order)."""
    pre = spec.preemption
    instance = settings.instance_type or detect_instance_type(
        pre.spot_notice, pre.aws_metadata_endpoint, pre.gce_metadata_endpoint
    )
    price = resolve_price(
        manifest=(spec.cost.gpu_hour_usd, spec.cost.on_demand_gpu_hour_usd),
        environment=(settings.gpu_hour_usd, settings.on_demand_gpu_hour_usd),
        table_path=settings.price_table,
        instance_type=instance,
    )
    return instance, price
