"""The benchmark's model shapes are what they say: each builds from its config (on the meta
device, no weights) with the parameter count the MFU figures divide by."""

from __future__ import annotations

import pytest

from bench.common import PRESETS, model_config, param_count
from service.model import attention_implementation

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count_matches_the_built_model(preset: str) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(preset))
    assert sum(p.numel() for p in model.parameters()) == param_count(preset)


@pytest.mark.parametrize(
    ("preset", "attention"), [("qwen3-8b", "sdpa"), ("gemma-2-2b", "eager"), ("mistral-7b", "sdpa")]
)
def test_preset_attention_implementation(preset: str, attention: str) -> None:
    assert attention_implementation(model_config(preset)) == attention
