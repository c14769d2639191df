"""The manifest's rules, each checked by the message a user reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import EXAMPLE_MANIFEST
from service.errors import ManifestError
from service.manifest import FineTuneJob, load_manifest, validate_document
from service.manifest.load import apply_overrides, parse_document
from service.model import Device, check_compile_supported, resolve_compute_dtype

T4 = Device("cuda", "Tesla T4", (7, 5))
A100 = Device("cuda", "NVIDIA A100", (8, 0))
CPU = Device("cpu", "cpu")


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE_MANIFEST)


def error_for(doc: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as info:
        validate_document(doc, "job.yaml")
    return str(info.value)


def test_the_documented_example_validates() -> None:
    job = validate_document(example(), "example")
    assert job.spec.training.gradient_accumulation == 4
    assert job.spec.data.eval_fraction == 0.02
    assert job.spec.quantization.quant_type == "nf4"


def test_issue_example_without_optional_sections_validates() -> None:
    doc = example()
    del doc["spec"]["checkpoint"]
    assert validate_document(doc, "x").spec.checkpoint.every_steps == 50


def test_unknown_key_is_an_error_naming_the_path() -> None:
    doc = example()
    doc["spec"]["training"]["learning_rat"] = 1e-4
    msg = error_for(doc)
    assert "spec.training.learning_rat: unknown field" in msg
    assert msg.startswith("job.yaml: invalid manifest")


def test_missing_required_field_is_named() -> None:
    doc = example()
    del doc["spec"]["output"]
    assert "spec.output: required field is missing" in error_for(doc)


def test_wrong_api_version() -> None:
    doc = example()
    doc["apiVersion"] = "spotlora/v2"
    assert "apiVersion" in error_for(doc)


def test_out_of_range_value_shows_what_was_given() -> None:
    doc = example()
    doc["spec"]["training"]["learning_rate"] = -1
    assert "spec.training.learning_rate: Input should be greater than 0 (got -1)" in error_for(doc)


@pytest.mark.parametrize("name", ["Mistral", "a_b", "-x", "x" * 64, ""])
def test_name_is_dns1123_label(name: str) -> None:
    doc = example()
    doc["metadata"]["name"] = name
    assert "is not a DNS-1123 label" in error_for(doc)


def test_revision_only_for_hub_ids() -> None:
    doc = example()
    doc["spec"]["model"]["revision"] = "main"
    assert "model.revision applies to Hub ids only" in error_for(doc)
    doc["spec"]["model"]["source"] = "mistralai/Mistral-7B-v0.1"
    assert validate_document(doc, "x").spec.model.revision == "main"


def test_one_eval_source() -> None:
    doc = example()
    doc["spec"]["data"]["eval"] = "eval.jsonl"
    assert "data.eval and data.eval_fraction are exclusive" in error_for(doc)


def test_completion_loss_needs_a_prompt() -> None:
    doc = example()
    doc["spec"]["data"].update(format="text", completion_only_loss=True)
    assert "format 'text' has none" in error_for(doc)
    doc["spec"]["data"]["completion_only_loss"] = None
    assert not validate_document(doc, "x").spec.data.loss_on_completion_only


def test_eval_steps_need_eval_data() -> None:
    doc = example()
    doc["spec"]["data"]["eval_fraction"] = 0
    doc["spec"]["training"]["eval_steps"] = 10
    assert "training.eval_steps needs eval data" in error_for(doc)


def test_target_modules_not_empty() -> None:
    doc = example()
    doc["spec"]["lora"]["target_modules"] = []
    assert "must name at least one module" in error_for(doc)


def test_dtype_long_names_are_accepted() -> None:
    doc = example()
    doc["spec"]["quantization"]["compute_dtype"] = "float16"
    assert validate_document(doc, "x").spec.quantization.compute_dtype == "fp16"


def test_bf16_on_a_t4_is_refused_before_loading() -> None:
    with pytest.raises(ManifestError, match=r"bf16 needs compute capability >= 8.0.*7\.5"):
        resolve_compute_dtype("bf16", T4)


@pytest.fixture
def only_gcc_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gcc = tmp_path / "gcc"
    gcc.write_text("#!/bin/sh\n")
    gcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)


@pytest.mark.usefixtures("only_gcc_on_path")
@pytest.mark.parametrize(
    ("device", "named"), [(T4, r"Tesla T4 is 7\.5"), (CPU, "this machine has no CUDA GPU")]
)
def test_torch_compile_is_refused_where_triton_cannot_build(device: Device, named: str) -> None:
    with pytest.raises(ManifestError, match=r"spec\.training\.torch_compile: .*>= 8\.0.*" + named):
        check_compile_supported(device)
    check_compile_supported(A100)


def test_torch_compile_is_refused_without_a_c_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(ManifestError, match=r"torch_compile: Triton builds .* C compiler"):
        check_compile_supported(A100)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(ManifestError, match="C compiler"):
        check_compile_supported(A100)


@pytest.mark.parametrize(
    ("requested", "device", "expected"),
    [("auto", T4, "fp16"), ("auto", A100, "bf16"), ("auto", CPU, "fp32"), ("fp16", A100, "fp16")],
)
def test_auto_dtype(requested: str, device: Device, expected: str) -> None:
    assert resolve_compute_dtype(requested, device) == expected


def test_every_field_is_described_in_the_schema() -> None:
    schema = FineTuneJob.model_json_schema(by_alias=True)
    missing = []
    for name, definition in schema.get("$defs", {}).items():
        for field, prop in definition.get("properties", {}).items():
            if "description" not in prop:
                missing.append(f"{name}.{field}")
    assert not missing, missing
    assert schema["additionalProperties"] is False


def test_overrides_apply_relative_to_spec_and_are_validated() -> None:
    doc = apply_overrides(example(), ["training.learning_rate=1e-4", "metadata.name=other"])
    job = validate_document(doc, "x")
    assert job.spec.training.learning_rate == 1e-4
    assert job.metadata.name == "other"
    doc = apply_overrides(example(), ["training.lr=1"])
    assert "spec.training.lr: unknown field" in error_for(doc)


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(ManifestError, match=r"expected dotted\.path=value"):
        apply_overrides(example(), ["training.learning_rate"])


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ManifestError, match="at line 2, column 3"):
        parse_document("a: 1\n b: 2\n", "job.yaml")


def test_json_manifest_is_read() -> None:
    assert parse_document(json.dumps(example()), "job.json")["kind"] == "FineTuneJob"


def _load(**kw: Any) -> Any:
    texts = {
        "file.yaml": EXAMPLE_MANIFEST.replace("mistral-alpaca", "from-file", 1),
        "env-uri.yaml": EXAMPLE_MANIFEST.replace("mistral-alpaca", "from-uri", 1),
    }
    return load_manifest(read_uri=texts.__getitem__, **kw)


def test_source_precedence_cli_then_env_inline_then_env_uri() -> None:
    inline = EXAMPLE_MANIFEST.replace("mistral-alpaca", "inline", 1)
    both = _load(cli_manifest="file.yaml", env_inline=inline, env_uri="env-uri.yaml")
    assert both.job.metadata.name == "from-file"
    env = _load(cli_manifest=None, env_inline=inline, env_uri="env-uri.yaml")
    assert env.job.metadata.name == "inline"
    assert env.origin == "$SPOTLORA_MANIFEST"
    uri = _load(cli_manifest=None, env_inline=None, env_uri="env-uri.yaml")
    assert uri.job.metadata.name == "from-uri"


def test_no_source_says_how_to_give_one() -> None:
    with pytest.raises(ManifestError, match="SPOTLORA_MANIFEST_URI"):
        _load(cli_manifest=None, env_inline=None, env_uri=None)


def test_manifest_hash_ignores_formatting() -> None:
    a = _load(cli_manifest=None, env_inline=EXAMPLE_MANIFEST, env_uri=None)
    b = _load(cli_manifest=None, env_inline=json.dumps(example()), env_uri=None)
    assert a.sha256 == b.sha256
