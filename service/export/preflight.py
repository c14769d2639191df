"""Whether this host can merge: the memory and disk a merged export needs, from config.json
alone, checked before training starts (fail at minute 0, not at the end of the run)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from service.errors import ManifestError
from service.manifest.spec import JobSpec
from service.targets import lora_targets

log = structlog.get_logger(__name__)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
GIB = 2**30
# The process with torch, transformers and peft imported: 0.46 GiB measured with torch's
# CPU wheel; CUDA's host-side libraries add about a GiB.
RUNTIME_BYTES = int(1.5 * GIB)
# peft computes each delta B @ A in fp32 and safe_merge clones the weight before adding it:
# three fp32 copies of the largest adapted weight at most. safetensors >= 0.8 writes a
# shard from the tensors' own memory: saving adds no copy.
MERGE_COPIES = 3
# NF4: 4 bits a weight, and one fp32 absmax a block of 64 (quantized again with double
# quantization; counted whole, to stay on the safe side).
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64
# A Mistral-7B shape merged into its original weights in bf16 on CPU: 16.9 GiB peak resident
# measured, 17.5 estimated. A 1.1B Llama shape in bf16 on CPU: 4.29 GiB estimated merging into
# the trained base, 3.86 into the original; peak anonymous memory 2.66 and 1.07 GiB. Its peak
# resident, 4.49 and 4.26 GiB, also counts the safetensors files mapped from the page cache,
# which the kernel reclaims under a cgroup's limit rather than kill the process.
MEMORY_MARGIN = 1.15  # allocator fragmentation, and what else the process holds
# The reference's logits are kept for every compared token (fp32, the whole vocabulary).
VERIFY_TOKENS_PER_PROMPT = 128
DISK_MARGIN_BYTES = 256 * 2**20  # tokenizer, config and index next to the shards
UNLIMITED_BYTES = 2**60  # cgroup v1 writes "no limit" as 2**63 - 1, page-rounded


@dataclass(frozen=True)
class MergeNeeds:
    dtype: str
    weights_bytes: int  # the whole base in the export dtype
    adapter_bytes: int  # LoRA weights, fp32
    working_bytes: int  # peft's merge temporaries, the verification's logits
    memory_bytes: int  # all of it with the margin, plus the runtime
    disk_bytes: int  # the staged merged files


def export_dtype(requested: str, config: Any) -> str:
    """'auto': the base's own (config.json's dtype; torch_dtype before transformers 5)."""
    if requested != "auto":
        return requested
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return CONFIG_DTYPES.get(str(declared).removeprefix("torch."), "bf16")


def refuse_quantized(config: Any, source: str) -> None:
    if getattr(config, "quantization_config", None):
        raise ManifestError(
            f"spec.export.merged: {source} is stored quantized (config.json has a "
            "quantization_config); a merge into quantized weights keeps their error in every "
            "weight (transformers #31293, peft #2321): use the original-precision model"
        )


def merge_needs(spec: JobSpec, config: Any) -> MergeNeeds:
    """From config.json alone, the layers built on the meta device (as
    memory.preflight_estimate counts them), before any weight is fetched."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = export_dtype(spec.export.dtype, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=spec.model.trust_remote_code
        )
    head, targets = model.get_output_embeddings(), lora_targets(spec.lora.target_modules, model)
    lora_weights = largest = linear = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        linear += module.in_features * module.out_features
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            lora_weights += spec.lora.r * (module.in_features + module.out_features)
            largest = max(largest, module.in_features * module.out_features)
    weights = sum(p.numel() for p in model.parameters()) * DTYPE_BYTES[dtype]
    # fp32 reference logits of every prompt; one prompt's two log-softmaxes, their
    # difference and probabilities in float64 while compared.
    vocab = config.get_text_config().vocab_size
    verify = vocab * VERIFY_TOKENS_PER_PROMPT * (4 * spec.export.verify_prompts + 4 * 8)
    working = MERGE_COPIES * 4 * largest + verify
    if spec.export.base == "trained":  # the 4-bit layers, while they are dequantized
        working += int(linear * NF4_BYTES_PER_WEIGHT)
    total = weights + 4 * lora_weights + working
    return MergeNeeds(
        dtype=dtype,
        weights_bytes=weights,
        adapter_bytes=4 * lora_weights,
        working_bytes=working,
        memory_bytes=int(total * MEMORY_MARGIN) + RUNTIME_BYTES,
        disk_bytes=weights + DISK_MARGIN_BYTES,
    )


