"""Rotary embeddings as one compiled kernel each way (service.fast.elementwise), in place of
the five to eight kernels of the models' apply_rotary_pos_emb and their intermediate tensors.

The models call apply_rotary_pos_emb as a global of their modeling module, so the kernel is
set there, for the run, and the module's own function put back by uninstall.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from service.fast import elementwise, probe
from service.fast.policy import Policy

NAME = "rotary"
_PATCHED: set[str] = set()  # the modeling modules whose function is the kernel's


def rotary_embedding(original: Callable[..., Any]) -> Callable[..., Any]:
    """A model module's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) through the
    fused kernel; any other call goes to `original`."""

    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, *args: Any, **kwargs: Any) -> Any:
        if not plain(q, k, cos, sin, *args, **kwargs):
            return original(q, k, cos, sin, *args, **kwargs)
        rotary = elementwise.function("rotary")
        return rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)

    apply_rotary_pos_emb.spotlora_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def plain(q: Any, k: Any, cos: Any, sin: Any, *args: Any, **kwargs: Any) -> bool:
    """Whether the kernel computes this call: the layout and dtypes it was written for."""
    import torch

    return (
        not args
        and not torch.compiler.is_compiling()  # Inductor's graphs keep the original
        and set(kwargs) <= {"unsqueeze_dim"}
        and kwargs.get("unsqueeze_dim", 1) == 1
        and q.dim() == k.dim() == 4
        and cos.dim() == 3
        and q.shape[-1] == cos.shape[-1]
        and q.shape[-1] % 2 == 0
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1
        and cos.stride() == sin.stride()
    )


def _sources(model: Any) -> list[Any]:
    """The modeling modules of the model's attention classes that rotate halves."""
    names = sorted({type(m).__module__ for m in model.modules() if probe.is_attention(m)})
    found = []
    for name in names:
        source = sys.modules[name]
        if hasattr(source, "apply_rotary_pos_emb") and hasattr(source, "rotate_half"):
            found.append(source)
    return found


def applies(model: Any, policy: Policy) -> str | None:
    if reason := policy.cuda_kernels():
        return reason
    if not _sources(model):
        return "no attention module with a half-rotating apply_rotary_pos_emb"
    return None


def run_probe(
    fused: Callable[..., Any], original: Callable[..., Any], device: str, policy: Policy
) -> list[list[Any]]:
    """Both functions on the same random q, k and angles, as the run calls them: q and k of
    the compute dtype (the projections' output), cos and sin of the residual stream's, which
    the models cast them to; outputs and input gradients. The fused function must take its
    kernel for these, or the run would not either."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    dim, compute = 16, probe.dtype(policy.compute_dtype)
    residual = probe.dtype(policy.residual_dtype)
    q, k = (torch.randn(*shape, generator=gen) for shape in ((2, 4, 6, dim), (2, 2, 6, dim)))
    q, k = q.to(device, compute), k.to(device, compute)
    angles = torch.rand(2, 6, dim // 2, generator=gen) * 6
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(device, residual), angles.sin().to(device, residual)
    if not plain(q, k, cos, sin):
        raise probe.Fallback(
            f"the run's dtypes (q {q.dtype}, cos {cos.dtype}) take the model's own code"
        )
    grads = torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)
    grads = grads[0].to(q), grads[1].to(k)
    results = []
    for fn in (original, fused):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        outs = fn(qq, kk, cos, sin)
        results.append([*outs, *torch.autograd.grad(outs, (qq, kk), grads)])
    return results


def install(model: Any, policy: Policy) -> int:
    """Each modeling module's apply_rotary_pos_emb through the kernel, after a probe on the
    model's device; returns how many modules now use it."""
    sources = _sources(model)
    for source in sources:
        original = _original(source.apply_rotary_pos_emb)
        probe.check(run_probe, rotary_embedding(original), original, probe.device_of(model), policy)
    for source in sources:
        fused = rotary_embedding(_original(source.apply_rotary_pos_emb))
        source.apply_rotary_pos_emb = fused
        _PATCHED.add(source.__name__)
    return len(sources)


def uninstall(model: Any) -> None:
    """Every patched modeling module's own function back, this model's or any other's."""
    while _PATCHED:
        source: Any = sys.modules[_PATCHED.pop()]
        source.apply_rotary_pos_emb = _original(source.apply_rotary_pos_emb)


def _original(function: Any) -> Any:
    return getattr(function, "spotlora_original", function)
