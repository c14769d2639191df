"""`spotlora estimate`: how long a job takes and what it costs on each GPU type, preemptions
included, before it runs; and the same estimate recorded at a run's start, beside what the
run then measured (run.json's ``estimate`` and ``throughput``).

For each candidate instance type: the micro-batch ``auto`` would pick there (the memory
estimate of service.memory), tokens per second (service.estimate.throughput: a prior from the
GPU's peaks, corrected by measured runs), the training time for the job's tokens, and the
expected cost of interruptions at the rate the ledger saw: each costs a start-up and half a
checkpoint interval of lost work, and every checkpoint blocks training for a moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.checkpoint.interval import (
    MAX_INTERVAL_SECONDS,
    MIN_INTERVAL_SECONDS,
    PRIOR_CHECKPOINT_SECONDS,
    mean_time_between_interruptions,
    young_daly_seconds,
)
from service.errors import ManifestError
from service.estimate.gpus import CPU, GPUS, gpu_of_instance
from service.estimate.past import Past
from service.estimate.throughput import Shape, Workload, estimate
from service.manifest.spec import JobSpec
from service.memory import CPU_BATCH_SIZE, MemoryEstimate, auto_batch_size

# Start-up before the first step when no earlier run measured one: 25 s from process start
# to the first step on a 7B from local disk (docs/performance.md, restart), plus the fp16
# weights' download from S3 or the Hub at an assumed 200 MB/s for a model not on local disk.
SETUP_PRIOR_SECONDS = 25.0
DOWNLOAD_BYTES_PER_SECOND = 200e6


@dataclass(frozen=True)
class Candidate:
    instance_type: str
    gpu: str
    gpu_hour_usd: float | None  # per GPU-hour, as the ledger prices an attempt
    on_demand_gpu_hour_usd: float | None


def candidates(table: dict[str, Any], wanted: list[str]) -> list[Candidate]:
    """The price table's instance types (those named, or every one whose GPU is known)."""
    names = wanted or list(table)
    found = []
    for name in names:
        entry = table.get(name)
        if not isinstance(entry, dict):
            raise ManifestError(f"estimate: --instance-type {name}: not in the price table")
        gpu = gpu_of_instance(name, entry)
        if gpu is None:
            if wanted:
                raise ManifestError(
                    f"estimate: --instance-type {name}: unknown GPU; add gpu: T4 (or L4, A10G, "
                    f"{', '.join(g for g in GPUS if g not in ('T4', 'L4', 'A10G'))}, cpu) "
                    "to its price table entry"
                )
            continue
        spot, on_demand = _per_gpu(entry, "spot_hour_usd"), _per_gpu(entry, "on_demand_hour_usd")
        found.append(Candidate(name, gpu, spot, on_demand))
    return found


def _per_gpu(entry: dict[str, Any], key: str) -> float | None:
    """A price table's instance-hour price per GPU; None where it is not a usable price."""
    value, gpus = entry.get(key), entry.get("gpus", 1)
    if not isinstance(value, int | float) or not isinstance(gpus, int) or gpus < 1:
        return None
    return float(value) / gpus if math.isfinite(value) and value > 0 else None


def micro_batch(spec: JobSpec, memory: MemoryEstimate, gpu: str) -> tuple[int | None, str]:
    """The micro-batch a run picks on this GPU, or None with why it does not fit."""
    requested = spec.training.batch_size
    if gpu == CPU:
        return (CPU_BATCH_SIZE if requested == "auto" else requested), ""
    limit = int(GPUS[gpu].memory_gib * 2**30)
    if requested == "auto":
        try:
            return auto_batch_size(memory, limit), ""
        except ManifestError as err:
            return None, str(err)
    if memory.total_bytes(requested) > limit:
        return None, (
            f"batch_size {requested} needs ~{memory.total_bytes(requested) / 2**30:.1f} GiB of "
            f"{GPUS[gpu].memory_gib:g}"
        )
    return requested, ""


def checkpoint_interval(spec: JobSpec, mtbi: float, step_seconds: float, train: float) -> float:
    """Seconds between commits as the run would pace them (``every_seconds: auto`` at the
    prior save cost), capped by ``every_steps``; the whole run if it never checkpoints."""
    ckpt = spec.checkpoint
    if ckpt.every_seconds == "auto":
        seconds = young_daly_seconds(PRIOR_CHECKPOINT_SECONDS, mtbi)
        seconds = min(max(seconds, MIN_INTERVAL_SECONDS), MAX_INTERVAL_SECONDS)
    else:
        seconds = float(ckpt.every_seconds) if ckpt.every_seconds else math.inf
    if ckpt.every_steps:
        seconds = min(seconds, ckpt.every_steps * step_seconds)
    return min(seconds, train)


