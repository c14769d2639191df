"""Exact match of an adapter on held-out rows: the before/after figure of the quickstart
and the learning test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from examples.samples import exact_match
from service.manifest.spec import ModelSpec, QuantizationSpec
from service.model import detect_device, load_quantized_model, load_tokenizer, resolve_compute_dtype


def load_for_eval(model_dir: Path, adapter_dir: Path | None) -> tuple[Any, Any]:
    """The base in 4-bit as training saw it, with the adapter on top when given."""
    device = detect_device()
    dtype = resolve_compute_dtype("auto", device)
    model = load_quantized_model(
        model_dir, ModelSpec(source=str(model_dir)), QuantizationSpec(), dtype, device
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval(), load_tokenizer(model_dir, trust_remote_code=False)


def adapter_exact_match(
    model_dir: Path, adapter_dir: Path | None, rows: list[dict[str, Any]], max_new_tokens: int = 24
) -> float:
    model, tokenizer = load_for_eval(model_dir, adapter_dir)
    return exact_match(model, tokenizer, rows, max_new_tokens=max_new_tokens)
