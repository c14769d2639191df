"""The merged export's pre-flight, its figures and its prompts, without loading a model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.common import model_config
from service.errors import ExitCode, ManifestError
from service.export import (
    RUNTIME_BYTES,
    TOLERANCES,
    ExportMismatch,
    available_memory,
    compare_logits,
    export_dtype,
    held_by_this_process,
    merge_needs,
    preflight,
    verification_prompts,
)
from service.manifest import FineTuneJob, JobSpec

GIB = 2**30
CGROUP = "the cgroup limit, /sys/fs/cgroup/memory.max"
MISTRAL_7B_PARAMETERS = 7_241_732_096  # bench.common's Mistral-7B-v0.1 shape


def job_spec(**export: Any) -> JobSpec:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "spotlora/v1",
            "kind": "FineTuneJob",
            "metadata": {"name": "export-test"},
            "spec": {
                "model": {"source": "/models/base"},
                "data": {"train": "/data/train.jsonl"},
                "output": {"uri": "s3://bucket/jobs/export-test/"},
                "export": {"merged": True, **export},
            },
        }
    ).spec


def llama_config(dtype: str | None = "bfloat16", **dims: Any) -> Any:
    from transformers import LlamaConfig

    config = LlamaConfig(**dims) if dims else model_config("mistral-7b")
    config.dtype = dtype
    return config


def tiny_config(dtype: str | None = "float32") -> Any:
    return llama_config(
        dtype,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def never(*args: Any) -> Any:
    raise AssertionError("the pre-flight must not measure anything when export is off")


# --------------------------------------------------------------------------- pre-flight


def test_merge_needs_counts_a_7b_base_from_its_config() -> None:
    needs = merge_needs(job_spec(base="original"), llama_config())
    assert needs.dtype == "bf16"  # auto: the config's own
    assert needs.weights_bytes == 2 * MISTRAL_7B_PARAMETERS
    # r=8 on q/k/v/o, 32 layers, fp32: (4096+4096) + (4096+1024) x 2 + (4096+4096), x 8 x 4 B
    assert needs.adapter_bytes == 32 * 8 * 4 * (8192 + 5120 + 5120 + 8192)
    assert needs.disk_bytes > needs.weights_bytes
    # Measured: 16.9 GiB peak resident for this shape (service/export); not 2x the weights.
    assert 16.9 * GIB < needs.memory_bytes < 20 * GIB


def test_merging_into_the_trained_base_counts_its_4_bit_layers_too() -> None:
    """transformers' dequantize() keeps every replaced 4-bit layer until it has replaced the
    last: the 4-bit copy of the decoder's linear layers sits beside the dequantized weights."""
    original = merge_needs(job_spec(base="original"), llama_config())
    trained = merge_needs(job_spec(), llama_config())
    linear = MISTRAL_7B_PARAMETERS - 2 * 32000 * 4096 - (2 * 32 + 1) * 4096  # less embed/norms
    assert trained.working_bytes - original.working_bytes == int(linear * (0.5 + 4 / 64))
    assert trained.weights_bytes == original.weights_bytes
    assert trained.disk_bytes == original.disk_bytes


def test_merge_needs_follows_the_export_dtype() -> None:
    assert merge_needs(job_spec(dtype="fp32"), llama_config()).weights_bytes == (
        4 * MISTRAL_7B_PARAMETERS
    )
    assert merge_needs(job_spec(), tiny_config()).dtype == "fp32"


@pytest.mark.parametrize(
    ("requested", "declared", "expected"),
    [
        ("auto", "bfloat16", "bf16"),
        ("auto", "float16", "fp16"),
        ("auto", "float32", "fp32"),
        ("auto", "torch.bfloat16", "bf16"),
        ("auto", None, "bf16"),
        ("fp32", "bfloat16", "fp32"),
    ],
)
def test_export_dtype(requested: str, declared: str | None, expected: str) -> None:
    assert export_dtype(requested, llama_config(declared)) == expected


