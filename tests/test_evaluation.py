"""Generation samples and task metrics: the base beside the trained adapter, scored on the
eval split's references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service import evaluation
from service.manifest.results import EvaluationSpec


def test_scores_against_references() -> None:
    responses = ["BIN-7 ", "the code is BIN-8", "bin-9"]
    references = ["BIN-7", "BIN-8", "BIN-9"]
    got = evaluation.score(responses, references, ["exact_match", "contains"], None)
    assert got == {"exact_match": pytest.approx(1 / 3), "contains": pytest.approx(2 / 3)}
    regex = evaluation.score(responses, references, ["regex"], r"(?i)^\s*{reference}\s*$")
    assert regex == {"regex": pytest.approx(2 / 3)}  # case-insensitive, the reference escaped


def test_regex_metric_needs_a_pattern_that_compiles() -> None:
    with pytest.raises(ValueError, match=r"needs evaluation\.pattern"):
        EvaluationSpec(metrics=["regex"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        EvaluationSpec(metrics=["regex"], pattern="(unclosed")


class Trainer:
    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.processing_class = model, tokenizer


def test_samples_show_the_base_beside_the_trained_adapter(tiny_model: Path) -> None:
    """`before` is the base with the adapter off, whatever the adapter has learned."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    rows = [{"prompt": f"Q{i}: order 3 red mugs. A:", "completion": "BIN-3"} for i in range(3)]
    spec = EvaluationSpec(samples=2, metrics=["exact_match", "contains"], max_new_tokens=6)
    expected_base = evaluation.generate(
        base, tokenizer, [r["prompt"] for r in rows[:2]], max_new_tokens=6
    )
    peft = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.add_(5.0)  # an adapter that changes what the model says
    found = evaluation.evaluate(Trainer(peft, tokenizer), rows, spec)
    assert found is not None and found["rows_scored"] == 3
    assert [s["before"] for s in found["samples"]] == expected_base
    assert any(s["after"] != s["before"] for s in found["samples"])
    assert set(found["metrics"]) == {"before", "after"}
    assert set(found["metrics"]["after"]) == {"exact_match", "contains"}
    assert peft.training  # left as it was found


def test_nothing_asked_nothing_run() -> None:
    assert evaluation.evaluate(Trainer(None, None), [], EvaluationSpec()) is None
