"""training.offload_activations: the manifest's rule, the memory it frees in the estimate, and
the hooks wrapping every training step (what they move is a CUDA matter: tests/gpu)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.errors import ManifestError
from service.fast import offload
from service.manifest.load import validate_document
from service.memory import preflight_estimate
from tests.jobs import manifest, run_in_process


def test_offload_without_checkpointing_is_refused_naming_both_fields() -> None:
    doc = manifest("j", "m", "d.jsonl", "o", training={"offload_activations": True})
    with pytest.raises(ManifestError, match=r"offload_activations.*gradient_checkpointing"):
        validate_document(doc, "job.yaml")


def test_offload_takes_the_checkpointed_inputs_out_of_the_estimate() -> None:
    from bench.common import PRESETS, model_config

    def per_row(offloaded: bool) -> int:
        training = {"gradient_checkpointing": True, "offload_activations": offloaded}
        doc = manifest("j", "m", "d.jsonl", "o", training=training)
        doc["spec"]["data"]["max_length"] = 512
        spec = validate_document(doc, "job.yaml").spec
        return preflight_estimate(spec, model_config("mistral-7b")).per_sequence_bytes

    shape = PRESETS["mistral-7b"]
    inputs = shape["num_hidden_layers"] * shape["hidden_size"] * 2 * 512  # fp16, per row
    assert per_row(False) - per_row(True) == pytest.approx(inputs, abs=1)


def test_every_training_step_runs_under_the_hooks(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed: list[int] = []
    original = offload._pack

    def counting(tensor: Any) -> Any:
        packed.append(tensor.numel())
        return original(tensor)

    monkeypatch.setattr(offload, "_pack", counting)
    losses = {}
    for offloaded in (False, True):
        packed.clear()
        out = tmp_path / f"out-{offloaded}"
        training = {"max_steps": 3, "gradient_checkpointing": True}
        training["offload_activations"] = offloaded
        job = manifest("offload", str(tiny_model), str(tiny_data), str(out), training=training)
        losses[offloaded] = run_in_process(job, tmp_path, str(offloaded), monkeypatch)
        assert bool(packed) is offloaded
    assert losses[True] == losses[False]  # on CPU nothing moves: the very same run