def test_preflight_refuses_too_little_memory_at_minute_zero() -> None:
    with pytest.raises(ManifestError) as caught:
        preflight(
            job_spec(),
            llama_config(),
            Path("/nonexistent/cache"),
            memory=lambda: (16 * GIB, CGROUP),
            disk_free=lambda path: 100 * GIB,
        )
    message = str(caught.value)
    assert message.startswith("spec.export.merged: the merge needs ~")
    assert "the base in bf16: 13.5 GiB" in message
    assert f"may use 16.0 GiB ({CGROUP})" in message
    assert "spotlora export s3://bucket/jobs/export-test/" in message  # the way out
    assert "k8s/examples/export-job.yaml" in message
    assert caught.value.exit_code == ExitCode.INVALID_INPUT


def test_preflight_passes_with_enough_memory_and_disk() -> None:
    seen: list[Path] = []

    def disk_free(path: Path) -> int:
        seen.append(path)
        return 100 * GIB

    preflight(
        job_spec(),
        llama_config(),
        Path("/nonexistent/cache/dir"),
        memory=lambda: (24 * GIB, CGROUP),
        disk_free=disk_free,
    )
    assert seen == [Path("/")]  # the nearest directory that exists


def test_preflight_counts_what_the_run_keeps_beside_the_merge() -> None:
    """24 GiB holds the 7B's merge alone (above); not with 8 GiB of the run's own beside it."""
    with pytest.raises(ManifestError, match=r"what the run keeps beside it 8\.00 GiB"):
        preflight(
            job_spec(),
            llama_config(),
            Path("/"),
            memory=lambda: (24 * GIB, CGROUP),
            disk_free=lambda path: 100 * GIB,
            held_bytes=8 * GIB,
        )


def test_what_a_process_holds_is_its_anonymous_memory_beyond_the_runtime(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text(f"VmRSS:\t{6 * GIB // 1024} kB\nRssAnon:\t{4 * GIB // 1024} kB\n")
    assert held_by_this_process(status) == 4 * GIB - RUNTIME_BYTES
    status.write_text("RssAnon:\t1024 kB\n")
    assert held_by_this_process(status) == 0
    assert held_by_this_process(tmp_path / "missing") == 0


def test_preflight_refuses_too_little_disk_for_the_staged_shards(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"spec\.export\.merged: the merged files need ~13\."):
        preflight(
            job_spec(),
            llama_config(),
            tmp_path,
            memory=lambda: (64 * GIB, CGROUP),
            disk_free=lambda path: 10 * GIB,
        )


def test_preflight_says_the_callers_way_out() -> None:
    with pytest.raises(ManifestError, match=r"give this Job more memory$"):
        preflight(
            job_spec(),
            tiny_config(),
            Path("/"),
            memory=lambda: (RUNTIME_BYTES, CGROUP),
            disk_free=lambda path: GIB,
            way_out="give this Job more memory",
        )


def test_preflight_measures_nothing_when_export_is_off() -> None:
    preflight(job_spec(merged=False), llama_config(), Path("/"), memory=never, disk_free=never)


def test_preflight_refuses_a_base_stored_quantized() -> None:
    config = tiny_config()
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ManifestError, match=r"stored quantized.*transformers #31293"):
        preflight(job_spec(), config, Path("/"), memory=lambda: (64 * GIB, CGROUP), disk_free=never)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:    2048 kB\n"


def test_available_memory_reads_cgroup_v2(tmp_path: Path) -> None:
    write(tmp_path / "cg" / "memory.max", "21474836480\n")
    meminfo = write(tmp_path / "meminfo", MEMINFO)
    assert available_memory(tmp_path / "cg", meminfo) == (
        20 * GIB,
        f"the cgroup limit, {tmp_path / 'cg' / 'memory.max'}",
    )


def test_available_memory_reads_cgroup_v1(tmp_path: Path) -> None:
    limit = write(tmp_path / "cg" / "memory" / "memory.limit_in_bytes", "4294967296\n")
    meminfo = write(tmp_path / "meminfo", MEMINFO)
    assert available_memory(tmp_path / "cg", meminfo) == (4 * GIB, f"the cgroup limit, {limit}")


