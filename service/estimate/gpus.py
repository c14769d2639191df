"""GPUs by their published peaks, and which GPU an instance type or a device name means.

Peaks are dense (no structured sparsity) half-precision tensor-core rates and memory
bandwidth from the vendors' datasheets; ``memory_gib`` is what torch reports as the card's
total memory (what ``batch_size: auto`` sizes against), a little under the label's GB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    tensor_tflops: float  # fp16 (and bf16 where it has it) dense tensor-core peak, TFLOP/s
    bandwidth_gbps: float  # memory bandwidth, GB/s
    memory_gib: float
    bf16: bool  # native bf16: compute capability >= 8.0, which also runs Triton kernels
    source: str


GPUS = {
    gpu.name: gpu
    for gpu in (
        Gpu("T4", 65.0, 320.0, 14.6, False, "NVIDIA T4 datasheet: 65 FP16 mixed-precision TFLOPS"),
        Gpu("L4", 121.0, 300.0, 22.0, True, "NVIDIA L4 datasheet: 242 FP16/BF16 TFLOPS sparse"),
        Gpu(
            "A10G",
            70.0,
            600.0,
            22.0,
            True,
            "no NVIDIA datasheet; 70 FP16 tensor TFLOPS and 600 GB/s as AWS quotes for G5 "
            "(the A10's 125 TFLOPS are not the A10G's)",
        ),
        Gpu("A100-40GB", 312.0, 1555.0, 39.4, True, "NVIDIA A100 datasheet (SXM4 40GB)"),
        Gpu("A100-80GB", 312.0, 2039.0, 79.1, True, "NVIDIA A100 datasheet (SXM4 80GB)"),
        Gpu("H100", 989.0, 3350.0, 79.1, True, "NVIDIA H100 datasheet (SXM5): 1,979 sparse"),
        Gpu("H200", 989.0, 4800.0, 139.8, True, "NVIDIA H200 datasheet (SXM)"),
    )
}
CPU = "cpu"

# Instance families by the GPU they carry (AWS and GCE names), first match wins.
INSTANCE_GPUS = (
    (r"^g4dn\.|nvidia-tesla-t4|^n1-.*\+t4$", "T4"),
    (r"^g6\.|^gr6\.|^g2-standard-|nvidia-l4", "L4"),
    (r"^g5\.", "A10G"),
    (r"^p4d\.|^a2-highgpu-|nvidia-tesla-a100", "A100-40GB"),
    (r"^p4de\.|^a2-ultragpu-|nvidia-a100-80gb", "A100-80GB"),
    (r"^p5\.|^a3-|nvidia-h100", "H100"),
    (r"^p5e\.|^p5en\.|nvidia-h200", "H200"),
)
# A device name as torch reports it ("Tesla T4", "NVIDIA A10G", "NVIDIA H100 80GB HBM3").
DEVICE_GPUS = (
    (r"\bT4\b", "T4"),
    (r"\bL4\b", "L4"),
    (r"\bA10G\b", "A10G"),
    (r"\bA100\b.*80GB", "A100-80GB"),
    (r"\bA100\b", "A100-40GB"),
    (r"\bH100\b", "H100"),
    (r"\bH200\b", "H200"),
)

# Illustrative prices per instance-hour, as in k8s/base/prices.yaml: what `spotlora estimate`
# compares when no price table is given. Spot prices move; set your own table.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "g4dn.xlarge": {"spot_hour_usd": 0.2, "on_demand_hour_usd": 0.526, "gpus": 1},
    "g4dn.2xlarge": {"spot_hour_usd": 0.28, "on_demand_hour_usd": 0.752, "gpus": 1},
    "g4dn.12xlarge": {"spot_hour_usd": 1.6, "on_demand_hour_usd": 3.912, "gpus": 4},
    "n1-standard-4+nvidia-tesla-t4": {"spot_hour_usd": 0.16, "on_demand_hour_usd": 0.54, "gpus": 1},
    "g6.xlarge": {"spot_hour_usd": 0.32, "on_demand_hour_usd": 0.805, "gpus": 1},
    "g5.xlarge": {"spot_hour_usd": 0.45, "on_demand_hour_usd": 1.006, "gpus": 1},
}


def gpu_of_instance(instance_type: str, entry: dict[str, object] | None = None) -> str | None:
    """The GPU an instance type carries: the price table entry's ``gpu`` if it names one
    (``T4``, ``cpu``...), else the instance family's."""
    named = (entry or {}).get("gpu")
    if isinstance(named, str) and (named in GPUS or named == CPU):
        return named
    for pattern, gpu in INSTANCE_GPUS:
        if re.search(pattern, instance_type):
            return gpu
    return None


def gpu_of_device(device_name: str | None) -> str | None:
    """The GPU a run's device name means (``cpu`` for a CPU run), or None if unknown."""
    if not device_name:
        return None
    if device_name == CPU:
        return CPU
    for pattern, gpu in DEVICE_GPUS:
        if re.search(pattern, device_name):
            return gpu
    return None
