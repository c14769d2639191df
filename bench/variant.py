"""One variant of the throughput benchmark, in its own process (python -m bench.variant).

`seed` is the recipe the project started from, written with the libraries directly.
`spotlora` goes through the product's own path: a validated manifest, service.model's
loader and service.trainer.build_trainer. Several batch sizes may be swept in one process
(the model is loaded once); the peak memory of each is measured from its own start.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

from bench.common import (
    emulate_t4,
    environment,
    image_conditions,
    param_count,
    token_rows,
    write_json,
)

ROWS = 6000


class TokenCounter:
    """Counts the non-padding tokens the collator hands out (rows arrive unpadded)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens = 0

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        self.tokens += sum(len(e["input_ids"]) for e in examples)
        return self.inner(examples)


def make_meter(counter: TokenCounter, warmup: int, steps: int) -> Any:
    """Marks time and tokens at the end of the warm-up and of the last step, after waiting for
    the GPU there only: a wait at every step would drain the GPU's queue each time and count
    the refill as training time."""
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (warmup, steps):
                torch.cuda.synchronize()
                self.marks.append((time.perf_counter(), counter.tokens))

    return Meter()


def measure(trainer: Any, warmup: int) -> dict[str, Any]:
    import torch

    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    meter = make_meter(counter, warmup, trainer.args.max_steps)
    trainer.add_callback(meter)
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    except torch.OutOfMemoryError as err:
        return {"status": "oom", "error": str(err).splitlines()[0]}
    (t0, n0), (t1, n1) = meter.marks
    steps = trainer.args.max_steps - warmup
    # The loader fetches one micro-batch ahead; the offset is the same at both marks.
    seconds = t1 - t0
    return {
        "status": "ok",
        "measured_steps": steps,
        "seconds_per_step": seconds / steps,
        "tokens_per_step": (n1 - n0) / steps,
        "tokens_per_second": (n1 - n0) / seconds,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "final_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
        ),
    }


def keep_activations(count: int) -> Any:
    """Selective activation checkpointing: once the trainer has switched checkpointing on,
    the last `count` decoder layers are run without it (their activations kept)."""
    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    class Keep(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            layers = [
                m for m in kwargs["model"].modules() if isinstance(m, GradientCheckpointingLayer)
            ]
            for layer in layers[len(layers) - count :]:
                layer.gradient_checkpointing = False

    return Keep()


def rows_dataset() -> list[dict[str, Any]]:
    return token_rows(ROWS)


# --------------------------------------------------------------------------- seed


def seed_trainer(model_dir: Path, dtype: str, steps: int, packing: bool) -> tuple[Any, float]:
    """The seed recipe: NF4 + double quant, LoRA r=8 on q/k/v/o, batch 4 x accumulation 4,
    gradient checkpointing, paged AdamW 32-bit, max length 512, no packing. `packing`
    gives the anchors' 'seed + packing' row (trl's bfd packing, batch 16 x 1)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    start = time.monotonic()
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        ),
        dtype=compute,
        device_map={"": 0},
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    torch.cuda.synchronize()
    load_seconds = time.monotonic() - start
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir="/tmp/bench-seed",
        per_device_train_batch_size=16 if packing else 4,
        gradient_accumulation_steps=1 if packing else 4,
        gradient_checkpointing=True,
        optim="paged_adamw_32bit",
        learning_rate=2e-4,
        max_length=512,
        packing=packing,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        seed=42,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows_dataset()),
        processing_class=tokenizer,
    )
    if dtype == "fp16":
        # trl casts the LoRA weights of a quantized model to bf16; fp16's GradScaler then
        # fails at the first optimizer step. The smallest fix that lets the seed run at all.
        trained: Any = trainer.model
        for param in trained.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer, load_seconds


# --------------------------------------------------------------------------- product


def job_spec(
    model_dir: Path, dtype: str, steps: int, overrides: dict[str, Any], frozen_dtype: str
) -> Any:
    """The job as a user would write it: only what the job is, the rest spotlora's defaults
    (frozen_dtype: a lever's departure from the default, 'compute')."""
    from service.manifest.spec import FineTuneJob

    training: dict[str, Any] = {"max_steps": steps, "logging_steps": 1}
    training.update(overrides)
    doc = {
        "apiVersion": "spotlora/v1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": str(model_dir)},
            "quantization": {"compute_dtype": dtype, "frozen_dtype": frozen_dtype},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
            "data": {"train": "synthetic", "format": "text", "max_length": 512},
            "training": training,
            "metrics": {"port": None},
            "output": {"uri": "/tmp/bench-out"},
        },
    }
    return FineTuneJob.model_validate(doc).spec


def load_product_model(spec: Any, model_dir: Path, dtype: str) -> tuple[Any, Any, float]:
    import torch

    from service import model as product

    device = product.detect_device()
    tokenizer = product.load_tokenizer(model_dir, False)
    start = time.monotonic()  # load_for_training seeds, as the product does
    peft_model = product.load_for_training(model_dir, spec, dtype, device)
    torch.cuda.synchronize()
    return peft_model, tokenizer, time.monotonic() - start


