"""The merged export's time and memory: python -m bench.export --preset mistral-7b

Builds (once) the preset's random-init model directory (bench.common) and a LoRA adapter for
it (r=8 on q/k/v/o, lora_B drawn with std 0.02 so the merge changes the weights), then runs
service.export.export_merged once a case, each in its own process (the peak host memory is
the process's): merged into the trained base or the original weights, on the GPU (when one
has room, as the product chooses) or on the CPU. Prints each step's seconds, the peak host
memory and the pre-flight's estimate, and the verification figures; JSON in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import GIB, ensure_model_dir, model_config, text_rows, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ensure_adapter(preset: str, path: Path) -> None:
    """Only the LoRA weights are real: the base is built on the meta device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (path / "adapter_model.safetensors").is_file():
        return
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config(preset))
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            std = 0.02 if "lora_B" in name else param.shape[1] ** -0.5
            real = torch.randn(param.shape, generator=generator) * std
            model.get_submodule(name.rsplit(".", 1)[0]).weight = torch.nn.Parameter(real)
    model.save_pretrained(path)


def one_case(args: argparse.Namespace) -> dict[str, Any]:
    from service.export import export_merged
    from service.manifest import FineTuneJob
    from service.storage import LocalStorage

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "spotlora/v1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bench-export"},
            "spec": {
                "model": {"source": str(args.model_dir)},
                "data": {"train": "/dev/null"},
                "output": {"uri": str(args.work / "out")},
                "lora": {"r": 8, "alpha": 16, "target_modules": TARGETS},
                "export": {"merged": True, "base": args.base, "dtype": args.dtype},
            },
        }
    )
    started = time.monotonic()
    record = export_merged(
        job.spec,
        args.model_dir,
        args.adapter_dir,
        [row["text"] for row in text_rows(4)],  # the word-level tokenizer's ids, 128 of each
        LocalStorage(args.work / "out"),
        args.work / "staging",
    )
    v = record["verification"]
    return {
        "base": args.base,
        "device": record["device"],
        "dtype": record["dtype"],
        "wall_seconds": round(time.monotonic() - started, 1),
        "seconds": record["seconds"],
        "peak_host_gib": round(record["peak_host_memory_bytes"] / GIB, 2),
        "peak_anonymous_gib": round(record["peak_anonymous_memory_bytes"] / GIB, 2),
        "estimated_host_gib": round(record["estimated_host_memory_bytes"] / GIB, 2),
        "positions": v["positions"],
        "mean_kl": v["mean_kl"],
        "max_kl": v["max_kl"],
        "adapter_effect_mean_kl": v["adapter_effect_mean_kl"],
        "top1_agreement": v["top1_agreement"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mistral-7b")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--case",
        action="append",
        help="BASE:DEVICE, BASE trained or original, DEVICE gpu or cpu (repeatable; default "
        "trained:gpu, trained:cpu, original:cpu)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/export.json"))
    parser.add_argument("--one", nargs=2, metavar=("BASE", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model_dir = args.model_dir or Path(f"/tmp/spotlora-bench/{args.preset}")
    if args.one:  # a case, in its own process
        args.base, args.work = args.one[0], Path(args.one[1])
        sys.stdout.write("RESULT " + json.dumps(one_case(args)) + "\n")
        return 0
    ensure_model_dir(args.preset, args.model_dir)
    adapter = args.model_dir.with_name(args.model_dir.name + "-adapter")
    ensure_adapter(args.preset, adapter)
    results = []
    for case in args.case or ["trained:gpu", "trained:cpu", "original:cpu"]:
        base, _, device = case.partition(":")
        env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})
        work = Path(f"/tmp/spotlora-bench/export-{base}-{device}")
        cmd = [sys.executable, "-m", "bench.export", "--preset", args.preset]
        cmd += ["--model-dir", str(args.model_dir), "--adapter-dir", str(adapter)]
        cmd += ["--dtype", args.dtype, "--one", base, str(work)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        failed = {"case": case, "error": done.stderr[-2000:]}
        result = json.loads(lines[-1][7:]) if lines else failed
        print(json.dumps(result), flush=True)
        results.append(result)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    write_json(args.out, {"preset": args.preset, "dtype": args.dtype, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
