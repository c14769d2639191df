"""The LoRA update of a 4-bit layer as one addmm into the base layer's output (the scaling in
the GEMM's epilogue) instead of peft's copy of that output, a scale and an add. Bound on each
peft layer instance; peft's class keeps its own forward."""

from __future__ import annotations

from typing import Any

from service.fast import probe
from service.fast.policy import Policy

NAME = "lora"
# Projections whose output goes only into the residual stream (the MLP's last).
LAST_PROJECTIONS = ("down_proj",)


def lora_update(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """peft's 4-bit LoRA forward for the plain case (one active vanilla adapter): base output
    + scaling * B(A(dropout(x))) as one addmm; anything else goes to peft's own forward."""
    import torch

    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = (
        not args
        and not kwargs
        and name in self.lora_A
        and not self.disable_adapters
        and not self.merged
        and name not in getattr(self, "lora_variant", {})
        and self.lora_B[name].bias is None
        # Without autocast, peft casts between dtypes; the 4-bit layer returns x's dtype.
        and (
            torch.is_autocast_enabled(x.device.type)
            or x.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype
        )
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    # Rows flat: the 4-bit matmul then returns a tensor of its own, which the update can
    # change in place; changing a view of it instead costs the backward a copy of the
    # gradient (CopySlices) and a zero-filled one (as_strided), per layer and projection.
    rows = x.reshape(-1, x.shape[-1])
    down = lora_a(self.lora_dropout[name](rows))
    # Cast here: addmm_ is not autocast, the B weight is fp32, and the 4-bit layer returns
    # x's dtype.
    factors = (down.to(x.dtype), lora_b.weight.t().to(x.dtype))
    if getattr(self, "spotlora_update_first", False):  # see install
        update = torch.mm(*factors)
        result = self.base_layer(rows).add(update, alpha=self.scaling[name])
    else:
        result = self.base_layer(rows)
        # A view made inside the 4-bit matmul's autograd function must not change in place;
        # bitsandbytes returned one for 3-D rows with a bias (F.linear's), not for flat rows.
        if result._is_view():
            result = torch.addmm(result, *factors, alpha=self.scaling[name])
        else:  # its own new tensor, which the 4-bit matmul's backward does not keep
            result.addmm_(*factors, alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


def _layers(model: Any) -> list[tuple[str, Any]]:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]


def applies(model: Any, policy: Policy) -> str | None:
    if not _layers(model):
        return "no peft LoRA layer over a bitsandbytes 4-bit layer"
    return None


def run_probe(module: Any, policy: Policy) -> list[list[Any]]:
    """peft's forward and the one-addmm update on one of the model's own layers, dropout off
    and B made non-zero on a copy (a fresh adapter's B is zero, which would hide the update),
    on input of the residual stream's dtype under the run's autocast: outputs, the input's
    gradient and the A and B weights' gradients. The update computed before and after the
    4-bit matmul both."""
    import torch

    name = module.active_adapters[0]
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, lora_a.in_features, generator=gen)
    x = x.to(lora_a.weight.device, probe.dtype(policy.residual_dtype))
    b_weight = torch.randn(lora_b.weight.shape, generator=gen) * 0.05
    saved = lora_b.weight.data, module.training
    results: list[list[Any]] = [[], []]
    try:
        lora_b.weight.data = b_weight.to(lora_b.weight.device, lora_b.weight.dtype)
        module.eval()  # dropout off: the same update both ways
        with probe.autocast(x.device.type, policy.compute_dtype):
            for first in (False, True):
                module.spotlora_update_first = first
                for index, forward in enumerate((type(module).forward, lora_update)):
                    xx = x.clone().requires_grad_()
                    out = forward(module, xx)
                    weights = (xx, lora_a.weight, lora_b.weight)
                    grads = torch.autograd.grad(out.float().square().mean(), weights)
                    results[index] += [out, *grads]
    finally:
        lora_b.weight.data, _ = saved
        module.train(saved[1])
        module.__dict__.pop("spotlora_update_first", None)
    return results


def install(model: Any, policy: Policy) -> int:
    """Each peft LoRA layer over a bitsandbytes 4-bit layer computes its update as one addmm;
        a layer whose output only joins the residual stream (LAST_PROJECTIONS) computes it
        before the 4-bit matmul instead. Probed on the first layer (they share the code path).
    Each peft LoRA layer over a bitsandbytes 4-bit layer computes its update as one addmm;
        a layer whose output only joins the residual stream (LAST_PROJECTIONS) computes it
        before the 4-bit matmul instead. Activation checkpointing (non-reentrant) stops each
        layer's recomputation at the last tensor the layer keeps for its backward: the update's
        input, then, so the 4-bit matmul, whose output the next layer's checkpoint already
        holds, is not recomputed: with adapters on every projection of a Mistral-7B or
        Llama-3.1-8B layer, whose down projection holds 27% of its weights, about 9% of the
        layer's matmul work in a step."""
    layers = _layers(model)
    probe.check(run_probe, layers[0][1], policy)
    for name, module in layers:
        probe.bind(module, lora_update)
        module.spotlora_update_first = name.rsplit(".", 1)[-1] in LAST_PROJECTIONS
    return len(layers)


def uninstall(model: Any) -> None:
    for _, module in _layers(model):
        if probe.unbind(module):
            module.__dict__.pop("spotlora_update_first", None)
