"""`spotlora estimate`: the throughput model against its measured anchors, what it learns from
a run, and the README's job on the price table's GPUs without weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from service.estimate.gpus import DEFAULT_PRICES, gpu_of_device, gpu_of_instance
from service.estimate.throughput import (
    ANCHORS,
    Measured,
    Shape,
    Workload,
    estimate,
    prior_tokens_per_second,
)
from tests.conftest import REPO
from tests.jobs import manifest, run_in_process

MISTRAL_7B = Shape(7_241_732_096, 4096, 32, 14336, 32000)


def test_the_prior_gives_the_measured_anchor_rates_back() -> None:
    """The bf16 anchor was measured on an H100, which takes that path; the fp16 one is the
    T4 path, whose MFU a T4's 65 TFLOP/s turns into a T4's rate."""
    rate, micro = ANCHORS["bf16"]
    h100 = prior_tokens_per_second(Workload("H100", MISTRAL_7B, micro, 500.0))
    assert h100 == pytest.approx(rate, rel=0.01)
    rate, micro = ANCHORS["fp16"]
    t4 = prior_tokens_per_second(Workload("T4", MISTRAL_7B, micro, 500.0))
    assert t4 == pytest.approx(rate * 65 / 989, rel=0.05)  # the peaks' ratio, less traffic


def test_small_micro_batches_pay_the_weight_traffic() -> None:
    small, large = (prior_tokens_per_second(Workload("T4", MISTRAL_7B, m, 400.0)) for m in (1, 16))
    assert small < large * 0.8


def test_the_nearest_measured_runs_correct_the_prior() -> None:
    work = Workload("T4", MISTRAL_7B, 8, 450.0)
    prior = prior_tokens_per_second(work)
    other_shape = Shape(1_000_000_000, 2048, 16, 8192, 32000)
    runs = [
        Measured("same", work, prior * 0.5),
        Measured("same-gpu", Workload("T4", other_shape, 8, 450.0), prior * 2),
        Measured("l4", Workload("L4", MISTRAL_7B, 8, 450.0), 1.0),
    ]
    got = estimate(work, runs)
    assert got.basis == "same shape and GPU"
    assert got.tokens_per_second == pytest.approx(prior * 0.5)
    assert [r["run_id"] for r in got.runs] == ["same"]
    assert got.runs[0]["prior_off_percent"] == pytest.approx(100.0)
    # Another micro-batch on the same shape and GPU keeps the ratio, not the rate.
    bigger = Workload("T4", MISTRAL_7B, 16, 450.0)
    assert estimate(bigger, runs).tokens_per_second == pytest.approx(
        prior_tokens_per_second(bigger) * 0.5
    )
    # No run of this shape: the same GPU's runs; none of this GPU: the same path's.
    assert estimate(Workload("T4", Shape(3, 1, 1, 1, 1), 8, 450.0), runs).basis == "same GPU"
    a10g = estimate(Workload("A10G", MISTRAL_7B, 8, 450.0), runs)
    assert a10g.basis == "same path (bf16)" and [r["run_id"] for r in a10g.runs] == ["l4"]
    assert estimate(work, []).basis == "prior"


def test_devices_and_instance_types_name_their_gpu() -> None:
    assert gpu_of_device("Tesla T4") == "T4"
    assert gpu_of_device("NVIDIA A10G") == "A10G"
    assert gpu_of_device("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert gpu_of_device("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_of_device("cpu") == "cpu"
    assert gpu_of_device("Some Future GPU") is None
    assert gpu_of_instance("g5.2xlarge") == "A10G"
    assert gpu_of_instance("custom", {"gpu": "L4"}) == "L4"
    assert gpu_of_instance("custom") is None


def test_the_built_in_prices_are_the_shipped_price_table() -> None:
    shipped = yaml.safe_load((REPO / "k8s/base/prices.yaml").read_text())
    assert shipped == DEFAULT_PRICES
    assert {gpu_of_instance(t) for t in shipped} >= {"T4", "L4", "A10G"}


@pytest.fixture(scope="module")
def weightless_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral-7B's config and a tokenizer; the weights file is not a model at all, so a
    command that read it would fail."""
    from transformers import MistralConfig

    from examples.samples import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("mistral-7b-shape")
    MistralConfig().save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not weights")
    return path


