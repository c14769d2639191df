"""Grouped-query attention without repeating the key/value heads, as transformers' "sdpa"
attention function (service.kernels installs it after a probe)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


def grouped_query_attention(original: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' "sdpa" attention for grouped-query heads under a mask (packed rows,
    padding) without repeating the key/value heads: the query heads that share a key/value
    head are laid one after another along the query length, a view of the contiguous
    queries the rotary kernel writes, and the mask's rows are repeated to match (once per
    mask, which all layers share). The same arithmetic for each query and key; any other
    call goes to `original`, which copies the key/value heads for each query head."""

    def sdpa_attention_forward(
        module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kw: Any
    ) -> Any:
        import torch

        groups = getattr(module, "num_key_value_groups", 1)
        plain = (
            not args
            and not torch.compiler.is_compiling()  # Inductor's graphs take the original
            and groups > 1
            and attention_mask is not None
            and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1
            and attention_mask.shape[2] == query.shape[2] > 1
            and query.dim() == key.dim() == value.dim() == 4
            and query.shape[1] == key.shape[1] * groups
            and not kw.get("dropout")
            and not kw.get("output_attentions")
            and all(kw.get(name) is None for name in ("position_bias", "softcap", "cache"))
        )
        if not plain:
            return original(module, query, key, value, attention_mask, *args, **kw)
        batch, heads, length, _ = query.shape
        kv_heads = key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, kv_heads, groups * length, query.shape[-1]),
            key,
            value,
            attn_mask=_repeat_rows(attention_mask, groups, query.dtype),
            scale=kw.get("scaling"),
        )
        # (batch, kv heads, group, length, dim) to the original's (batch, length, heads, dim)
        out = out.view(batch, kv_heads, groups, length, -1).permute(0, 3, 1, 2, 4)
        return out.reshape(batch, length, heads, -1), None

    sdpa_attention_forward.spotlora_original = original  # type: ignore[attr-defined]
    return sdpa_attention_forward


def _repeat_rows(mask: Any, groups: int, dtype: Any) -> Any:
    """(batch, 1, length, keys) to (batch, 1, groups * length, keys), the rows repeated as a
    block per group; kept on the mask, which every layer (and each recomputation) gets. A
    boolean mask becomes the additive one SDPA would make of it at every call (0 where
    True, -inf where False, in the queries' dtype)."""
    import torch

    key = (groups, mask._version, dtype)
    cached = getattr(mask, "spotlora_rows", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    batch, _, length, keys = mask.shape
    rows = mask[:, :, None].expand(batch, 1, groups, length, keys)
    rows = rows.reshape(batch, 1, groups * length, keys)
    if rows.dtype == torch.bool:
        rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device).masked_fill_(
            ~rows, float("-inf")
        )
    mask.spotlora_rows = (key, rows)
    return rows


def probe(fused: Callable[..., Any], original: Callable[..., Any], ref: Any) -> list[list[Any]]:
    """Both on the same queries, keys, values and a block-diagonal causal mask (two packed
    sequences a row): the original's outputs and input gradients, then the fused one's."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=True)
    length = 10
    position = torch.arange(length)
    document = (position >= 4).long()
    mask = (position[:, None] >= position[None, :]) & (document[:, None] == document[None, :])
    mask = mask.expand(2, 1, length, length).to(ref.device)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=ref.device, dtype=ref.dtype)

    inputs = rand(2, 6, length, 16), rand(2, 2, length, 16), rand(2, 2, length, 16)
    grad = rand(2, length, 6, 16)
    results = []
    for fn in (original, fused):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out, _ = fn(module, q, k, v, mask, dropout=0.0, scaling=0.25)
        results.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
    return results