def product_trainer(spec: Any, peft_model: Any, tokenizer: Any, dtype: str) -> Any:
    from service.trainer import build_trainer

    return build_trainer(
        spec,
        peft_model,
        tokenizer,
        rows_dataset(),
        [],
        dtype=dtype,
        on_cpu=False,
        work_dir=Path("/tmp/bench-spotlora"),
        callbacks=[],
        show_progress_bar=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=["seed", "seed-packing", "spotlora"])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--preset", default="mistral-7b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--t4", action="store_true", help="fp16 and a 15 GiB memory cap")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--batch-sizes", default="auto", help="spotlora: comma-separated, each in turn; or auto"
    )
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--matmul-tflops", type=float, default=0.0)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="training.torch_compile: torch.compile each decoder layer",
    )
    parser.add_argument(
        "--frozen-fp32",
        action="store_true",
        help="peft's k-bit preparation: embeddings, norms and LM head upcast to fp32",
    )
    parser.add_argument(
        "--without",
        default="",
        help="comma-separated fused kernels to leave out (service.fast): "
        "norms, rotary, swiglu, lora, loss (the models', peft's and trl's own "
        "code instead)",
    )
    parser.add_argument(
        "--offload-activations",
        action="store_true",
        help="training.offload_activations: the checkpointed layer inputs in pinned host memory",
    )
    parser.add_argument(
        "--uncheckpointed-layers",
        type=int,
        default=0,
        help="selective activation checkpointing: the last N decoder layers keep their activations",
    )
    parser.add_argument(
        "--image-conditions",
        action="store_true",
        help="started by bench.run in the image's environment: torch finds no CUDA toolkit",
    )
    parser.add_argument(
        "--triton-loss",
        action="store_true",
        help="with --t4: keep trl's Triton LM-head loss kernel, which a real T4 cannot use",
    )
    opts = parser.parse_args()
    if opts.image_conditions:
        image_conditions()

    import torch

    from service import fast

    if opts.t4:
        emulate_t4()
    if opts.triton_loss:
        from trl.kernels import chunked_logprob

        chunked_logprob._TRITON_AVAILABLE = True  # the policy keeps it where a compiler is
    levers = {
        "norms": "rms_norm",
        "rotary": "rotary",
        "swiglu": "swiglu",
        "lora": "lora",
        "loss": "lm_head_loss",
    }
    left_out = set()
    for lever in filter(None, opts.without.split(",")):
        if lever not in levers:
            parser.error(f"--without: {lever!r} is none of {', '.join(levers)}")
        left_out.add(levers[lever])
    fast.REPLACEMENTS = tuple(r for r in fast.REPLACEMENTS if r.NAME not in left_out)
    dtype = "fp16" if opts.t4 else "bf16"
    params = param_count(opts.preset)
    result: dict[str, Any] = {
        "variant": opts.variant,
        "preset": opts.preset,
        "params": params,
        "t4_emulation": opts.t4,
        "without": opts.without,
        "dtype": dtype,
        "conditions": "image" if opts.image_conditions else "lab",
        **environment(),
        "runs": [],
    }

    def finish(run: dict[str, Any]) -> None:
        if run.get("status") == "ok" and opts.matmul_tflops:
            run["useful_mfu"] = 4 * params * run["tokens_per_second"] / (opts.matmul_tflops * 1e12)
        result["runs"].append(run)
        write_json(opts.out, result)
        print(opts.variant, run, flush=True)

    if opts.variant.startswith("seed"):
        packing = opts.variant == "seed-packing"
        trainer, load_seconds = seed_trainer(opts.model_dir, dtype, opts.steps, packing)
        result["model_load_seconds"] = load_seconds
        finish({"batch_size": 16 if packing else 4, **measure(trainer, opts.warmup)})
        return

    from transformers import AutoConfig

    from service.memory import estimate_memory, preflight_estimate

    frozen_dtype = "fp32" if opts.frozen_fp32 else "compute"
    first = job_spec(
        opts.model_dir, dtype, opts.steps, {"torch_compile": opts.compile}, frozen_dtype
    )
    peft_model, tokenizer, load_seconds = load_product_model(first, opts.model_dir, dtype)
    result["model_load_seconds"] = load_seconds
    result["frozen_dtype"] = frozen_dtype
    fused = fast.report(peft_model)
    result["kernels"] = fused.as_dict() if fused else None
    print("kernels", result["kernels"], flush=True)
    config = AutoConfig.from_pretrained(opts.model_dir)
    for size in opts.batch_sizes.split(","):
        overrides: dict[str, Any] = {
            "batch_size": size if size == "auto" else int(size),
            "gradient_accumulation": opts.accumulation,
            "gradient_checkpointing": not opts.no_checkpointing,
            "torch_compile": opts.compile,
            "offload_activations": opts.offload_activations,
        }
        spec = job_spec(opts.model_dir, dtype, opts.steps, overrides, frozen_dtype)
        gc.collect()
        torch.cuda.empty_cache()
        trainer = product_trainer(spec, peft_model, tokenizer, dtype)
        if opts.uncheckpointed_layers:
            trainer.add_callback(keep_activations(opts.uncheckpointed_layers))
        chosen = trainer.args.per_device_train_batch_size
        preflight = preflight_estimate(spec, config)
        estimate = estimate_memory(
            trainer.model,
            max_length=512,
            gradient_checkpointing=spec.training.gradient_checkpointing,
            weight_bytes=torch.cuda.memory_allocated(),
            offload_activations=spec.training.offload_activations,
        )
        run = {
            "batch_size": chosen,
            "requested_batch_size": size,
            "gradient_accumulation": opts.accumulation,
            "gradient_checkpointing": spec.training.gradient_checkpointing,
            "uncheckpointed_layers": opts.uncheckpointed_layers,
            "offload_activations": opts.offload_activations,
            "estimated_peak_gib": estimate.total_bytes(chosen) / 2**30,
            "preflight_peak_gib": preflight.total_bytes(chosen) / 2**30,
            "allocated_before_gib": torch.cuda.memory_allocated() / 2**30,
            **measure(trainer, opts.warmup),
        }
        finish(run)
        trainer.model.zero_grad(set_to_none=True)
        del trainer
        if run["status"] == "oom":
            break


if __name__ == "__main__":
    main()
