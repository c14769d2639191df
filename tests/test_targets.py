"""LoRA targets per architecture and the attention implementation per model, decided from the
model's own layers and config (built on the meta device: no weights, milliseconds)."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import ManifestError
from service.model import attention_implementation
from service.targets import lora_targets

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SMALL = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
}


def config(name: str, **extra: Any) -> Any:
    return getattr(transformers, name)(**SMALL, **extra)


def meta_model(name: str, **extra: Any) -> Any:
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config(name, **extra))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("LlamaConfig", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("Qwen3Config", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("Gemma2Config", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("Phi3Config", ["qkv_proj", "o_proj"]),
    ],
)
def test_auto_picks_the_attention_projections_the_architecture_has(
    name: str, expected: list[str]
) -> None:
    assert lora_targets("auto", meta_model(name)) == expected


def test_auto_falls_back_to_peft_defaults_for_other_layouts() -> None:
    with torch.device("meta"):
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4))
    assert lora_targets("auto", gpt2) == ["c_attn"]


def test_an_explicit_name_that_matches_no_layer_is_refused_naming_the_layers() -> None:
    """peft alone adapts the names that match and ignores the rest: Phi-3 given Llama's
    names trained o_proj only."""
    with pytest.raises(ManifestError) as info:
        lora_targets(["q_proj", "k_proj", "v_proj", "o_proj"], meta_model("Phi3Config"))
    message = str(info.value)
    assert message.startswith(
        "spec.lora.target_modules: no layer of this phi3 model is named q_proj, k_proj, v_proj;"
    )
    assert "its layers are down_proj, embed_tokens, gate_up_proj, lm_head, o_proj, qkv_proj" in (
        message
    )


def test_explicit_names_and_all_linear_pass_through() -> None:
    model = meta_model("Phi3Config")
    assert lora_targets(["qkv_proj", "mlp.down_proj"], model) == ["qkv_proj", "mlp.down_proj"]
    assert lora_targets("all-linear", model) == "all-linear"


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [
        ("LlamaConfig", {}, "sdpa"),
        ("Phi3Config", {}, "sdpa"),
        ("Gemma3TextConfig", {}, "sdpa"),
        ("Gemma3TextConfig", {"attn_logit_softcapping": 50.0}, "eager"),
        ("Gemma2Config", {}, "eager"),
        ("Gemma2Config", {"attn_logit_softcapping": None}, "eager"),  # refused by transformers
    ],
)
def test_attention_implementation_is_eager_where_sdpa_is_refused_or_cannot_softcap(
    name: str, extra: dict[str, Any], expected: str
) -> None:
    assert attention_implementation(config(name, **extra)) == expected
