"""The architectures users bring, each as a tiny random config trained through the real
entrypoint with the default LoRA targets: the model loads in 4-bit, the attention
implementation suits it, the default targets exist in it, and a few steps train."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from examples.samples import TINY_LLAMA_DIMS
from tests.jobs import adapter_tensors, job_env, manifest, run_job, step_losses, write_manifest

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The tiny Llama's widths for every family; head_dim is set where a family's default (128 or
# 256) would dwarf the rest.
DIMS: dict[str, Any] = dict(TINY_LLAMA_DIMS)


@dataclass(frozen=True)
class Family:
    config: str  # transformers config class
    extra: dict[str, Any] = field(default_factory=dict)
    targets: list[str] = field(default_factory=lambda: list(ATTENTION))
    attention: str = "sdpa"


FAMILIES = {
    # Llama-3.x: untied head, the llama3 rope scaling.
    "llama-3": Family(
        "LlamaConfig",
        {
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        },
    ),
    "smollm": Family("LlamaConfig", {"tie_word_embeddings": True}),
    "mistral": Family("MistralConfig", {"tie_word_embeddings": False, "sliding_window": 32}),
    "qwen2.5": Family("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": Family("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True}),
    # Logit soft-capping in attention and on the logits; sdpa is refused for it.
    "gemma-2": Family(
        "Gemma2Config",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32},
        attention="eager",
    ),
    "gemma-3": Family(
        "Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32}
    ),
    # Phi-3/3.5: fused qkv_proj and gate_up_proj.
    "phi-3": Family("Phi3Config", {"tie_word_embeddings": False}, targets=["qkv_proj", "o_proj"]),
}


def write_family(path: Path, family: Family, tokenizer: Any) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**DIMS, **family.extra},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from examples.samples import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_with_default_targets(
    name: str, tokenizer: Any, tiny_data: Path, tmp_path: Path
) -> None:
    family = FAMILIES[name]
    model_dir = write_family(tmp_path / name, family, tokenizer)
    out = tmp_path / "out"
    job = manifest(
        name.replace(".", "-"),
        str(model_dir),
        str(tiny_data),
        str(out),
        data={"max_length": 64},
        training={"max_steps": 2, "batch_size": 2, "gradient_accumulation": 1},
    )
    path = write_manifest(tmp_path / "job.yaml", job)
    done = run_job(["run", "-f", str(path)], job_env(tmp_path / "cache"))
    assert done.code == 0, done.stderr[-3000:]
    losses = step_losses(json.loads((out / "run.json").read_text()))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values()), losses
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(family.targets)
    tensors = adapter_tensors(out / "adapter")
    adapted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in tensors}
    assert adapted == set(family.targets)
    assert [e["implementation"] for e in done.named("attention")] == [family.attention]


def test_an_explicit_target_that_matches_no_layer_exits_2(
    tokenizer: Any, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama's names on Phi-3: peft alone would adapt o_proj and train without a word."""
    from service.cli import main

    model_dir = write_family(tmp_path / "phi-3", FAMILIES["phi-3"], tokenizer)
    job = manifest("phi-3-named", str(model_dir), str(tiny_data), str(tmp_path / "out"))
    job["spec"]["lora"]["target_modules"] = ATTENTION
    for key, value in job_env(tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    assert main(["run", "-f", str(write_manifest(tmp_path / "job.yaml", job))]) == 2
    assert not (tmp_path / "out" / "adapter").exists()
