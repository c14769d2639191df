"""The promotion gate, without a trainer: eval loss (lower is better) or a task metric
(higher is better), each against the published adapter measured on this run's eval data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from service.cli import EXAMPLE_MANIFEST
from service.errors import ManifestError
from service.history import RunHistory
from service.manifest import validate_document
from service.retraining import RetrainingPolicy, decide
from service.storage import open_storage


def test_eval_loss_lower_is_better_a_metric_higher() -> None:
    assert decide(1.0, 1.1, True, 0.0).promoted
    assert not decide(1.2, 1.1, True, 0.05).promoted
    assert decide(0.80, 0.82, True, 0.05, "exact_match").promoted
    refused = decide(0.70, 0.82, True, 0.05, "exact_match")
    assert not refused.promoted
    assert refused.reason == "exact match 0.7000 < published 0.8200 - tolerance 0.05: not promoted"
    assert decide(None, None, False, 0.0).promoted  # the first run


def test_the_gate_measures_the_published_adapter_with_the_runs_own_measure(
    tmp_path: Path,
) -> None:
    doc = yaml.safe_load(EXAMPLE_MANIFEST)
    doc["spec"]["output"] = {"uri": str(tmp_path / "out"), "per_run": True}
    doc["spec"]["evaluation"] = {"metrics": ["exact_match"]}
    doc["spec"]["promotion"] = {"metric": "exact_match", "max_metric_decrease": 0.1}
    spec = validate_document(doc, "job").spec
    history = RunHistory(open_storage(str(tmp_path / "out")))
    adapter = history.run_storage("night-1").child("adapter")
    adapter.write_bytes("adapter_config.json", json.dumps({"r": 8}).encode())
    history.publish({"run_id": "night-1"}, None)
    policy = RetrainingPolicy(history, spec, tmp_path / "work")
    measured: list[Path] = []

    def measure(path: Path) -> float:
        measured.append(path)
        return 0.9

    assert not policy.decide(0.75, measure).promoted  # 0.75 < 0.9 - 0.1
    assert policy.decide(0.85, measure).promoted
    assert measured and (measured[0] / "adapter_config.json").is_file()


def test_a_promotion_metric_must_be_one_that_is_computed() -> None:
    doc = yaml.safe_load(EXAMPLE_MANIFEST)
    doc["spec"]["promotion"] = {"metric": "contains"}
    with pytest.raises(ManifestError, match=r"promotion\.metric 'contains' must be one of"):
        validate_document(doc, "job")


def test_a_warm_start_skips_an_adapter_on_other_layers(tiny_model: Path, tmp_path: Path) -> None:
    """With the default targets ('auto'), the published adapter's layers are compared with
    the ones this run adapts: q/v weights are not loaded into a q/k/v/o adapter."""
    from safetensors.torch import save_file

    from service.manifest.spec import LoraSpec, ModelSpec, QuantizationSpec
    from service.model import Device, add_lora, load_quantized_model

    quant = QuantizationSpec()
    base = load_quantized_model(
        tiny_model, ModelSpec(source=str(tiny_model)), quant, "fp32", Device("cpu", "cpu")
    )
    peft_model = add_lora(base, LoraSpec(), quant)
    published = tmp_path / "published"
    published.mkdir()
    config = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    (published / "adapter_config.json").write_text(json.dumps(config))
    before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    save_file(
        {k.replace(".default", ""): v + 1 for k, v in before.items() if "k_proj" not in k},
        str(published / "adapter_model.safetensors"),
    )
    doc = yaml.safe_load(EXAMPLE_MANIFEST)
    del doc["spec"]["lora"]["target_modules"]
    policy = RetrainingPolicy(
        RunHistory(open_storage(str(tmp_path / "out"))),
        validate_document(doc, "job").spec,
        tmp_path / "work",
    )
    policy.published_adapter = lambda: published  # type: ignore[method-assign]
    policy.warm_start(peft_model)
    after = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert all(after[k].equal(v) for k, v in before.items())
