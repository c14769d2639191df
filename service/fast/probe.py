"""Checking a replacement against the code it replaces, on the run's device and dtypes,
before it is installed: outputs and input gradients, compared one by one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PROBE_TOLERANCE = 1e-2  # relative and absolute
# In bf16 (8 significant bits), rounding once where the original rounds twice moves the output
# of a Mistral-7B-shaped MLP (14,336 wide) by up to 0.0625, while either lies 0.037-0.049 from
# the fp32 result: a probe allows eight times the compute dtype's epsilon (0.0625 in bf16).
PROBE_ULPS = 8


class Fallback(Exception):
    """A replacement that is not installed: its message says why, for the run's report."""


def matches(got: Any, expected: Any) -> bool:
    import torch

    tolerance = PROBE_TOLERANCE
    if got.dtype.is_floating_point:
        tolerance = max(tolerance, PROBE_ULPS * torch.finfo(got.dtype).eps)
    return (
        got.dtype == expected.dtype
        and got.shape == expected.shape
        and bool(torch.allclose(got, expected, rtol=tolerance, atol=tolerance))
    )


def check(run: Callable[..., list[list[Any]]], *args: Any) -> None:
    """Raise Fallback unless the two result lists of a probe `run` (the original code's, then
    the replacement's) match, one by one. A kernel that cannot be built here (no NVRTC, an
    older torch) fails the same way: the job then runs on the models' own code."""
    try:
        want, got = run(*args)
    except Fallback:
        raise
    except Exception as err:  # whatever the cause, the models' own code stays
        raise Fallback(f"{type(err).__name__}: {err}".splitlines()[0]) from None
    for index, (w, g) in enumerate(zip(want, got, strict=True)):
        if not matches(g, w):
            what = "output" if index == 0 else f"result {index} (a gradient)"
            raise Fallback(f"probe: the {what} differs from the code it replaces ({g.dtype})")


def dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


@contextmanager
def autocast(device: str, compute: str) -> Iterator[None]:
    """As the trainer runs a step: autocast to the compute dtype unless it is fp32."""
    import torch

    with torch.autocast(device, dtype=dtype(compute), enabled=compute != "fp32"):
        yield


def is_attention(module: Any) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(module, "q_proj")


def device_of(model: Any) -> str:
    device: str = next(p for p in model.parameters()).device.type
    return device


def bind(module: Any, forward: Callable[..., Any]) -> None:
    """`forward` on this instance only, the one it had kept to restore."""
    import types

    if "spotlora_forward" not in module.__dict__:
        module.spotlora_forward = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)


def unbind(module: Any) -> bool:
    """The instance's forward as it was before bind(); whether there was one to undo."""
    if "spotlora_forward" not in module.__dict__:
        return False
    previous = module.__dict__.pop("spotlora_forward")
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous
    return True
