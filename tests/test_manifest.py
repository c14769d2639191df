"""The manifest's rules, each checked by the message a user reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import EXAMPLE_MANIFEST, _parser, dispatch
from service.errors import ManifestError
from service.manifest import FineTuneJob, load_manifest, validate_document
from service.manifest.load import (
    MAX_MANIFEST_BYTES,
    apply_overrides,
    parse_document,
    read_manifest_bytes,
)
from service.model import Device, check_compile_supported, resolve_compute_dtype
from service.settings import RuntimeSettings
from tests.jobs import ENTRYPOINT

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
    assert job.spec.training.batch_size == "auto"
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


def test_chat_template_is_a_known_name_or_jinja() -> None:
    doc = example()
    doc["spec"]["data"].update(format="chat", chat_template="zephyr")
    assert validate_document(doc, "x").spec.data.chat_template == "zephyr"
    doc["spec"]["data"]["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert validate_document(doc, "x").spec.data.chat_template.startswith("{% for")
    doc["spec"]["data"]["chat_template"] = "chatm1"
    message = error_for(doc)
    assert "'chatm1' is neither a template name (chatml, llama-3, zephyr)" in message


def test_chat_template_syntax_error_is_a_validation_error(tmp_path: Path) -> None:
    """Found by `validate` and by `run` before any download: exit 2, the line and the fault."""
    doc = example()
    broken = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"
    doc["spec"]["data"].update(format="chat", chat_template=broken)
    assert "not a valid Jinja template: line 2: unexpected '}'" in error_for(doc)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "run", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SPOTLORA_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert done.returncode == 2, done.stderr
    assert "not a valid Jinja template: line 2" in done.stderr


def test_chat_template_only_with_chat_rows() -> None:
    doc = example()
    doc["spec"]["data"]["chat_template"] = "chatml"
    assert "data.chat_template applies to format 'chat' only, not 'alpaca'" in error_for(doc)


def test_shipped_chat_templates_render_as_their_models_do() -> None:
    """Each named template, rendered by transformers, prompt and all: the prompt (with the
    generation prompt) is a prefix of the whole conversation, as completion-only loss needs."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from service.chat_templates import TEMPLATES

    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    expected = {
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n",
        "llama-3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
        "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n",
    }
    assert set(TEMPLATES) == set(expected)
    for name, template in TEMPLATES.items():
        tokens = {"bos_token": "<s>", "eos_token": "</s>"}
        whole = render_jinja_template([chat], chat_template=template, **tokens)[0][0]
        prompt = render_jinja_template(
            [chat[:2]], chat_template=template, add_generation_prompt=True, **tokens
        )[0][0]
        assert whole == expected[name], name
        assert whole.startswith(prompt), name


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


# -- hostile input: every byte enters through one gate -------------------------------------

MERGE_KEY_BOMB = "x0: &x0 {k: v}\n" + "".join(
    f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * 9)}]}}\n" for i in range(1, 10)
)
ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
PEAK_MEMORY_LIMIT_BYTES = 8 * 2**20


def _parse_peak_bytes(parse: Any) -> tuple[str, int]:
    """The ManifestError ``parse()`` raises, and the peak memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as info:
            parse()
        return str(info.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _from_file(path: Path) -> Any:
    return load_manifest(cli_manifest=str(path), env_inline=None, env_uri=None)


def test_binary_manifest_file_names_the_file_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"apiVersion: spotlora/v1\nkind: \xffFineTuneJob\n")
    with pytest.raises(ManifestError) as info:
        _from_file(path)
    assert str(info.value) == (
        f"{path}: not UTF-8 text: byte 0xff at line 2, column 7 (byte offset 30); "
        "a manifest is YAML or JSON in UTF-8"
    )


def test_binary_inline_manifest_names_the_byte() -> None:
    """Python hands an environment variable's undecodable bytes over as lone surrogates."""
    undecodable = b"apiVersion: spotlora/v1\nkind: \xfe\xff\n".decode("utf-8", "surrogateescape")
    with pytest.raises(ManifestError) as info:
        load_manifest(cli_manifest=None, env_inline=undecodable, env_uri=None)
    assert str(info.value) == (
        "$SPOTLORA_MANIFEST: not UTF-8 text: byte 0xfe at line 2, column 7; "
        "a manifest is YAML or JSON in UTF-8"
    )


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + EXAMPLE_MANIFEST.encode())
    assert _from_file(path).job.metadata.name == "mistral-alpaca"