@pytest.mark.parametrize(
    ("v2", "v1"), [("max\n", None), (None, "9223372036854771712\n"), (None, None)]
)
def test_available_memory_without_a_limit_is_memavailable(
    tmp_path: Path, v2: str | None, v1: str | None
) -> None:
    if v2 is not None:
        write(tmp_path / "cg" / "memory.max", v2)
    if v1 is not None:
        write(tmp_path / "cg" / "memory" / "memory.limit_in_bytes", v1)
    meminfo = write(tmp_path / "meminfo", MEMINFO)
    assert available_memory(tmp_path / "cg", meminfo) == (2048 * 1024, f"MemAvailable, {meminfo}")


def test_available_memory_on_this_machine_is_positive() -> None:
    limit, origin = available_memory()
    assert limit > 0 and origin


# --------------------------------------------------------------------------- comparison


def test_identical_logits_agree_exactly() -> None:
    logits = [torch.randn(5, 11), torch.randn(3, 11)]
    agreement = compare_logits(logits, [x.clone() for x in logits])
    assert agreement.positions == 8
    assert agreement.mean_kl == pytest.approx(0, abs=1e-15)
    assert agreement.max_kl == pytest.approx(0, abs=1e-15)
    assert agreement.top1_agreement == 1.0
    assert agreement.max_top1_logprob_diff == pytest.approx(0, abs=1e-12)


def test_kl_is_of_the_reference_against_the_candidate() -> None:
    # p = (1/2, 1/2), q = (3/4, 1/4): KL(p || q) = ln(2/3)/2 + ln(2)/2.
    reference = [torch.zeros(2, 2)]
    candidate = [torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])]
    agreement = compare_logits(reference, candidate)
    expected = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    assert agreement.max_kl == pytest.approx(expected)
    assert agreement.mean_kl == pytest.approx(expected / 2)


def test_a_flipped_top_token_is_counted() -> None:
    reference = [torch.tensor([[2.0, 0.0], [2.0, 0.0]])]
    candidate = [torch.tensor([[0.0, 2.0], [2.0, 0.0]])]
    agreement = compare_logits(reference, candidate)
    assert agreement.top1_agreement == 0.5
    assert agreement.max_top1_logprob_diff == pytest.approx(2.0, rel=1e-6)


def test_nan_logits_are_within_no_tolerance() -> None:
    candidate = torch.zeros(3, 4)
    candidate[1, 2] = float("nan")
    agreement = compare_logits([torch.zeros(3, 4)], [candidate])
    assert math.isnan(agreement.mean_kl) and math.isnan(agreement.max_kl)
    loosest = TOLERANCES["bf16"]
    assert not (agreement.mean_kl <= loosest.mean_kl and agreement.max_kl <= loosest.max_kl)


def test_tolerances_loosen_with_fewer_mantissa_bits() -> None:
    fp32, fp16, bf16 = TOLERANCES["fp32"], TOLERANCES["fp16"], TOLERANCES["bf16"]
    assert fp32.mean_kl < fp16.mean_kl < bf16.mean_kl
    assert fp32.max_kl < fp16.max_kl < bf16.max_kl
    # A merge into the NF4 base measured mean 0.32, max 1.3 on SmolLM2 (service/export.py).
    assert bf16.mean_kl < 0.32 / 10 and bf16.max_kl < 1.3 / 10


def test_a_mismatch_is_not_retried() -> None:
    assert ExportMismatch("x").exit_code == ExitCode.DATA_UNUSABLE


# --------------------------------------------------------------------------- prompts


def test_verification_prompts_keep_the_response_of_every_row_shape() -> None:
    rows = [
        {"prompt": "### Instruction:\nAdd.\n\n### Response:\n", "completion": "4"},
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {
            "prompt": [{"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "a"}],
        },
    ]
    assert verification_prompts(rows, 4) == [
        "### Instruction:\nAdd.\n\n### Response:\n4",
        "plain text",
        "user: hi\nassistant: yo",
        "user: q\nassistant: a",
    ]


def test_verification_prompts_take_the_first_n_non_empty() -> None:
    rows = [{"text": "  "}, {"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert verification_prompts(rows, 2) == ["a", "b"]
    assert verification_prompts([], 4) == []
