"""Packed rows do not see each other: the logits of a packed row equal the row run alone."""

from __future__ import annotations

from pathlib import Path

import torch

from service.manifest.spec import ModelSpec, QuantizationSpec
from service.model import Device, load_quantized_model
from service.trainer import PackedRowsCollator


def test_packed_rows_attend_only_within_themselves(tiny_model: Path) -> None:
    import datasets
    from trl.data_utils import pack_dataset

    model = load_quantized_model(
        tiny_model,
        ModelSpec(source=str(tiny_model)),
        QuantizationSpec(),
        "fp32",
        Device("cpu", "cpu"),
    ).eval()
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (21, 9, 30, 14)]
    dataset = datasets.Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    packed = pack_dataset(dataset, 64, strategy="bfd")
    assert len(packed) < len(rows)  # several rows share a sequence
    batch = PackedRowsCollator(pad_token_id=0)([dict(example) for example in packed])
    assert "attention_mask" not in batch
    with torch.no_grad():
        # Training runs without a KV cache; with one, transformers ignores the packing.
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        seen = 0
        for b, example in enumerate(packed):
            start = 0
            for length in example["seq_lengths"]:
                ids = example["input_ids"][start : start + length]
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                torch.testing.assert_close(
                    logits[b, start : start + length], alone, atol=1e-4, rtol=1e-4
                )
                # The first token of each row is never a target: no row learns from another.
                assert batch["labels"][b, start] == -100
                start += length
                seen += 1
    assert seen == len(rows)
