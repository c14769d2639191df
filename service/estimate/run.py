"""The estimate a run makes of itself when it starts, from what it has then: its trainer's
sequences and micro-batch, its device and price, and the job's earlier runs."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from service.estimate import Candidate, interruption_basis, local_source, one
from service.estimate.gpus import gpu_of_device
from service.estimate.past import Past, read_storage
from service.manifest.spec import JobSpec
from service.storage import open_storage

log = structlog.get_logger(__name__)


def at_start(
    spec: JobSpec,
    trainer: Any,
    device_name: str,
    model_dir: Path,
    instance_type: str | None,
    price: Any,  # service.ledger.Price
    world_size: int,
) -> dict[str, Any] | None:
    """run.json's ``estimate``. Bookkeeping: any failure is logged, never raised."""
    try:
        from transformers import AutoConfig

        from service.estimate.job import Tokens, model_shape

        gpu = gpu_of_device(device_name)
        if gpu is None:
            log.info("estimate_skipped", reason=f"no published peaks for {device_name}")
            return None
        config = AutoConfig.from_pretrained(
            model_dir, trust_remote_code=spec.model.trust_remote_code
        )
        shape = model_shape(config)
        lengths = Tokens([len(ids) for ids in trainer.train_dataset["input_ids"]])
        past = Past()
        read_storage(open_storage(spec.output.uri), past)
        cand = Candidate(
            instance_type or gpu, gpu, price.gpu_hour_usd, price.on_demand_gpu_hour_usd
        )
        doc = one(
            spec,
            shape,
            lengths,
            None,
            cand,
            past,
            micro=int(trainer.args.per_device_train_batch_size),
            local_model=local_source(spec),
            world_size=world_size,
        )
    except Exception as err:
        log.warning("estimate_failed", error=f"{type(err).__name__}: {err}")
        return None
    doc.update(
        shape=asdict(shape),
        tokens_per_row=round(lengths.per_row, 3),
        gradient_accumulation=int(trainer.args.gradient_accumulation_steps),
        gradient_checkpointing=spec.training.gradient_checkpointing,
        world_size=world_size,
        interruptions=interruption_basis(past),
    )
    log.info(
        "estimate",
        gpu=gpu,
        tokens=doc["tokens"],
        tokens_per_second=doc["tokens_per_second"],
        wall_seconds=doc["wall_seconds"],
        spot_usd=doc["spot_usd"],
        basis=doc["throughput"]["basis"],
    )
    return doc