def test_binary_s3_manifest_names_the_uri(bucket: str) -> None:
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="job.yaml", Body=b"kind: \x80\n")
    uri = f"s3://{bucket}/job.yaml"
    with pytest.raises(ManifestError, match=rf"^{uri}: not UTF-8 text: byte 0x80 at line 1"):
        load_manifest(cli_manifest=None, env_inline=None, env_uri=uri)


def test_oversized_s3_manifest_is_refused_before_the_get(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    from service.storage import S3Storage

    body = b"#" * (MAX_MANIFEST_BYTES + 1)
    boto3.client("s3").put_object(Bucket=bucket, Key="big.yaml", Body=body)

    def no_get(self: S3Storage, key: str) -> bytes:
        raise AssertionError(f"GET {key} before the size check")

    monkeypatch.setattr(S3Storage, "read_bytes", no_get)
    uri = f"s3://{bucket}/big.yaml"
    with pytest.raises(ManifestError) as info:
        load_manifest(cli_manifest=uri, env_inline=None, env_uri=None)
    assert str(info.value) == (
        f"{uri}: larger than 256 KiB; a manifest is a few KB "
        "(data goes in data.train, not in the manifest)"
    )


def test_missing_s3_manifest_is_named(bucket: str) -> None:
    uri = f"s3://{bucket}/nope.yaml"
    with pytest.raises(ManifestError, match=rf"^{uri}: manifest not found$"):
        load_manifest(cli_manifest=uri, env_inline=None, env_uri=None)


def test_50_mb_manifest_is_refused_before_parsing_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    label = "    label-{:08d}: value-padding-padding-padding\n"
    head = EXAMPLE_MANIFEST.replace("metadata:\n", "metadata:\n  labels:\n", 1)
    with path.open("w") as f:
        f.write(head.split("  labels:\n")[0] + "  labels:\n")
        for i in range(50 * 2**20 // len(label)):
            f.write(label.format(i))
    assert path.stat().st_size > 50 * 10**6
    message, peak = _parse_peak_bytes(lambda: _from_file(path))
    assert message.startswith(f"{path}: larger than 256 KiB")
    assert peak < PEAK_MEMORY_LIMIT_BYTES


def test_endless_manifest_is_read_no_further_than_the_limit() -> None:
    """/dev/zero never ends: a reader that read the whole file would never return."""
    assert len(read_manifest_bytes("/dev/zero")) == MAX_MANIFEST_BYTES + 1
    with pytest.raises(ManifestError, match=r"^/dev/zero: larger than 256 KiB"):
        _from_file(Path("/dev/zero"))


def test_oversized_inline_manifest_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"^\$SPOTLORA_MANIFEST: larger than 256 KiB"):
        load_manifest(cli_manifest=None, env_inline="#" * 300_000, env_uri=None)


def test_merge_key_bomb_is_refused_in_bounded_memory() -> None:
    """Nine levels of nine merges: 9**9 mapping entries for safe_load, minutes and gigabytes."""
    message, peak = _parse_peak_bytes(lambda: parse_document(MERGE_KEY_BOMB, "job.yaml"))
    assert message == (
        "job.yaml: refused at line 5: expands to more than 10,000 values (aliases '*' or merge "
        "keys '<<' repeating a node); a manifest has a few hundred"
    )
    assert peak < PEAK_MEMORY_LIMIT_BYTES


def test_classic_alias_bomb_is_refused_in_bounded_memory() -> None:
    message, peak = _parse_peak_bytes(lambda: parse_document(ALIAS_BOMB, "job.yaml"))
    assert "expands to more than 10,000 values" in message
    assert peak < PEAK_MEMORY_LIMIT_BYTES


def test_aliases_within_the_limit_still_work() -> None:
    doc = parse_document("base: &b {r: 8, alpha: 16}\nlora: {<<: *b, r: 4}\n", "job.yaml")
    assert doc["lora"] == {"r": 4, "alpha": 16}


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # libyaml's composer would crash the process
        "{a: " * 50_000 + "b" + "}" * 50_000,
        "".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "v\n",
    ],
    ids=["flow-sequences", "flow-mappings", "block-mappings"],
)
def test_deep_nesting_is_refused(text: str) -> None:
    message, peak = _parse_peak_bytes(lambda: parse_document(text, "job.yaml"))
    assert message.startswith("job.yaml: refused at line ")
    assert message.endswith(": nested deeper than 64 levels")
    assert peak < PEAK_MEMORY_LIMIT_BYTES


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"^job\.yaml: refused at line 1: alias \*a refers"):
        parse_document("a: &a {b: *a}\n", "job.yaml")