@pytest.fixture(scope="module")
def alpaca_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough rows that training, not start-up, is most of the README job's time."""
    from examples.samples import write_synthetic_task

    return write_synthetic_task(tmp_path_factory.mktemp("data") / "train.jsonl", n=3000, seed=5)


def estimate_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    from service.cli import main

    capsys.readouterr()
    code = main(["estimate", *argv, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return json.loads(out.out)


def test_the_readme_job_on_t4_l4_and_a10g_without_weights(
    weightless_mistral: Path, alpaca_rows: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import EXAMPLE_MANIFEST

    (tmp_path / "job.yaml").write_text(EXAMPLE_MANIFEST)
    sets = [
        f"model.source={weightless_mistral}",
        f"data.train={alpaca_rows}",
        f"output.uri={tmp_path / 'out'}",
    ]
    argv = ["-f", str(tmp_path / "job.yaml"), *(a for s in sets for a in ("--set", s))]
    types = ["--instance-type", "g4dn.xlarge", "--instance-type", "g6.xlarge"]
    result = estimate_json(capsys, *argv, *types, "--instance-type", "g5.xlarge")
    assert result["shape"]["params"] == MISTRAL_7B.params
    by_gpu = {c["gpu"]: c for c in result["candidates"]}
    assert set(by_gpu) == {"T4", "L4", "A10G"}
    for c in by_gpu.values():
        assert c["fits"]
        assert c["tokens"] == 3 * result["tokens_per_epoch"]  # epochs: 3
        assert c["throughput"]["basis"] == "prior"
        assert c["wall_seconds"] > c["train_seconds"] + c["setup_seconds"]  # preemptions
        assert 0 < c["spot_usd"] < c["on_demand_usd"]
    assert by_gpu["T4"]["peak_gib"] < 14.6
    assert by_gpu["L4"]["tokens_per_second"] > by_gpu["T4"]["tokens_per_second"]
    # The example's batch_size is auto: each GPU's memory picks its own micro-batch.
    assert by_gpu["L4"]["micro_batch"] > by_gpu["T4"]["micro_batch"] > 4
    fixed = estimate_json(capsys, *argv, *types, "--set", "training.batch_size=4")
    assert {c["micro_batch"] for c in fixed["candidates"]} == {4}


def test_the_second_estimate_of_a_job_is_within_15_percent_of_the_first_run(
    tiny_model: Path,
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.report import summary

    prices = tmp_path / "prices.yaml"
    prices.write_text("local-cpu: {spot_hour_usd: 0.5, on_demand_hour_usd: 1.5, gpu: cpu}\n")
    monkeypatch.setenv("SPOTLORA_PRICE_TABLE", str(prices))
    monkeypatch.setenv("SPOTLORA_INSTANCE_TYPE", "local-cpu")
    out = tmp_path / "out"
    job = manifest(
        "estimated", str(tiny_model), str(tiny_data), str(out), training={"max_steps": None}
    )
    run_in_process(job, tmp_path, "estimated", monkeypatch)
    record = json.loads((out / "run.json").read_text())
    trained = record["cost"]["trained_tokens"]
    timings = record["timings"]
    train_seconds = timings["train_seconds"] - timings["setup_seconds"]
    # The run estimated itself at its start, with the tokens it then trained.
    assert record["estimate"]["tokens"] == trained
    assert record["throughput"]["trained_tokens"] == trained
    assert record["throughput"]["train_seconds"] == pytest.approx(train_seconds, abs=1e-3)

    second = estimate_json(capsys, "-f", str(tmp_path / "estimated.yaml"))
    (cand,) = second["candidates"]
    assert cand["instance_type"] == "local-cpu" and cand["tokens"] == trained
    assert cand["throughput"]["basis"] == "same shape and GPU"
    assert [r["run_id"] for r in cand["throughput"]["runs"]] == ["estimated"]
    assert abs(cand["train_seconds"] - train_seconds) <= 0.15 * train_seconds
    assert second["interruptions"]["history_runs"] == 1
    facts = summary(record)
    assert facts["cost, estimated / actual"].count("$") == 2
    assert facts["minutes, estimated / actual"] != "- / -"
