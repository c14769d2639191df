"""The throughput benchmark: python -m bench.run --preset mistral-7b --t4

Builds (once) a random-init model directory of the preset's shape, measures the bf16 and
fp16 matmul rates, runs each variant in its own process and prints one table. Variants:
seed, seed-packing, spotlora[:B1,B2,..], spotlora-nockpt[:B..], spotlora-frozen-fp32[:B..],
spotlora-compile[:B..], spotlora-without-LEVER[+LEVER..][:B..] (norms, rotary, swiglu, lora,
loss: the fused kernels of service.fast left out)
(B: micro-batch sizes, swept in one process; default 'auto', the product's default).
A variant's name may end in @image (spotlora@image:8): its process runs in the spotlora
image's conditions, no CUDA toolkit and no C compiler, beside lab variants on the same
machine. A variant named more than once runs each time in turn (interleave them to compare
across the machine's drift); the summary gives each name's mean and range.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import (
    PRESETS,
    ensure_model_dir,
    environment,
    image_environment,
    matmul_tflops,
    write_json,
)


def prepare(preset: str, model_dir: Path, out: Path) -> None:
    """Runs in its own process so its GPU memory is gone before the variants start."""
    info = ensure_model_dir(preset, model_dir)
    info["bf16_matmul_tflops"] = matmul_tflops("bf16")
    info["fp16_matmul_tflops"] = matmul_tflops("fp16")
    write_json(out, {**info, **environment()})


def variant_command(spec: str, opts: argparse.Namespace, out: Path, tflops: float) -> list[str]:
    name, _, sizes = spec.partition(":")
    name, image, _ = name.partition("@image")
    cmd = [sys.executable, "-m", "bench.variant"]
    cmd += ["spotlora" if name.startswith("spotlora") else name]
    cmd += ["--model-dir", str(opts.model_dir), "--preset", opts.preset, "--out", str(out)]
    cmd += ["--steps", str(opts.steps), "--warmup", str(opts.warmup)]
    cmd += ["--matmul-tflops", str(tflops)]
    if opts.t4:
        cmd.append("--t4")
    if name == "spotlora-nockpt":
        cmd.append("--no-checkpointing")
    if name == "spotlora-frozen-fp32":
        cmd.append("--frozen-fp32")
    if name == "spotlora-compile":
        cmd.append("--compile")
    if name == "spotlora-unfused-norms":  # the name of earlier runs
        cmd += ["--without", "norms"]
    if name.startswith("spotlora-without-"):  # spotlora-without-rotary+swiglu
        cmd += ["--without", name.removeprefix("spotlora-without-").replace("+", ",")]
    if name == "spotlora-triton-loss":
        cmd.append("--triton-loss")
    if name == "spotlora-offload":
        cmd.append("--offload-activations")
    if name.startswith("spotlora-keep"):  # spotlora-keepN: the last N layers not checkpointed
        cmd += ["--uncheckpointed-layers", name.removeprefix("spotlora-keep")]
    if sizes:
        cmd += ["--batch-sizes", sizes]
    if image:
        cmd.append("--image-conditions")
    return cmd


def spread(results: list[dict[str, Any]]) -> str:
    """Each variant's mean and range over its runs, where it ran more than once."""
    rates: dict[str, list[float]] = {}
    for res in results:
        for run in res.get("runs", []):
            if run["status"] == "ok":
                rates.setdefault(res["variant"], []).append(run["tokens_per_second"])
    lines = []
    for name, seen in rates.items():
        if len(seen) > 1:
            mean = sum(seen) / len(seen)
            lines.append(
                f"{name}: {len(seen)} runs, mean {mean:,.0f} tokens/s, "
                f"{min(seen):,.0f} to {max(seen):,.0f} ({(max(seen) - min(seen)) / mean:.1%})"
            )
    return "\n".join(lines)


def table(results: list[dict[str, Any]], seed_rate: float | None) -> str:
    lines = [
        "| variant | micro-batch | s/step | non-pad tokens/s | x seed | useful MFU "
        "| peak alloc / reserved GiB | est. GiB | load s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for run in res.get("runs", []):
            label = res["variant"].partition(":")[0]
            if run["status"] != "ok":
                lines.append(f"| {label} | {run.get('batch_size')} | {run['status']} |||||||")
                continue
            ratio = f"{run['tokens_per_second'] / seed_rate:.2f}" if seed_rate else "-"
            est = run.get("estimated_peak_gib")
            lines.append(
                f"| {label} | {run['batch_size']}x{run.get('gradient_accumulation', 4)} "
                f"| {run['seconds_per_step']:.3f} | {run['tokens_per_second']:,.0f} | {ratio} "
                f"| {run.get('useful_mfu', 0):.1%} "
                f"| {run['peak_allocated_gib']:.2f} / {run['peak_reserved_gib']:.2f} "
                f"| {f'{est:.2f}' if est else '-'} | {res.get('model_load_seconds', 0):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="mistral-7b", choices=sorted(PRESETS))
    parser.add_argument("--t4", action="store_true", help="fp16 and a 15 GiB cap, every variant")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variant", action="append", help="repeatable; default: seed, spotlora")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per variant")
    opts = parser.parse_args()
    opts.model_dir = opts.model_dir or Path(f"/tmp/spotlora-bench/{opts.preset}")
    variants = opts.variant or ["seed", "spotlora"]
    opts.out.mkdir(parents=True, exist_ok=True)

    prep = opts.out / "prepare.json"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from bench.run import prepare; "
            "prepare(sys.argv[1], __import__('pathlib').Path(sys.argv[2]), "
            "__import__('pathlib').Path(sys.argv[3]))",
            opts.preset,
            str(opts.model_dir),
            str(prep),
        ],
        check=True,
    )
    info = json.loads(prep.read_text())
    print("prepare", json.dumps(info), flush=True)
    results = []
    for i, spec in enumerate(variants):
        stem = spec.replace(":", "-").replace(",", "_").replace("+", "_").replace("@", "-")
        out = opts.out / f"{i:02d}-{stem}.json"
        # useful MFU over the rate of the dtype the variants compute in
        rate = info["fp16_matmul_tflops"] if opts.t4 else info["bf16_matmul_tflops"]
        cmd = variant_command(spec, opts, out, rate)
        env = image_environment(opts.out / "bare") if "--image-conditions" in cmd else None
        try:
            code = subprocess.run(cmd, timeout=opts.timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            code = -1
        res = json.loads(out.read_text()) if out.is_file() else {"variant": spec, "runs": []}
        res["variant"], res["exit_code"] = spec, code
        results.append(res)
    seed = next((r for r in results if r["variant"] == "seed" and r["runs"]), None)
    seed_rate = seed["runs"][0].get("tokens_per_second") if seed else None
    summary = {"prepare": info, "t4_emulation": opts.t4, "results": results}
    write_json(opts.out / "summary.json", summary)
    print(
        f"\n{info['gpu']}; bf16 matmul {info['bf16_matmul_tflops']:.0f} TFLOP/s, fp16 "
        f"{info['fp16_matmul_tflops']:.0f}; T4 emulation: {opts.t4}"
    )
    print(table(results, seed_rate))
    print(spread(results))


if __name__ == "__main__":
    main()