def one(
    spec: JobSpec,
    shape: Shape,
    lengths: Any,  # service.estimate.job.Tokens
    memory: MemoryEstimate | None,
    cand: Candidate,
    past: Past,
    *,
    micro: int | None = None,
    local_model: bool = True,
    world_size: int = 1,
) -> dict[str, Any]:
    """The estimate for one candidate, as a JSON-ready dict (``micro``: a known micro-batch)."""
    out: dict[str, Any] = {"instance_type": cand.instance_type, "gpu": cand.gpu}
    why = ""
    if micro is None:
        assert memory is not None
        micro, why = micro_batch(spec, memory, cand.gpu)
        if cand.gpu != CPU and micro is not None:
            out["peak_gib"] = round(memory.total_bytes(micro) / 2**30, 2)
    out.update(fits=micro is not None, micro_batch=micro)
    if micro is None:
        return {**out, "reason": why}
    accumulation = spec.training.gradient_accumulation
    tokens, steps = lengths.trained(spec, micro, accumulation, world_size)
    work = Workload(cand.gpu, shape, micro, lengths.per_row, spec.training.gradient_checkpointing)
    rate = estimate(work, past.measured)
    train = tokens / (rate.tokens_per_second * world_size)
    download = 0.0 if local_model else shape.params * 2 / DOWNLOAD_BYTES_PER_SECOND
    setup = past.setup_seconds(cand.gpu) or SETUP_PRIOR_SECONDS + download
    mtbi = mean_time_between_interruptions(past.running_seconds, past.interruptions)
    interval = checkpoint_interval(spec, mtbi, train / max(steps, 1), train)
    interruptions = train / mtbi
    overhead = interruptions * (setup + interval / 2) + (train / interval) * (
        PRIOR_CHECKPOINT_SECONDS if interval < train else 0.0
    )
    wall = setup + train + overhead

    def usd(seconds: float, rate_usd: float | None) -> float | None:
        return None if rate_usd is None else round(seconds / 3600 * rate_usd * world_size, 4)

    return {
        **out,
        "tokens": tokens,
        "steps": steps,
        "throughput": rate.as_dict(),
        "tokens_per_second": round(rate.tokens_per_second, 1),
        "train_seconds": round(train, 1),
        "setup_seconds": round(setup, 1),
        "checkpoint_interval_seconds": round(interval, 1),
        "expected_interruptions": round(interruptions, 3),
        "preemption_overhead_seconds": round(overhead, 1),
        "wall_seconds": round(wall, 1),
        "spot_usd": usd(wall, cand.gpu_hour_usd),
        "on_demand_usd": usd(setup + train, cand.on_demand_gpu_hour_usd),
    }


def interruption_basis(past: Past) -> dict[str, Any]:
    return {
        "mean_time_between_interruptions_seconds": round(
            mean_time_between_interruptions(past.running_seconds, past.interruptions)
        ),
        "history_running_seconds": round(past.running_seconds, 1),
        "history_interruptions": past.interruptions,
        "history_runs": past.runs,
    }


def local_source(spec: JobSpec) -> bool:
    return Path(spec.model.source).expanduser().is_dir()


def measured(
    started: dict[str, Any] | None,
    trainer: Any,
    timings: dict[str, float],
    setup_seconds: float | None,
) -> dict[str, Any] | None:
    """What this attempt's training measured, for the next estimates (run.json's
    ``throughput``): the workload the start-up estimate described, its tokens (trl's count
    for this trainer: non-padding tokens), its training seconds, and its start-up as the
    ledger counts it (``setup_seconds``)."""
    if not started or trainer is None or "shape" not in started:
        return None
    tokens = float(getattr(trainer, "_total_train_tokens", 0) or 0)
    seconds = timings.get("train_seconds", 0.0) - timings.get("setup_seconds", 0.0)
    if tokens <= 0 or seconds <= 0:
        return None
    keys = ("gpu", "shape", "micro_batch", "gradient_accumulation", "tokens_per_row")
    return {
        **{k: started[k] for k in keys},
        "gradient_checkpointing": started.get("gradient_checkpointing", True),
        "world_size": started.get("world_size", 1),
        "trained_tokens": int(tokens),
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds / started.get("world_size", 1), 3),
        "setup_seconds": setup_seconds,
    }


def versus(estimate: dict[str, Any] | None, cost: dict[str, Any]) -> str:
    """``runs list``'s columns: estimated/actual minutes (all attempts' wall time), and the
    estimated spot cost (the actual is its COST column)."""
    est = estimate or {}
    wall, usd = est.get("wall_seconds"), est.get("spot_usd")
    minutes = f"{wall / 60:.1f}" if isinstance(wall, int | float) else "-"
    actual = cost.get("seconds")
    minutes += f"/{actual / 60:.1f}" if isinstance(actual, int | float) else "/-"
    return f"{minutes:>13} {f'{usd:.4f}' if isinstance(usd, int | float) else '-':>9}"
