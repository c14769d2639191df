"""Fused kernels: the same numbers as the models' own code, and none a T4 cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service import kernels


def test_fused_rms_norm_gives_the_same_loss_and_gradients(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    def loss_and_grads(fuse: bool) -> tuple[float, list[torch.Tensor]]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        if fuse:
            assert kernels.fuse_rms_norms(model) == model.config.num_hidden_layers * 2 + 1
        ids = torch.arange(24).reshape(2, 12) % 50
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return float(out.loss), [p.grad for p in model.parameters() if p.grad is not None]

    (loss, grads), (fused_loss, fused_grads) = loss_and_grads(False), loss_and_grads(True)
    assert fused_loss == loss
    for a, b in zip(grads, fused_grads, strict=True):
        torch.testing.assert_close(a, b)


class LlamaRMSNorm(torch.nn.Module):
    """Named like Llama's, computed like Gemma's (1 + weight): must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(8))
        self.variance_epsilon = 1e-6

    def forward(self, x: Any) -> Any:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_norm_that_computes_otherwise_is_not_replaced() -> None:
    model = torch.nn.Sequential(LlamaRMSNorm())
    assert kernels.fuse_rms_norms(model) == 0


def test_triton_only_from_compute_capability_8() -> None:
    assert not kernels.triton_supported((7, 5))  # T4
    assert kernels.triton_supported((8, 0)) and kernels.triton_supported((9, 0))
    assert not kernels.triton_supported(None)


def test_a_t4_takes_trls_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "_TRITON_AVAILABLE", True)
    kernels.use_triton_kernels(False)
    assert chunked_logprob._TRITON_AVAILABLE is False
    assert not chunked_logprob._use_triton(torch.device("cuda"))