def test_unreadable_value_names_the_line() -> None:
    """PyYAML's constructors raise a bare ValueError for these: a traceback before."""
    with pytest.raises(ManifestError) as info:
        parse_document("metadata:\n  name: 2024-13-45\n", "job.yaml")
    assert str(info.value) == (
        "job.yaml: not valid YAML/JSON at line 2, column 9: cannot read this value: "
        "month must be in 1..12"
    )
    with pytest.raises(ManifestError, match="line 1, column 4: cannot read this value: Exceeds"):
        parse_document("a: " + "9" * 5000, "job.yaml")
    with pytest.raises(ManifestError, match="line 1, column 4: cannot read this value: 'maybe'"):
        parse_document("a: !!bool maybe", "job.yaml")  # a KeyError


def test_control_character_names_the_line() -> None:
    with pytest.raises(ManifestError, match=r"^job\.yaml: not valid YAML/JSON at line 2, column 4"):
        parse_document("a: b\nc: \x00\n", "job.yaml")


def test_override_values_go_through_the_same_gate() -> None:
    with pytest.raises(ManifestError, match=r"^--set lora\.target_modules: refused at line 1"):
        apply_overrides(example(), ["lora.target_modules=" + "[" * 1000 + "]" * 1000])
    with pytest.raises(ManifestError, match=r"^--set metadata\.name: not UTF-8 text: byte 0xff"):
        apply_overrides(example(), ["metadata.name=\udcff"])  # argv's undecodable byte


# -- URIs: refused in the manifest, naming the field ----------------------------------------


@pytest.mark.parametrize(
    ("section", "field", "value", "reason"),
    [
        ("output", "uri", "ftp://host/path", "unsupported scheme 'ftp://'"),
        ("output", "uri", "s3://", "the s3:// URI names no bucket"),
        ("output", "uri", "s3://bucket/../x", "the S3 key has a '..' segment"),
        ("output", "uri", "s3://Bad_Bucket/x", "'Bad_Bucket' is not a valid S3 bucket name"),
        ("checkpoint", "uri", "s3://bucket/./ckpt", "the S3 key has a '.' segment"),
        ("checkpoint", "resume_from", "gs://bucket/ckpt", "unsupported scheme 'gs://'"),
        ("data", "train", "s3://bucket//data/*.jsonl", "the S3 key has an empty segment"),
        ("data", "eval", "http://host/eval.jsonl", "unsupported scheme 'http://'"),
        ("model", "source", "hf://org/name", "unsupported scheme 'hf://'"),
        ("metrics", "pushgateway_url", "pushgateway:9091", "use an http:// or https:// URL"),
        ("preemption", "aws_metadata_endpoint", "169.254.169.254", "use an http:// or https://"),
        ("preemption", "gce_metadata_endpoint", "http://", "the URL names no host"),
    ],
)
def test_uri_fields_are_checked_naming_the_field(
    section: str, field: str, value: str, reason: str
) -> None:
    doc = example()
    doc["spec"].setdefault(section, {})[field] = value
    if field == "eval":
        doc["spec"]["data"]["eval_fraction"] = 0
    assert f"spec.{section}.{field}: {reason}" in error_for(doc)


def test_unknown_output_scheme_reads_clearly() -> None:
    doc = example()
    doc["spec"]["output"]["uri"] = "ftp://host/path"
    assert error_for(doc) == (
        "job.yaml: invalid manifest (1 problem(s))\n"
        "  spec.output.uri: unsupported scheme 'ftp://': use a local path or s3://bucket/prefix "
        "(got 'ftp://host/path')"
    )


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("output", "uri", "../out"),
        ("data", "train", "../data/*.jsonl"),
        ("data", "train", "s3://bucket/data/b*.jsonl"),
        ("model", "source", "mistralai/Mistral-7B-v0.1"),
        ("checkpoint", "resume_from", "s3://bucket/runs/old/"),
        ("metrics", "pushgateway_url", "https://pushgateway.monitoring:9091"),
    ],
)
def test_legitimate_uris_validate(section: str, field: str, value: str) -> None:
    doc = example()
    doc["spec"].setdefault(section, {})[field] = value
    validate_document(doc, "x")


