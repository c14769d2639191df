"""The base model: load it in 4-bit, put LoRA adapters on it (service.fetch finds its files).

QLoRA as in Dettmers et al.: frozen NF4 weights with double quantization,
matmuls in the compute dtype, adapters and their optimizer state in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from service import chat_templates, fast
from service.distributed import ranks_from_env
from service.errors import ManifestError
from service.fetch import fetch_model
from service.manifest.spec import JobSpec, LoraSpec, ModelSpec, QuantizationSpec
from service.targets import lora_targets

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    name: str
    capability: tuple[int, int] | None = None
    total_memory_bytes: int | None = None


def detect_device() -> Device:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Device("cuda", props.name, (props.major, props.minor), int(props.total_memory))
    return Device("cpu", "cpu")


def select_device(spec: JobSpec) -> tuple[Device, str]:
    """This process's device and the compute dtype for it; what cannot run here (bf16 on a
    T4, torch.compile without Triton's needs) fails now, before any weight loads."""
    device = detect_device()
    dtype = resolve_compute_dtype(spec.quantization.compute_dtype, device)
    if spec.training.torch_compile:
        check_compile_supported(device)
    log.info("device", kind=device.kind, name=device.name, dtype=dtype)
    return device, dtype


def resolve_compute_dtype(requested: str, device: Device) -> str:
    """bf16 only where the GPU computes it natively (compute capability >= 8.0).
    torch.cuda.is_bf16_supported() also counts emulation, which is slow and not what a
    T4 user wants, so the capability decides."""
    if device.kind == "cpu":
        if requested in ("auto", "fp32"):
            return "fp32"
        return requested
    assert device.capability is not None
    native_bf16 = device.capability >= BF16_MIN_CAPABILITY
    if requested == "auto":
        return "bf16" if native_bf16 else "fp16"
    if requested == "bf16" and not native_bf16:
        major, minor = device.capability
        raise ManifestError(
            f"spec.quantization.compute_dtype: bf16 needs compute capability >= 8.0, but "
            f"{device.name} is {major}.{minor}; use fp16 or auto"
        )
    return requested


def check_compile_supported(device: Device) -> None:
    """What Triton needs, checked before anything is claimed or loaded: a recent GPU, and a C
    compiler (found as Triton finds it) to build each kernel's launcher."""
    if device.capability is None or device.capability < fast.policy.TRITON_MIN_CAPABILITY:
        where = (
            "this machine has no CUDA GPU"
            if device.kind == "cpu"
            else f"{device.name} is {'.'.join(map(str, device.capability or ()))}"
        )
        raise ManifestError(
            "spec.training.torch_compile: needs a CUDA GPU of compute capability >= 8.0 "
            f"(Triton no longer supports older ones), but {where}; set it to false"
        )
    if fast.policy.c_compiler() is None:
        raise ManifestError(
            "spec.training.torch_compile: Triton builds its kernels with a C compiler, but "
            f"there is {fast.policy.c_compiler_missing()}; the spotlora image ships none (see "
            "docs/manifest.md, 'Model'), or set it to false"
        )


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# --------------------------------------------------------------------------- loading


def load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_quantized_model(
    path: Path, spec: ModelSpec, quant: QuantizationSpec, dtype: str, device: Device
) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    attention = attention_implementation(config)
    log.info("attention", implementation=attention, model_type=config.model_type)
    compute = torch_dtype(dtype)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        quantization_config=bnb,
        dtype=compute,
        # Each rank holds a whole 4-bit copy on its own GPU (data parallel).
        device_map={"": ranks_from_env().local_rank if device.kind == "cuda" else "cpu"},
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=True,
        attn_implementation=attention,
    )
    disable_cpu_inference_repack(model)
    return model


