"""Tokens per second of a QLoRA job on a GPU: a prior from the GPU's published peaks, then
corrected by what finished runs measured.

The prior times one micro-batch as compute plus weight traffic. Compute: the tokens of the
micro-batch at 4 x params useful FLOPs each (6 x params done with activation checkpointing,
whose recompute is not useful work; 4 x without it), at the GPU's dense tensor peak times a
useful-MFU figure measured for the path the GPU takes. Traffic: each pass over a layer
(forward, recompute, backward) dequantizes its 4-bit weights, about 4.5 bytes moved per
weight, at the GPU's memory bandwidth; it is what makes small micro-batches slower per token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.estimate.gpus import CPU, GPUS

# Useful MFU by path, measured on one H100 80GB (2026-12-07, /work PERF_ANCHORS and
# docs/performance.md): Mistral-7B shape (7.24 B params), max length 512, packed rows
# (~500 tokens each). fp16 without Triton (the T4 path, in T4 emulation): 11,586 tokens/s at
# micro-batch 32; bf16 with Triton kernels: 8,280 tokens/s at micro-batch 8. Each is solved
# for the MFU that makes this module's model give the measured rate at that point.
ANCHOR_PARAMS = 7.24e9
ANCHOR_TOKENS_PER_ROW = 500.0
ANCHORS = {"fp16": (11_586.0, 32), "bf16": (8_280.0, 8)}
ANCHOR_GPU = "H100"
BYTES_PER_WEIGHT_PASS = 4.5  # NF4 read (0.53), fp16 dequantized write and read (2 + 2)
# A CPU has no published tensor peak: a nominal rate that a CPU run's history replaces.
CPU_NOMINAL_TFLOPS = 0.2
CPU_NOMINAL_GBPS = 20.0


@dataclass(frozen=True)
class Shape:
    """What sets a model's cost per token."""

    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Shape:
        return cls(*(int(doc[k]) for k in ("params", "hidden", "layers", "intermediate", "vocab")))


@dataclass(frozen=True)
class Workload:
    """One job's step on one device: the model, the micro-batch and how full its rows are."""

    gpu: str
    shape: Shape
    micro_batch: int
    tokens_per_row: float
    gradient_checkpointing: bool = True


def path_of(gpu: str) -> str:
    if gpu == CPU:
        return CPU
    return "bf16" if GPUS[gpu].bf16 else "fp16"


def _peaks(gpu: str) -> tuple[float, float]:
    if gpu == CPU:
        return CPU_NOMINAL_TFLOPS * 1e12, CPU_NOMINAL_GBPS * 1e9
    return GPUS[gpu].tensor_tflops * 1e12, GPUS[gpu].bandwidth_gbps * 1e9


def _traffic_seconds(work: Workload, bandwidth: float) -> float:
    passes = 3 if work.gradient_checkpointing else 2
    return passes * BYTES_PER_WEIGHT_PASS * work.shape.params / bandwidth


def _mfu(path: str) -> float:
    """The anchor's measured rate solved for MFU under this module's model."""
    if path == CPU:
        return 0.1
    rate, micro = ANCHORS[path]
    peak, bandwidth = _peaks(ANCHOR_GPU)
    shape = Shape(int(ANCHOR_PARAMS), 0, 0, 0, 0)
    work = Workload(ANCHOR_GPU, shape, micro, ANCHOR_TOKENS_PER_ROW)
    tokens = micro * ANCHOR_TOKENS_PER_ROW
    compute_seconds = tokens / rate - _traffic_seconds(work, bandwidth)
    return 4 * ANCHOR_PARAMS * tokens / (compute_seconds * peak)


def prior_tokens_per_second(work: Workload) -> float:
    peak, bandwidth = _peaks(work.gpu)
    tokens = work.micro_batch * max(work.tokens_per_row, 1.0)
    compute = 4 * work.shape.params * tokens / (peak * _mfu(path_of(work.gpu)))
    if not work.gradient_checkpointing:  # the anchors recompute: 6 x params, not 4 x
        compute *= 4 / 6
    return tokens / (compute + _traffic_seconds(work, bandwidth))


@dataclass(frozen=True)
class Measured:
    """A finished run's measured throughput (run.json's ``throughput``)."""

    run_id: str
    work: Workload
    tokens_per_second: float

    @property
    def prior(self) -> float:
        return prior_tokens_per_second(self.work)

    @classmethod
    def of(cls, run_id: str, doc: dict[str, Any]) -> Measured | None:
        """From a run record's ``throughput``; None if it is missing or incomplete."""
        try:
            work = Workload(
                doc["gpu"],
                Shape.of(doc["shape"]),
                int(doc["micro_batch"]),
                float(doc["tokens_per_row"]),
                bool(doc.get("gradient_checkpointing", True)),
            )
            rate = float(doc["tokens_per_second"])
        except (KeyError, TypeError, ValueError):
            return None
        if (work.gpu != CPU and work.gpu not in GPUS) or not rate > 0 or not math.isfinite(rate):
            return None
        return cls(run_id, work, rate)


@dataclass
class Throughput:
    tokens_per_second: float
    prior_tokens_per_second: float
    basis: str  # "prior", or which runs corrected it: "same shape and GPU", "same GPU", ...
    runs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_second": round(self.tokens_per_second, 1),
            "prior_tokens_per_second": round(self.prior_tokens_per_second, 1),
            "basis": self.basis,
            "runs": self.runs,
        }


def estimate(work: Workload, history: Sequence[Measured]) -> Throughput:
    """The prior, scaled by how far it was off on the nearest measured runs: those of the
    same shape on the same GPU, else the same GPU, else the same path (fp16, bf16, CPU).
    Several runs at one level enter as the geometric mean of their measured/prior ratios."""
    prior = prior_tokens_per_second(work)
    tiers = (
        ("same shape and GPU", lambda m: m.work.gpu == work.gpu and m.work.shape == work.shape),
        ("same GPU", lambda m: m.work.gpu == work.gpu),
        (f"same path ({path_of(work.gpu)})", lambda m: path_of(m.work.gpu) == path_of(work.gpu)),
    )
    for basis, near in tiers:
        used = [m for m in history if near(m)]
        if used:
            ratios = [m.tokens_per_second / m.prior for m in used]
            ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            runs = [
                {
                    "run_id": m.run_id,
                    "gpu": m.work.gpu,
                    "micro_batch": m.work.micro_batch,
                    "measured_tokens_per_second": round(m.tokens_per_second, 1),
                    "prior_tokens_per_second": round(m.prior, 1),
                    "prior_off_percent": round((m.prior / m.tokens_per_second - 1) * 100, 1),
                }
                for m in used
            ]
            return Throughput(prior * ratio, prior, basis, runs)
    return Throughput(prior, prior, "prior")
