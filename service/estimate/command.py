"""`spotlora estimate -f job.yaml`: the job's time and cost on each candidate GPU type,
printed as a table or as JSON. Reads config.json, the tokenizer and the data; no weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog
import yaml

from service.errors import ExitCode, ManifestError
from service.estimate import candidates, interruption_basis, local_source, one
from service.estimate.gpus import DEFAULT_PRICES
from service.estimate.past import Past, read_history
from service.manifest.spec import JobSpec

log = structlog.get_logger(__name__)


def price_table(path: Path | None) -> tuple[dict[str, Any], str]:
    from service.ledger import load_price_table

    if path is None:
        return DEFAULT_PRICES, "built-in illustrative prices (k8s/base/prices.yaml)"
    try:
        return load_price_table(path), str(path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ManifestError(f"estimate: price table {path}: {err}") from None


def own_history(spec: JobSpec) -> Past:
    """The job's own output, if earlier runs left records there; nothing if unreadable."""
    try:
        return read_history([spec.output.uri])
    except Exception as err:  # no output yet, or storage out of reach from here
        log.info("estimate_no_history", uri=spec.output.uri, reason=str(err))
        return Past()


def estimate_job(
    spec: JobSpec,
    *,
    cache_dir: Path,
    hf_token: str | None,
    table: dict[str, Any],
    instance_types: list[str],
    history: list[str],
) -> dict[str, Any]:
    from service import data
    from service.estimate.job import shape_and_tokens
    from service.memory import preflight_estimate

    chosen = candidates(table, instance_types)
    if not chosen:
        raise ManifestError("estimate: no instance type in the price table has a known GPU")
    past = read_history(history) if history else own_history(spec)
    dataset = data.load_dataset(spec.data, cache_dir)
    shape, lengths, config = shape_and_tokens(spec, dataset.train, hf_token)
    memory = preflight_estimate(spec, config)
    local = local_source(spec)
    return {
        "job": spec.model.source,
        "shape": vars(shape),
        "sequences": len(lengths.lengths),
        "tokens_per_epoch": lengths.per_epoch,
        "tokens_per_sequence": round(lengths.per_row, 1),
        "interruptions": interruption_basis(past),
        "candidates": [
            one(spec, shape, lengths, memory, c, past, local_model=local) for c in chosen
        ],
    }


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:,.1f}"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def render(result: dict[str, Any], prices: str) -> str:
    shape, basis = result["shape"], result["interruptions"]
    lines = [
        f"# {result['job']}: {shape['params'] / 1e9:.2f} B params; {result['sequences']:,} "
        f"sequences, {result['tokens_per_epoch']:,} tokens an epoch",
        f"# interruptions: one every {basis['mean_time_between_interruptions_seconds'] / 3600:.1f}"
        f" h ({basis['history_interruptions']} in {basis['history_running_seconds'] / 3600:.1f}"
        f" h over {basis['history_runs']} earlier runs, and the 6 h prior); prices: {prices}",
        f"{'INSTANCE':30} {'GPU':9} {'FITS':4} {'MICRO':>5} {'TOK/S':>8} {'TRAIN MIN':>9} "
        f"{'PREEMPT MIN':>11} {'WALL MIN':>9} {'SPOT $':>8} {'ON-DEMAND $':>11}  BASIS",
    ]
    notes = []
    for c in result["candidates"]:
        if not c["fits"]:
            lines.append(f"{c['instance_type']:30} {c['gpu']:9} {'no':4}")
            notes.append(f"# {c['instance_type']}: {c['reason']}")
            continue
        rate = c["throughput"]
        basis_text = rate["basis"]
        if rate["runs"]:
            off = ", ".join(f"{r['run_id']} {r['prior_off_percent']:+.0f}%" for r in rate["runs"])
            basis_text += f" (prior off: {off})"
        lines.append(
            f"{c['instance_type']:30} {c['gpu']:9} {'yes':4} {c['micro_batch']:>5} "
            f"{c['tokens_per_second']:>8,.0f} {_minutes(c['train_seconds']):>9} "
            f"{_minutes(c['preemption_overhead_seconds']):>11} {_minutes(c['wall_seconds']):>9} "
            f"{_usd(c['spot_usd']):>8} {_usd(c['on_demand_usd']):>11}  {basis_text}"
        )
    return "\n".join(lines + notes) + "\n"


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1) + "\n"


def memory_report(spec: JobSpec, gpu_memory_gib: float) -> str:
    """``spotlora validate --gpu-memory-gib``: YAML comments, so the output stays a valid
    manifest."""
    from service.fetch import fetch_config
    from service.memory import auto_batch_size, preflight_estimate

    estimate = preflight_estimate(spec, fetch_config(spec.model))
    limit = int(gpu_memory_gib * 2**30)
    batch = spec.training.batch_size
    if batch == "auto":
        batch = auto_batch_size(estimate, limit)
        how = f"batch_size auto -> {batch}"
    else:
        how = f"batch_size {batch}"
    peak = estimate.total_bytes(batch) / 2**30
    verdict = "fits" if peak <= gpu_memory_gib else "does NOT fit"
    return (
        f"# memory estimate for a {gpu_memory_gib:g} GiB GPU: {how}, "
        f"max_length {spec.data.max_length}: peak ~{peak:.2f} GiB ({verdict}); "
        f"fixed {estimate.fixed_bytes / 2**30:.2f} GiB + "
        f"{estimate.per_sequence_bytes / 2**30:.3f} GiB per sequence\n"
    )


def main(args: Any, spec: JobSpec, settings: Any) -> ExitCode:
    """``settings``: service.settings.RuntimeSettings."""
    import sys

    from service.logging import route_library_logging

    route_library_logging(progress_bars=sys.stderr.isatty())
    table, prices = price_table(args.price_table or settings.price_table)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    result = estimate_job(
        spec,
        cache_dir=settings.cache_dir,
        hf_token=token,
        table=table,
        instance_types=args.instance_type,
        history=args.history,
    )
    sys.stdout.write(dumps(result) if args.json else render(result, prices))
    return ExitCode.OK
