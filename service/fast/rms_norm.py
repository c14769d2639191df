"""RMSNorm through PyTorch's F.rms_norm: one fused kernel each way on CUDA, instead of the
five elementwise passes of the models' Python forward over an fp32 copy of the hidden states.
Bound on each norm instance; the class keeps its own forward."""

from __future__ import annotations

from typing import Any

from service.fast import probe
from service.fast.policy import Policy

NAME = "rms_norm"
# Norms of the form weight * x / rms(x), computed in fp32 and cast back (Gemma's 1 + weight and
# others are not): the classes to try, each still checked on a probe before it is replaced.
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


def fused_rms_norm(self: Any, hidden_states: Any) -> Any:
    import torch.nn.functional as F

    weight = self.weight
    return F.rms_norm(
        hidden_states, weight.shape, weight.to(hidden_states.dtype), self.variance_epsilon
    )


def _candidates(model: Any) -> list[Any]:
    return [
        m
        for m in model.modules()
        if type(m).__name__ in RMS_NORM_CLASSES and hasattr(m, "variance_epsilon")
    ]


def applies(model: Any, policy: Policy) -> str | None:
    if not _candidates(model):
        return f"no norm of a known weight * x / rms(x) class ({', '.join(RMS_NORM_CLASSES)})"
    return None


def run_probe(module: Any, policy: Policy) -> list[list[Any]]:
    """The norm's forward and the fused one on hidden states of the residual stream's dtype,
    as many entries as its weight, under the run's autocast: outputs, input gradients."""
    import torch

    width = module.weight.shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, width, generator=gen) * 3
    x = x.to(module.weight.device, probe.dtype(policy.residual_dtype))
    grad = torch.randn(2, 3, width, generator=gen).to(x.device)
    results = []
    with probe.autocast(x.device.type, policy.compute_dtype):
        for forward in (type(module).forward, fused_rms_norm):
            xx = x.clone().requires_grad_()
            out = forward(module, xx)
            results.append([out, *torch.autograd.grad(out, xx, grad.to(out.dtype))])
    return results


def install(model: Any, policy: Policy) -> int:
    """Each known norm whose fused output and input gradient match its own on a probe;
    any that does not is a fallback."""
    candidates = _candidates(model)
    for module in candidates:
        probe.check(run_probe, module, policy)
    for module in candidates:
        probe.bind(module, fused_rms_norm)
    return len(candidates)


def uninstall(model: Any) -> None:
    for module in model.modules():
        if type(module).__name__ in RMS_NORM_CLASSES:
            probe.unbind(module)
