"""Packed rows must not see each other: logits of sequences packed into one row (the
product's collator, no attention mask, positions restarting) against each sequence alone."""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.common import model_config

DEVICE = "cuda"


def check(dtype_name: str) -> dict[str, Any]:
    import torch
    from transformers import MistralForCausalLM

    from service.trainer import PackedRowsCollator

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model: Any = MistralForCausalLM(model_config("small"))
        model = model.to(dtype).eval()
    model.config._attn_implementation = "sdpa"
    lengths = [[37, 100, 12], [64, 9]]  # two packed rows, the second one padded
    seqs = [[torch.randint(3, 32000, (n,)).tolist() for n in row] for row in lengths]
    flat = [[tok for seq in row for tok in seq] for row in seqs]
    examples = [
        {"input_ids": ids, "labels": ids, "seq_lengths": [len(s) for s in row]}
        for ids, row in zip(flat, seqs, strict=True)
    ]
    batch = PackedRowsCollator(pad_token_id=2)(examples)
    worst = 0.0
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for
        # packed sequences in position_ids.
        packed = model(
            input_ids=batch["input_ids"].to(DEVICE),
            position_ids=batch["position_ids"].to(DEVICE),
            use_cache=False,
        ).logits.float()
        for r, row in enumerate(seqs):
            offset = 0
            for seq in row:
                alone = model(input_ids=torch.tensor([seq], device=DEVICE), use_cache=False)
                alone = alone.logits.float()[0]
                got = packed[r, offset : offset + len(seq)]
                worst = max(worst, ((got - alone).norm() / alone.norm()).item())
                offset += len(seq)
        # Control: the same packed rows with an all-ones mask must differ (sequences leak).
        leaked = model(
            input_ids=batch["input_ids"].to(DEVICE),
            attention_mask=torch.ones_like(batch["input_ids"]).to(DEVICE),
            use_cache=False,
        ).logits.float()
        leak = ((leaked[0, 37:137] - packed[0, 37:137]).norm() / packed[0, 37:137].norm()).item()
    return {"dtype": dtype_name, "max_relative_error": worst, "unmasked_control_error": leak}


def main() -> None:
    results = [check(d) for d in ("fp32", "fp16")]
    print(json.dumps(results))
    tolerance = {"fp32": 1e-4, "fp16": 1e-2}
    if any(r["max_relative_error"] > tolerance[r["dtype"]] for r in results):
        sys.exit("packed sequences are not isolated")


if __name__ == "__main__":
    main()