def test_pushgateway_url_with_credentials_is_refused_without_echoing_them() -> None:
    doc = example()
    doc["spec"]["metrics"] = {"pushgateway_url": "http://spotlora:hunter2@127.0.0.1:9091"}
    msg = error_for(doc)
    assert msg == (
        "job.yaml: invalid manifest (1 problem(s))\n"
        "  spec.metrics.pushgateway_url: credentials in the URL would be logged and saved in "
        "run.json: remove 'user:password@' and set SPOTLORA_PUSHGATEWAY_USERNAME and "
        "SPOTLORA_PUSHGATEWAY_PASSWORD (or SPOTLORA_PUSHGATEWAY_PASSWORD_FILE) instead"
    )
    assert "hunter2" not in msg


def test_long_values_are_echoed_shortened() -> None:
    doc = example()
    doc["spec"]["output"]["uri"] = "ftp://" + "x" * 10_000
    assert len(error_for(doc)) < 400


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        (
            {"cli_manifest": "ftp://host/job.yaml"},
            "--manifest 'ftp://host/job.yaml': unsupported scheme 'ftp://'",
        ),
        ({"env_uri": "s3://"}, "SPOTLORA_MANIFEST_URI 's3://': the s3:// URI names no bucket"),
        (
            {"env_uri": "s3://bucket/jobs/"},
            "SPOTLORA_MANIFEST_URI 's3://bucket/jobs/': names a prefix, not a file",
        ),
        ({"cli_manifest": "s3://bucket/../job.yaml"}, "has a '..' segment"),
    ],
)
def test_manifest_uri_is_checked_before_reading(kw: dict[str, str], expected: str) -> None:
    def never(uri: str) -> bytes:
        raise AssertionError(f"read {uri}")

    args = {"cli_manifest": None, "env_inline": None, "env_uri": None, **kw}
    with pytest.raises(ManifestError) as info:
        load_manifest(read_uri=never, **args)
    assert expected in str(info.value)


def test_manifest_that_is_a_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is a directory, not a manifest file"):
        _from_file(tmp_path)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["runs", "list", "ftp://host/x"], "runs list: URI 'ftp://host/x': unsupported scheme"),
        (["runs", "list", "s3://"], "runs list: URI 's3://': the s3:// URI names no bucket"),
        (["runs", "show", "s3://bucket/../x", "r1"], "has a '..' segment"),
        (["runs", "show", "/tmp/out", "../../etc"], "runs show: RUN '../../etc': must be a"),
        (["report", "s3://bucket/a//b"], "report: URI 's3://bucket/a//b': the S3 key has an"),
    ],
)
def test_cli_uri_arguments_are_checked(argv: list[str], expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        dispatch(_parser().parse_args(argv), RuntimeSettings())
    assert expected in str(info.value)


def _entrypoint(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPOTLORA_")}
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args],
        env={**environ, "SPOTLORA_LOG_FORMAT": "json", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("content", "env", "args", "expected"),
    [
        (b"kind: \xff\n", {}, ["validate", "-f", "{file}"], "not UTF-8 text: byte 0xff"),
        (MERGE_KEY_BOMB.encode(), {}, ["validate", "-f", "{file}"], "expands to more than"),
        (
            None,
            {"SPOTLORA_MANIFEST": "kind: \udcff\n"},  # sent as the raw byte 0xff
            ["validate"],
            "$SPOTLORA_MANIFEST: not UTF-8 text: byte 0xff at line 1, column 7",
        ),
        (None, {}, ["runs", "list", "s3://"], "names no bucket"),
    ],
    ids=["binary-file", "merge-key-bomb", "binary-env", "empty-bucket"],
)
def test_hostile_input_exits_2_with_one_message(
    tmp_path: Path, content: bytes | None, env: dict[str, str], args: list[str], expected: str
) -> None:
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_bytes(content)
    proc = _entrypoint([a.format(file=path) for a in args], **env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("spotlora: ")]
    assert len(said) == 1 and expected in said[0], proc.stderr


def test_manifest_dash_reads_standard_input() -> None:
    """`envsubst < job.yaml | spotlora validate -f -`: the manifest comes from the pipe."""
    doc = example()
    doc["metadata"]["name"] = "from-stdin"
    result = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "validate", "-f", "-"],
        input=yaml.safe_dump(doc),
        env={k: v for k, v in os.environ.items() if not k.startswith("SPOTLORA_")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["metadata"]["name"] == "from-stdin"
