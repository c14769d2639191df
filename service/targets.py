"""Which layers get LoRA adapters, decided against the model itself before peft sees it.

peft adapts whatever names match and is silent about the rest: Phi-3 given Llama's
q_proj/k_proj/v_proj/o_proj adapts o_proj alone. So 'auto' picks the attention projections the
architecture has, and an explicit name that matches no layer is an error naming the layers.
"""

from __future__ import annotations

from typing import Any

from service.errors import ManifestError

# The attention projections, by how architectures lay them out; the first that the model has
# wins. Llama, Mistral, Qwen2/3, Gemma-2/3, SmolLM: separate. Phi-3/3.5: one fused projection.
ATTENTION_LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("qkv_proj", "o_proj"),
)


def adaptable_layers(model: Any) -> list[str]:
    """Dotted names of the layers peft can put an adapter on: the leaves with a weight matrix
    (linear layers, 4-bit or not, embeddings, GPT-2's Conv1D), never norms."""
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and not any(module.children()) and getattr(weight, "ndim", 0) == 2:
            names.append(name)
    return names


def lora_targets(requested: list[str] | str, model: Any) -> list[str] | str:
    """The target_modules to give peft for this model (see the module docstring)."""
    if requested == "all-linear":
        return requested
    layers = adaptable_layers(model)
    short = sorted({name.rsplit(".", 1)[-1] for name in layers})
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    if isinstance(requested, str):  # 'auto'
        for layout in ATTENTION_LAYOUTS:
            if set(layout) <= set(short):
                return list(layout)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if known and set(known) <= set(short):
            return list(known)
        raise ManifestError(
            f"spec.lora.target_modules: 'auto' knows no attention projections for {model_type}; "
            f"name the layers to adapt from this model's: {', '.join(short)}"
        )
    unmatched = [
        target
        for target in requested
        if not any(name == target or name.endswith("." + target) for name in layers)
    ]
    if unmatched:
        raise ManifestError(
            f"spec.lora.target_modules: no layer of this {model_type} model is named "
            f"{', '.join(unmatched)}; its layers are {', '.join(short)} (or leave "
            "target_modules out: 'auto' picks the attention projections)"
        )
    return requested
