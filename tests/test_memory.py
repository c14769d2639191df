"""The pre-flight memory estimate, checked against a peak measured on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from service.manifest import validate_document
from service.model import preflight_estimate

REPO = Path(__file__).resolve().parents[1]
MEASURED = REPO / "bench" / "results" / "2026-11-28-h200-t4-emulation.json"


def job(model: str, **training: object) -> dict:
    return {
        "apiVersion": "spotlora/v1",
        "kind": "FineTuneJob",
        "metadata": {"name": "m"},
        "spec": {
            "model": {"source": model},
            "data": {"train": "d.jsonl", "max_length": 512},
            "training": training,
            "output": {"uri": "o"},
        },
    }


def test_estimate_from_config_is_within_15_percent_of_the_measured_peak() -> None:
    """bench/results holds the peak allocated by the default recipe on a 7B Mistral shape in
    T4 emulation (fp16, 15 GiB cap, batch auto -> 16), measured on an H200."""
    from bench.common import model_config

    record = next(
        r for r in json.loads(MEASURED.read_text())["results"] if r["variant"] == "spotlora"
    )
    run = record["runs"][0]
    spec = validate_document(job("unused", batch_size=run["batch_size"]), "t").spec
    estimate = preflight_estimate(spec, model_config("mistral-7b"))
    predicted = estimate.total_bytes(run["batch_size"]) / 2**30
    assert abs(predicted - run["peak_allocated_gib"]) / run["peak_allocated_gib"] < 0.15


def test_validate_prints_the_estimate_as_yaml_comments(tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(str(tiny_model))))
    proc = subprocess.run(
        [sys.executable, "entrypoint.py", "validate", "-f", str(path), "--gpu-memory-gib", "15"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# memory estimate for a 15 GiB GPU: batch_size auto -> 64" in proc.stdout
    assert yaml.safe_load(proc.stdout)["spec"]["training"]["batch_size"] == "auto"
