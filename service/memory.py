"""Peak GPU memory of a training step, estimated before one runs: from the loaded model
(``batch_size: auto``) or from config.json alone (``spotlora validate --gpu-memory-gib``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.errors import ManifestError
from service.manifest.spec import JobSpec
from service.targets import lora_targets

# Activations one token holds while one decoder layer is recomputed and back-propagated:
# LAYER_WORKING_SET x (hidden + intermediate) half-precision values, plus
# RESIDUAL_COPIES x hidden values of the residual stream's dtype. When the LM head is kept
# in fp32 under half-precision compute, autocast holds LM_HEAD_COPIES half-precision copies
# of it. Fitted to peaks measured on a Mistral-7B shape in fp16 with 4-bit weights, with
# the frozen weights in fp16 and in fp32 (bench/README.md).
LAYER_WORKING_SET = 5.1
RESIDUAL_COPIES = 13.4
LM_HEAD_COPIES = 2
# Share of the memory limit the estimate may fill: the allocator's fragmentation and
# the caching of freed blocks take the rest.
AUTO_BATCH_MEMORY_SHARE = 0.85
AUTO_BATCH_MAX = 64
CPU_BATCH_SIZE = 4


@dataclass(frozen=True)
class MemoryEstimate:
    fixed_bytes: int  # weights, adapters, their gradients and optimizer state
    per_sequence_bytes: int  # activations of one sequence of max_length tokens

    def total_bytes(self, batch_size: int) -> int:
        return self.fixed_bytes + batch_size * self.per_sequence_bytes


def estimate_memory(
    model: Any,
    *,
    max_length: int,
    gradient_checkpointing: bool,
    weight_bytes: int,
    offload_activations: bool = False,
) -> MemoryEstimate:  # weight_bytes: what the loaded model holds on the device now
    """Peak GPU memory of a training step, from the loaded model, before one runs."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantization = getattr(model.config, "quantization_config", None)
    compute = getattr(quantization, "bnb_4bit_compute_dtype", None)
    return _estimate(
        model.config.get_text_config(),
        frozen_bytes=model.get_input_embeddings().weight.element_size(),
        compute_bytes=compute.itemsize if compute is not None else 2,
        trainable=trainable,
        weight_bytes=weight_bytes,
        max_length=max_length,
        gradient_checkpointing=gradient_checkpointing,
        offload_activations=offload_activations,
    )


def _estimate(
    config: Any,
    *,
    frozen_bytes: int,
    compute_bytes: int,
    trainable: int,
    weight_bytes: int,
    max_length: int,
    gradient_checkpointing: bool,
    offload_activations: bool,
) -> MemoryEstimate:
    """With checkpointing a token keeps each layer's input (in the residual stream's dtype,
    that of the frozen unquantized weights; in host memory when offloaded) plus one layer's
    working set; without it, every layer's working set."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layer = (
        LAYER_WORKING_SET * (hidden + intermediate) * 2 + RESIDUAL_COPIES * hidden * frozen_bytes
    )
    kept_inputs = 0 if offload_activations else layers * hidden * frozen_bytes
    per_token = kept_inputs + (layer if gradient_checkpointing else layers * layer)
    head_copies = LM_HEAD_COPIES if frozen_bytes > compute_bytes else 0
    # weight_bytes holds the (fp32) adapters already; add their gradients and two AdamW moments
    fixed = weight_bytes + 12 * trainable + head_copies * config.vocab_size * hidden * 2
    return MemoryEstimate(int(fixed), int(per_token * max_length))


# NF4 with double quantization: 4 bits a weight, an 8-bit absmax per block of 64, and an
# fp32 constant per 256 blocks.
QUANTIZED_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
QUANTIZED_BYTES_PER_WEIGHT_SINGLE = 0.5 + 4 / 64


def preflight_estimate(spec: JobSpec, config: Any) -> MemoryEstimate:
    """The same estimate from the model's config alone, before any weight is fetched: the
    layers are built on the meta device to count what will be quantized, what stays
    unquantized (in half precision, the compute dtype of any GPU, unless
    quantization.frozen_dtype is fp32), and what LoRA adds."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    targets = lora_targets(spec.lora.target_modules, model)
    per_weight = (
        QUANTIZED_BYTES_PER_WEIGHT
        if spec.quantization.double_quant
        else QUANTIZED_BYTES_PER_WEIGHT_SINGLE
    )
    weight_bytes = 0.0
    trainable = 0
    counted: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            weight_bytes += module.weight.numel() * per_weight
            counted.add(id(module.weight))
            if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
                trainable += spec.lora.r * (module.in_features + module.out_features)
    frozen_bytes = 4 if spec.quantization.frozen_dtype == "fp32" else 2
    for param in model.parameters():
        if id(param) not in counted:
            weight_bytes += param.numel() * frozen_bytes
    weight_bytes += trainable * 4
    return _estimate(
        config.get_text_config(),
        frozen_bytes=frozen_bytes,
        compute_bytes=2,
        trainable=trainable,
        weight_bytes=int(weight_bytes),
        max_length=spec.data.max_length,
        gradient_checkpointing=spec.training.gradient_checkpointing,
        offload_activations=spec.training.offload_activations,
    )


def memory_limit_bytes() -> int:
    """The device's memory as this process may use it (a per-process fraction counts)."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(0) if get_fraction is not None else 1.0
    return int(total * fraction)


def auto_batch_size(estimate: MemoryEstimate, limit_bytes: int) -> int:
    budget = limit_bytes * AUTO_BATCH_MEMORY_SHARE - estimate.fixed_bytes
    if budget < estimate.per_sequence_bytes:
        raise ManifestError(
            f"training.batch_size=auto: one sequence needs ~{estimate.total_bytes(1) / 2**30:.1f} "
            f"GiB of the {limit_bytes / 2**30:.1f} GiB available; lower data.max_length or turn "
            "on training.gradient_checkpointing"
        )
    return int(min(AUTO_BATCH_MAX, budget // estimate.per_sequence_bytes))
