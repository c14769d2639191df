"""The SwiGLU product silu(gate) * up as one compiled kernel each way (service.fast.elementwise)
instead of three, without the intermediate tensors. Bound on each MLP instance."""

from __future__ import annotations

from typing import Any

from service.fast import elementwise, probe
from service.fast.policy import Policy

NAME = "swiglu"
# MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x)); fused only where act_fn is SiLU.
SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def fused_mlp(self: Any, x: Any) -> Any:
    return self.down_proj(elementwise.function("swiglu").apply(self.gate_proj(x), self.up_proj(x)))


def _candidates(model: Any) -> list[Any]:
    import torch

    return [
        m
        for m in model.modules()
        if type(m).__name__ in SWIGLU_MLP_CLASSES
        and (
            isinstance(getattr(m, "act_fn", None), torch.nn.SiLU)
            or type(getattr(m, "act_fn", None)).__name__ == "SiLUActivation"
        )
    ]


def applies(model: Any, policy: Policy) -> str | None:
    if reason := policy.cuda_kernels():
        return reason
    if not _candidates(model):
        return f"no SiLU-gated MLP of a known class ({', '.join(SWIGLU_MLP_CLASSES)})"
    return None


def run_probe(module: Any, policy: Policy) -> list[list[Any]]:
    """The MLP's forward and the fused one on input of the residual stream's dtype, under
    the run's autocast: outputs and input gradients."""
    import torch

    weight = next(module.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, module.gate_proj.in_features, generator=gen)
    x = x.to(weight.device, probe.dtype(policy.residual_dtype))
    results = []
    with probe.autocast(weight.device.type, policy.compute_dtype):
        for forward in (type(module).forward, fused_mlp):
            xx = x.clone().requires_grad_()
            out = forward(module, xx)
            (grad,) = torch.autograd.grad(out.float().square().mean(), xx)
            results.append([out, grad])
    return results


def install(model: Any, policy: Policy) -> int:
    """Each SiLU-gated MLP of a known class, after a probe on the first (they share the
    arithmetic); returns how many."""
    candidates = _candidates(model)
    probe.check(run_probe, candidates[0], policy)
    for module in candidates:
        probe.bind(module, fused_mlp)
    return len(candidates)


def uninstall(model: Any) -> None:
    for module in model.modules():
        if type(module).__name__ in SWIGLU_MLP_CLASSES:
            probe.unbind(module)