def attention_implementation(config: Any) -> str:
    """sdpa (fused, and what the attention kernel replaces) unless the model needs eager:
    sdpa has no attention-logit soft-capping (Gemma-2; a Gemma-3 config may set it too), so it
    would train another function, and transformers refuses it for models that declare no
    support (Gemma-2 again). A remote-code model's class is not known here: sdpa, as before."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config.get_text_config(), "attn_logit_softcapping", None) is not None:
        return "eager"
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        return "eager"
    return "sdpa"


def disable_cpu_inference_repack(model: Any) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weights into an
    inference-only layout on its first no-grad eval forward; training after that gets
    almost no gradient, silently. An evaluation pass mid-training would trigger it."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare(
    spec: JobSpec, cache_dir: Path, dtype: str, device: Device, hf_token: str | None
) -> tuple[Any, Any, Path]:
    """The model step of a run: fetch, tokenizer, the 4-bit base with its adapters.
    Returns (peft model, tokenizer, local model directory)."""
    model_dir = fetch_model(spec.model, cache_dir, hf_token)
    tokenizer = load_tokenizer(model_dir, spec.model.trust_remote_code)
    use_chat_template(tokenizer, spec)
    return load_for_training(model_dir, spec, dtype, device), tokenizer, model_dir


def use_chat_template(tokenizer: Any, spec: JobSpec) -> None:
    """The manifest's chat template on the tokenizer, so the saved adapter's tokenizer
    carries what it was trained with; without one, a chat job needs the model's own."""
    wanted = spec.data.chat_template
    if wanted is not None:
        if tokenizer.chat_template:
            log.info("chat_template_replaced", reason="spec.data.chat_template wins")
        tokenizer.chat_template = chat_templates.resolve(wanted)
    elif spec.data.format == "chat" and not tokenizer.chat_template:
        raise ManifestError(
            f"spec.data.format: 'chat' needs a chat template; {spec.model.source}'s tokenizer "
            "has none (a base model?): name one in spec.data.chat_template "
            f"({', '.join(sorted(chat_templates.TEMPLATES))}) or give its Jinja text"
        )


def load_for_training(path: Path, spec: JobSpec, dtype: str, device: Device) -> Any:
    """The 4-bit base with adapters on it, its layers compiled if the job asks. Seeded first:
    the adapters' initial weights are random."""
    from transformers import set_seed

    set_seed(spec.training.seed)
    peft_model = add_lora(
        load_quantized_model(path, spec.model, spec.quantization, dtype, device),
        spec.lora,
        spec.quantization,
    )
    policy = fast.policy.for_run(
        mode=spec.training.fused_kernels,
        device=device.kind,
        capability=device.capability,
        compute_dtype=dtype,
        frozen_dtype=spec.quantization.frozen_dtype,
        torch_compile=spec.training.torch_compile,
    )
    fast.fuse(peft_model, policy)  # the report stays on the model: fast.report(model)
    if spec.training.torch_compile:
        log.info("torch_compile", layers=compile_layers(peft_model))
    return peft_model


def add_lora(model: Any, lora: LoraSpec, quant: QuantizationSpec) -> Any:
    """Adapters on the frozen base. Activation checkpointing is the trainer's to switch on
    (training.gradient_checkpointing), non-reentrant, so the inputs need no gradient."""
    from peft import LoraConfig, get_peft_model

    prepare_frozen_base(model, upcast=quant.frozen_dtype == "fp32")
    targets = lora_targets(lora.target_modules, model)
    log.info("lora_targets", modules=targets)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def compile_layers(model: Any) -> int:
    """torch.compile each decoder layer in place: one graph per layer shape, reused by all
    of them; the 4-bit matmuls stay bitsandbytes' own ops inside it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def prepare_frozen_base(model: Any, *, upcast: bool) -> None:
    """Freeze every base weight. peft's prepare_model_for_kbit_training also casts the
    unquantized ones (embeddings, norms, LM head) to fp32, which makes the residual stream
    and each checkpointed layer input fp32 and casts the LM head back to half precision on
    every step: a fifth of a 7B step's time and 3.7 GiB at 16 x 512 tokens in fp16
    (docs/performance.md). Each layer's output is a half-precision matmul's anyway, so the
    default keeps them in the compute dtype; upcast=True is peft's behaviour."""
    import torch

    for param in model.parameters():
        param.requires_grad_(False)
        half = param.dtype in (torch.float16, torch.bfloat16)
        if upcast and half and type(param).__name__ != "Params4bit":
            param.data = param.data.float()


def upcast_trainable_to_fp32(model: Any) -> int:
    """trl 1.16 casts LoRA weights of quantized models to bf16. In fp16 training the
    GradScaler then refuses to unscale them, and in any dtype a saved-and-reloaded
    adapter drifts from the one trained. Keep them, and so their optimizer state, fp32."""
    import torch

    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            count += 1
    return count