def available_memory(
    cgroup_root: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")
) -> tuple[int, str]:
    """What this process may use, and where the figure came from: the container's cgroup limit
    when it has one (v2 memory.max, v1 memory.limit_in_bytes; the OOM killer enforces it
    whatever the node has free), else the machine's MemAvailable."""
    for path in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < UNLIMITED_BYTES:
            return int(text), f"the cgroup limit, {path}"
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, f"MemAvailable, {meminfo}"
    raise OSError(f"{meminfo} has no MemAvailable line")


def held_by_this_process(status: Path = Path("/proc/self/status")) -> int:
    """What a run keeps through its merge beyond the runtime MergeNeeds counts: its rows and
    the libraries training imported (trl, datasets, accelerate). The trained model is not in
    it: the recipe releases it before the merge (service.trainer.release_model). Anonymous
    memory alone: mapped files are the kernel's to reclaim."""
    try:
        lines = status.read_text().splitlines()
    except OSError:
        return 0
    anonymous = next((int(x.split()[1]) * 1024 for x in lines if x.startswith("RssAnon:")), 0)
    return max(anonymous - RUNTIME_BYTES, 0)


def preflight(
    spec: JobSpec,
    config: Any,
    cache_dir: Path,
    *,
    memory: Callable[[], tuple[int, str]] = available_memory,
    disk_free: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free,
    held_bytes: int = 0,
    way_out: str | None = None,
) -> None:
    """With spec.export.merged, refuse at minute 0 what would fail at the end of the run. The
    host is checked: the merge runs there unless a GPU has room for it by then. ``held_bytes``:
    what the process keeps beside the merge (a run's own, held_by_this_process). ``way_out``
    replaces the default advice (export later, as its own Job)."""
    if not spec.export.merged:
        return
    refuse_quantized(config, spec.model.source)
    needs = merge_needs(spec, config)
    limit, origin = memory()
    free = disk_free(next(p for p in (cache_dir, *cache_dir.parents) if p.exists()))
    log.info(
        "export_preflight",
        **asdict(needs),
        held_bytes=held_bytes,
        memory_limit_bytes=limit,
        disk_free_bytes=free,
    )
    hint = way_out or (
        f"set spec.export.merged to false and run `spotlora export {spec.output.uri}` after "
        "the run, as its own Job with more memory (k8s/examples/export-job.yaml)"
    )
    if needs.memory_bytes + held_bytes > limit:
        held = f", what the run keeps beside it {held_bytes / GIB:.2f} GiB" if held_bytes else ""
        raise ManifestError(
            f"spec.export.merged: the merge needs ~{(needs.memory_bytes + held_bytes) / GIB:.1f} "
            f"GiB of host memory (the base in {needs.dtype}: {needs.weights_bytes / GIB:.1f} GiB, "
            f"adapter {needs.adapter_bytes / GIB:.2f} GiB, merge and verification "
            f"{needs.working_bytes / GIB:.2f} GiB{held}, runtime and margin), but this process "
            f"may use {limit / GIB:.1f} GiB ({origin}); {hint}"
        )
    if needs.disk_bytes > free:
        raise ManifestError(
            f"spec.export.merged: the merged files need ~{needs.disk_bytes / GIB:.1f} GiB "
            f"staged under {cache_dir}, which has {free / GIB:.1f} GiB free; give the cache "
            f"volume more room, or {hint}"
        )
