"""The benchmark's model shapes are what they say: each builds from its config (on the meta
device, no weights) with the parameter count the MFU figures divide by."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.common import PRESETS, model_config, param_count
from service.model import attention_implementation

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count_matches_the_built_model(preset: str) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(preset))
    assert sum(p.numel() for p in model.parameters()) == param_count(preset)


@pytest.mark.parametrize(
    ("preset", "attention"), [("qwen3-8b", "sdpa"), ("gemma-2-2b", "eager"), ("mistral-7b", "sdpa")]
)
def test_preset_attention_implementation(preset: str, attention: str) -> None:
    assert attention_implementation(model_config(preset)) == attention


def test_a_variant_named_at_image_runs_in_the_images_conditions(tmp_path) -> None:
    """`spotlora-without-rotary@image:8` is the lab variant's command plus the image's
    conditions: a process started in image_environment finds no compiler and no toolkit
    (and says so when one is set back), so its figures are labelled with what they ran in."""
    import argparse
    import subprocess
    import sys

    from bench.common import image_environment
    from bench.run import variant_command

    opts = argparse.Namespace(model_dir=tmp_path, preset="mistral-7b", steps=4, warmup=1, t4=True)
    lab = variant_command("spotlora-without-rotary:8", opts, tmp_path / "a.json", 1.0)
    image = variant_command("spotlora-without-rotary@image:8", opts, tmp_path / "a.json", 1.0)
    assert image == [*lab, "--image-conditions"]
    assert lab[lab.index("--without") + 1] == "rotary"

    check = "from bench.common import image_conditions; image_conditions(); print('bare')"
    env = image_environment(tmp_path / "bare")
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout.strip()) == (0, "bare"), done.stderr[-2000:]
    env["CC"] = "gcc"
    done = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "not the image's conditions: CC found" in done.stderr
