"""The frozen base under the adapters: what stays 4-bit, what stays in the compute dtype."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import model as product
from service.manifest.spec import LoraSpec, ModelSpec, QuantizationSpec
from service.memory import estimate_memory

torch = pytest.importorskip("torch")


def load(tiny_model: Path, frozen_dtype: str) -> object:
    quant = QuantizationSpec(compute_dtype="fp16", frozen_dtype=frozen_dtype)
    base = product.load_quantized_model(
        tiny_model, ModelSpec(source=str(tiny_model)), quant, "fp16", product.Device("cpu", "cpu")
    )
    torch.manual_seed(0)
    return product.add_lora(base, LoraSpec(), quant)


def unquantized_frozen(peft_model: object) -> dict[str, object]:
    return {
        name: param.dtype
        for name, param in peft_model.named_parameters()  # type: ignore[attr-defined]
        if not param.requires_grad and type(param).__name__ != "Params4bit"
    }


def test_by_default_the_unquantized_weights_stay_in_the_compute_dtype(tiny_model: Path) -> None:
    peft_model = load(tiny_model, "compute")
    frozen = unquantized_frozen(peft_model)
    assert any("embed_tokens" in name for name in frozen)
    assert any("norm" in name for name in frozen)
    assert set(frozen.values()) == {torch.float16}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]  # type: ignore[attr-defined]
    assert trainable and all("lora_" in name for name in trainable)


def test_frozen_dtype_fp32_upcasts_them_as_peft_does(tiny_model: Path) -> None:
    peft_model = load(tiny_model, "fp32")
    assert set(unquantized_frozen(peft_model).values()) == {torch.float32}
    quantized = [
        p
        for p in peft_model.parameters()  # type: ignore[attr-defined]
        if type(p).__name__ == "Params4bit"
    ]
    assert quantized and all(p.dtype == torch.uint8 for p in quantized)


def test_both_give_the_same_fp16_loss_and_gradients(tiny_model: Path) -> None:
    """An fp16 residual stream against an fp32 one, on the same weights and adapters."""
    input_ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(1))
    results = {}
    for frozen_dtype in ("compute", "fp32"):
        peft_model = load(tiny_model, frozen_dtype)
        product.upcast_trainable_to_fp32(peft_model)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = peft_model(input_ids=input_ids, labels=input_ids).loss  # type: ignore[operator]
        loss.backward()
        grads = torch.cat(
            [
                p.grad.flatten()
                for p in peft_model.parameters()  # type: ignore[attr-defined]
                if p.requires_grad and p.grad is not None
            ]
        )
        results[frozen_dtype] = (loss.item(), grads)
    (loss16, grad16), (loss32, grad32) = results["compute"], results["fp32"]
    assert torch.isfinite(grad16).all() and grad16.abs().sum() > 0
    assert loss16 == pytest.approx(loss32, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


def test_the_runtime_estimate_follows_the_frozen_dtype(tiny_model: Path) -> None:
    estimates = {}
    for frozen_dtype in ("compute", "fp32"):
        peft_model = load(tiny_model, frozen_dtype)
        estimates[frozen_dtype] = estimate_memory(
            peft_model, max_length=512, gradient_checkpointing=True, weight_bytes=0
        )
    assert estimates["fp32"].per_sequence_bytes > estimates["compute"].per_sequence_bytes
    # autocast's half-precision copies of an fp32 LM head
    assert estimates["fp32"].fixed_bytes > estimates["compute"].fixed_bytes


def test_compile_layers_wraps_each_decoder_layer(tiny_model: Path) -> None:
    peft_model = load(tiny_model, "compute")
    layers = peft_model.get_base_model().model.layers  # type: ignore[attr-defined]
    assert product.compile_layers(peft_model) == len(layers) > 0
    assert all(layer._compiled_call_impl is not None for layer in layers)
