"""Where a training step's time goes: python -m bench.profile --t4 --batch-size 32

The product's default path (as bench.variant's `spotlora`), a few steps under
torch.profiler after warm-up. Prints the GPU's busy share of the profiled wall time (the
rest is the host launching work, or waiting), the kernels by GPU time grouped into families,
and writes the Chrome trace and the full table under --out.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from bench.common import PRESETS, emulate_t4, ensure_model_dir
from bench.variant import job_spec, load_product_model, product_trainer

FAMILIES = (
    ("gemm", r"gemm|cutlass|sm\d+_xmma|ampere_|hopper|nvjet|cublas"),
    ("4-bit dequantize", r"kDequantize|dequantize"),
    ("attention", r"fmha|flash|attention|efficient"),
    ("rms norm", r"rms_norm|RmsNorm|rmsnorm"),
    ("optimizer", r"adam|Adam|multi_tensor"),
    ("copy / cast", r"copy|Copy|cast|convert"),
    ("dropout", r"dropout|fused_dropout|bernoulli"),
    ("reduce", r"reduce|Reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
)


def family(name: str) -> str:
    return next((label for label, pattern in FAMILIES if re.search(pattern, name)), "other")


# CUPTI's marks of the host waiting on a full launch queue: no GPU work of their own.
NOT_KERNELS = ("Command Buffer Full",)


def idle_gaps(
    spans: list[tuple[float, float, str]], least: float = 1e-4
) -> list[tuple[float, str, str]]:
    """The GPU's idle stretches longer than `least` seconds between kernel spans (start, end,
    name), largest first, each with the kernels before and after it."""
    gaps, busy_until, last = [], None, ""
    for start, end, name in sorted(spans):
        if busy_until is not None and start - busy_until > least:
            gaps.append((start - busy_until, last, name))
        if busy_until is None or end >= busy_until:
            busy_until, last = end, name
    return sorted(gaps, reverse=True)


# Frames worth naming in a call site: the product's and its libraries', not torch's internals.
SITE_FRAMES = re.compile(r"service/|peft/|transformers/|trl/|bitsandbytes/|accelerate/")


def by_site(events: Any, rows: int = 80) -> str:
    """GPU time by call site: each operator that launched kernels, with the autograd node
    running it (in the backward: a checkpointed layer's recomputation shows under the node
    that unpacked its first saved tensor) and the two innermost frames of the product or its
    libraries above it, where torch.profiler records Python frames as operators' parents."""
    sites: dict[tuple[str, str, str], list[float]] = {}
    for event in events:
        seconds = sum(kernel.duration for kernel in event.kernels) / 1e6
        if not seconds:
            continue
        node, frames, parent = "", list[str](), event.cpu_parent
        while parent is not None:
            if not node and parent.name.startswith("autograd::engine::evaluate_function"):
                node = parent.name.split(": ", 1)[-1]
            if len(frames) < 2 and SITE_FRAMES.search(parent.name):
                frames.append(parent.name.split("site-packages/")[-1])
            parent = parent.cpu_parent
        key = (event.name, node, " < ".join(frames))
        sites.setdefault(key, [0.0, 0])
        sites[key][0] += seconds
        sites[key][1] += 1
    lines = [f"{'GPU ms':>9} {'calls':>6}  op [autograd node] @ call site"]
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:rows]
    for (name, node, site), (seconds, calls) in ranked:
        lines.append(f"{seconds * 1e3:9.3f} {calls:6d}  {name} [{node}] @ {site}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, help="default /tmp/spotlora-bench/<preset>")
    parser.add_argument("--preset", default="mistral-7b", choices=sorted(PRESETS))
    parser.add_argument("--t4", action="store_true", help="fp16 and a 15 GiB memory cap")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-results/profile"))
    parser.add_argument(
        "--layers", type=int, help="the preset's shape with this many decoder layers (faster)"
    )
    parser.add_argument(
        "--stacks",
        action="store_true",
        help="also record shapes and Python stacks: GPU time by input shape and by call site",
    )
    opts = parser.parse_args()
    name = opts.preset if opts.layers is None else f"{opts.preset}-{opts.layers}l"
    if opts.layers is not None:
        PRESETS[name] = {**PRESETS[opts.preset], "num_hidden_layers": opts.layers}
    opts.model_dir = opts.model_dir or Path(f"/tmp/spotlora-bench/{name}")

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    ensure_model_dir(name, opts.model_dir)  # made on the GPU: before the T4's memory cap
    if opts.t4:
        emulate_t4()
    dtype = "fp16" if opts.t4 else "bf16"
    size = opts.batch_size if opts.batch_size == "auto" else int(opts.batch_size)
    spec = job_spec(
        opts.model_dir, dtype, opts.warmup + opts.steps, {"batch_size": size}, "compute"
    )
    model, tokenizer, _ = load_product_model(spec, opts.model_dir, dtype)
    trainer = product_trainer(spec, model, tokenizer, dtype)
    prof = profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        record_shapes=opts.stacks,
        with_stack=opts.stacks,
    )
    window: dict[str, float] = {}

    class Window(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize()
            if state.global_step == opts.warmup:
                window["start"] = time.perf_counter()
                prof.start()
            elif state.global_step == opts.warmup + opts.steps:
                prof.stop()
                window["end"] = time.perf_counter()

    trainer.add_callback(Window())
    trainer.train()
    wall = window["end"] - window["start"]
    kernels: dict[str, float] = {}
    spans: list[tuple[float, float, str]] = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.name not in NOT_KERNELS:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1e6
            spans.append((event.time_range.start / 1e6, event.time_range.end / 1e6, event.name))
    busy = sum(kernels.values())
    families: dict[str, float] = {}
    for name, seconds in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + seconds
    opts.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(opts.out / "trace.json"))
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60)
    (opts.out / "table.txt").write_text(table)
    if opts.stacks:
        by_shape = prof.key_averages(group_by_input_shape=True)
        (opts.out / "shapes.txt").write_text(
            by_shape.table(sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=60)
        )
        (opts.out / "sites.txt").write_text(by_site(prof.events()))
    batch = trainer.args.per_device_train_batch_size
    print(
        f"micro-batch {batch}, {opts.steps} step(s): wall {wall:.3f} s, GPU kernels {busy:.3f} s "
        f"({busy / wall:.0%} busy)"
    )
    gaps = idle_gaps(spans)
    print(
        f"GPU idle between its first and last kernel: {sum(g for g, _, _ in gaps):.3f} s in "
        f"{len(gaps)} gaps over 0.1 ms; the largest, with the kernels either side:"
    )
    for seconds, before, after in gaps[:8]:
        print(f"  {seconds * 1e3:7.1f} ms  {before[:60]}  ->  {after[:60]}")
    for label, seconds in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {label:18s} {seconds:7.3f} s  {seconds / wall:6.1%} of wall")
    for name, seconds in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {seconds:7.3f} s  {name[:110]}")


if __name__ == "__main__":
    main()
