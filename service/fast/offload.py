"""Activation offload: the tensors autograd keeps between the forward and the backward,
the checkpointed decoder layers' inputs above all, held in pinned host memory instead of
on the GPU, so a micro-batch can be larger in the same GPU memory.

Both copies are issued without blocking the host, on the current stream, the one training
runs on: the copy out is ordered before any reuse of the GPU block, the copy back before any
kernel that reads it, and the pinned buffers are recycled only once their copies are done
(PyTorch's caching host allocator). The tensors come back bitwise the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Smaller tensors stay where they are: a copy costs more than the memory it frees.
MIN_OFFLOAD_BYTES = 1 << 20


def _pack(tensor: Any) -> Any:
    import torch

    if (
        tensor.device.type != "cuda"
        or tensor.nbytes < MIN_OFFLOAD_BYTES
        # A weight, or a view of one (F.linear saves weight.t()), stays on the GPU anyway:
        # a copy would free nothing (trl's LM-head loss saves the whole head).
        or isinstance(tensor, torch.nn.Parameter)
        or isinstance(tensor._base, torch.nn.Parameter)
    ):
        return tensor
    host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return (tensor.device, host)


def _unpack(packed: Any) -> Any:
    if not isinstance(packed, tuple):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


@contextmanager
def activations_on_host(enabled: bool = True) -> Iterator[None]:
    """Inside the block, what autograd saves from CUDA tensors goes to pinned host memory."""
    if not enabled:
        yield
        return
    import torch

    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
