"""Grouped-query attention without repeating the key/value heads, in place of transformers'
"sdpa" attention for the run's model only: registered under its own key in transformers'
attention interface (and the mask interface, with sdpa's masks), the model's config pointed
at it, and pointed back by uninstall. The "sdpa" entry itself is never changed."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from service.fast import probe as checks
from service.fast.policy import Policy

NAME = "grouped_attention"
KEY = "spotlora_grouped_sdpa"


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


def probe(fused: Callable[..., Any], original: Callable[..., Any], ref: Any, shape: Any) -> Any:
    """Both on the same queries, keys, values and a block-diagonal causal mask (two packed
    sequences a row), with the model's groups, head size and scale: the original's outputs
    and input gradients, then the fused one's."""
    import torch

    groups, head_dim, scaling = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=True)
    length = 10
    position = torch.arange(length)
    document = (position >= 4).long()
    mask = (position[:, None] >= position[None, :]) & (document[:, None] == document[None, :])
    mask = mask.expand(2, 1, length, length).to(ref.device)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=ref.device, dtype=ref.dtype)

    heads = 2 * groups
    inputs = rand(2, heads, length, head_dim), *(rand(2, 2, length, head_dim) for _ in "kv")
    grad = rand(2, length, heads, head_dim)
    results = []
    for fn in (original, fused):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out, _ = fn(module, q, k, v, mask, dropout=0.0, scaling=scaling)
        results.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
    return results


def _grouped(model: Any) -> list[Any]:
    return [
        m
        for m in model.modules()
        if checks.is_attention(m)
        and getattr(m, "num_key_value_groups", 1) > 1
        and hasattr(m, "head_dim")
        and hasattr(m, "scaling")
    ]


def _pretrained(model: Any) -> Any:
    """The transformers model under peft's wrapper, whose config the attention reads."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def applies(model: Any, policy: Policy) -> str | None:
    if reason := policy.cuda_kernels():
        return reason
    implementation = getattr(_pretrained(model).config, "_attn_implementation", None)
    if implementation not in ("sdpa", KEY):
        return f"the model's attention is {implementation!r}, not sdpa"
    if not _grouped(model):
        return "no grouped-query attention (as many key/value heads as query heads)"
    return None


def install(model: Any, policy: Policy) -> int:
    """After a probe in the compute dtype with the model's own head shape and scale, the
    model's attention through grouped_query_attention; returns how many attention modules
    have grouped heads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    grouped = _grouped(model)
    first = grouped[0]
    shape = (first.num_key_value_groups, first.head_dim, first.scaling)
    fused = grouped_query_attention(sdpa_attention_forward)
    ref = next(model.parameters()).new_empty(0, dtype=checks.dtype(policy.compute_dtype))
    checks.check(probe, fused, sdpa_attention_forward, ref, shape)
    AttentionInterface.register(KEY, fused)
    AttentionMaskInterface.register(KEY, sdpa_mask)
    _pretrained(model).set_attn_implementation(KEY)
    return len(grouped)


def uninstall(model: Any) -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    pretrained = _pretrained(model)
    if getattr(pretrained.config, "_attn_implementation", None) == KEY:
        pretrained.set_attn_implementation("sdpa")
    AttentionInterface._global_mapping.pop(KEY, None)
    AttentionMaskInterface._global_mapping.pop(KEY, None)
