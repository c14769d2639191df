"""Which fused kernels a run uses, by GPU.

Triton kernels only from compute capability 8.0: Triton supports nothing older (3.3 dropped
Turing; "it may work at times" on a T4, slowly, through FMA instead of tensor cores). trl's
SFT loss projects through the LM head in chunks, without the full logits, with a Triton kernel
where Triton is installed; on a T4 it must take trl's own PyTorch path instead (cuBLAS, the
same arithmetic).

RMSNorm through PyTorch's F.rms_norm, one fused kernel on CUDA each way, instead of the five
elementwise passes of the models' Python forward over an fp32 copy of the hidden states.
Only norms whose output matches the original on a probe are replaced.
"""

from __future__ import annotations

import types
from typing import Any

import structlog

log = structlog.get_logger(__name__)

TRITON_MIN_CAPABILITY = (8, 0)
# Norms of the form weight * x / rms(x), computed in fp32 and cast back (Gemma's 1 + weight and
# others are not): the classes to try, each still checked on a probe before it is replaced.
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


def triton_supported(capability: tuple[int, int] | None) -> bool:
    return capability is not None and capability >= TRITON_MIN_CAPABILITY


def use_triton_kernels(enabled: bool) -> None:
    """trl reads this flag at each call to choose its Triton kernel or its PyTorch path."""
    try:
        from trl.kernels import chunked_logprob
    except ImportError:  # a trl without the kernel has nothing to switch
        return
    if not enabled and chunked_logprob._TRITON_AVAILABLE:
        chunked_logprob._TRITON_AVAILABLE = False
        log.info("triton_kernels_off", reason="GPU below compute capability 8.0")


def _fused_rms_norm(self: Any, hidden_states: Any) -> Any:
    import torch.nn.functional as F

    weight = self.weight
    out = F.rms_norm(
        hidden_states, weight.shape, weight.to(hidden_states.dtype), self.variance_epsilon
    )
    return out


def fuse_rms_norms(model: Any) -> int:
    """Replace the forward of each known RMSNorm whose fused output matches the original's on
    a probe; returns how many were replaced."""
    import torch

    replaced = 0
    for module in model.modules():
        if type(module).__name__ not in RMS_NORM_CLASSES or not hasattr(module, "variance_epsilon"):
            continue
        weight = module.weight
        probe = torch.randn(2, weight.shape[-1], device=weight.device, dtype=weight.dtype) * 3
        with torch.no_grad():
            expected = module.forward(probe)
            got = _fused_rms_norm(module, probe)
        if got.dtype != expected.dtype or not torch.allclose(got, expected, rtol=1e-2, atol=1e-2):
            continue
        module.forward = types.MethodType(_fused_rms_norm, module)
        replaced += 1
    return replaced
