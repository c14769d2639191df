"""Which fused kernels a run uses, by GPU.

Triton kernels only from compute capability 8.0: Triton supports nothing older (3.3 dropped
Turing; "it may work at times" on a T4, slowly, through FMA instead of tensor cores). trl's
SFT loss projects through the LM head in chunks, without the full logits, with a Triton kernel
where Triton is installed; on a T4 it must take trl's own PyTorch path instead (cuBLAS, the
same arithmetic).

What runs on every GPU, a T4 included, with no Triton:
- RMSNorm through PyTorch's F.rms_norm, one fused kernel each way on CUDA, instead of the five
  elementwise passes of the models' Python forward over an fp32 copy of the hidden states.
- Rotary embeddings and the SwiGLU product (silu(gate) * up) as one kernel each way, compiled
  at first use through NVRTC (which builds for the GPU at hand), in place of five to eight
  kernels and their intermediate tensors. CUDA only; the CPU keeps the models' own code.
- The LoRA update of a 4-bit layer as one addmm into the base layer's output (the scaling in
  the GEMM's epilogue) instead of peft's copy of that output, a scale and an add.
- Grouped-query attention without copies of the key/value heads (service.attention), and
  trl's LM-head loss folded by two compiled kernels where Triton cannot run
  (service.logprob).
Each replacement is checked on a probe against the code it replaces, forward and backward;
what does not match is left alone.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import structlog

from service import attention, elementwise, logprob

log = structlog.get_logger(__name__)

TRITON_MIN_CAPABILITY = (8, 0)
# Norms of the form weight * x / rms(x), computed in fp32 and cast back (Gemma's 1 + weight and
# others are not): the classes to try, each still checked on a probe before it is replaced.
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")
# MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x)); fused only where act_fn is SiLU.
SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
# Projections whose output goes only into the residual stream (the MLP's last).
LAST_PROJECTIONS = ("down_proj",)
PROBE_TOLERANCE = 1e-2  # relative and absolute
# In bf16 (8 significant bits), rounding once where the original rounds twice moves the output
# of a Mistral-7B-shaped MLP (14,336 wide) by up to 0.0625, while either lies 0.037-0.049 from
# the fp32 result: a probe allows eight times the compute dtype's epsilon (0.0625 in bf16).
PROBE_ULPS = 8


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


def fuse(model: Any, *, cuda_kernels: bool) -> dict[str, int]:
    """Every replacement this model takes; `cuda_kernels`: also the compiled rotary and SwiGLU
    kernels (on CUDA, and not under torch.compile, which fuses these itself). Returns counts
    by kind."""
    counts = {"rms_norms": fuse_rms_norms(model), "lora_layers": fuse_lora_updates(model)}
    if cuda_kernels:
        counts["rotary"] = fuse_rotary(model)
        counts["swiglu"] = fuse_swiglu(model)
        counts["grouped_attention"] = fuse_grouped_attention(model)
        counts["lm_head_loss"] = fuse_lm_head_loss(model)
    return counts


def _matches(got: Any, expected: Any) -> bool:
    import torch

    tolerance = PROBE_TOLERANCE
    if got.dtype.is_floating_point:
        tolerance = max(tolerance, PROBE_ULPS * torch.finfo(got.dtype).eps)
    return got.dtype == expected.dtype and bool(
        torch.allclose(got, expected, rtol=tolerance, atol=tolerance)
    )


# --------------------------------------------------------------------------- RMSNorm


def _fused_rms_norm(self: Any, hidden_states: Any) -> Any:
    import torch.nn.functional as F

    weight = self.weight
    return F.rms_norm(
        hidden_states, weight.shape, weight.to(hidden_states.dtype), self.variance_epsilon
    )


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
        if not _matches(got, expected):
            continue
        module.forward = types.MethodType(_fused_rms_norm, module)
        replaced += 1
    return replaced


# --------------------------------------------------------------------------- LoRA update


def _lora_update(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
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
    if getattr(self, "spotlora_update_first", False):  # see fuse_lora_updates
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


def fuse_lora_updates(model: Any) -> int:
    """Each peft LoRA layer over a bitsandbytes 4-bit layer computes its update as one addmm;
    a layer whose output only joins the residual stream (LAST_PROJECTIONS) computes it
    before the 4-bit matmul instead. Activation checkpointing (non-reentrant) stops each
    layer's recomputation at the last tensor the layer keeps for its backward: the update's
    input, then, so the 4-bit matmul, whose output the next layer's checkpoint already
    holds, is not recomputed: with adapters on every projection of a Mistral-7B or
    Llama-3.1-8B layer, whose down projection holds 27% of its weights, about 9% of the
    layer's matmul work in a step."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return 0
    replaced = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            module.forward = types.MethodType(_lora_update, module)  # type: ignore[method-assign]
            last = name.rsplit(".", 1)[-1] in LAST_PROJECTIONS
            module.spotlora_update_first = last  # type: ignore[assignment]
            replaced += 1
    return replaced


def rotary_embedding(original: Callable[..., Any]) -> Callable[..., Any]:
    """A model module's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) through the
    fused kernel; any other call goes to `original`."""

    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        plain = (
            not args
            and not torch.compiler.is_compiling()  # process-wide: Inductor's graphs keep theirs
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
        if not plain:
            return original(q, k, cos, sin, *args, **kwargs)
        rotary = elementwise.function("rotary")
        return rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)

    apply_rotary_pos_emb.spotlora_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _probe_rotary(
    fused: Callable[..., Any], original: Callable[..., Any], ref: Any
) -> list[list[Any]]:
    """Both functions on the same random q, k and angles, outputs and input gradients."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    dim = 16

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=ref.device, dtype=ref.dtype)

    q, k = rand(2, 4, 6, dim), rand(2, 2, 6, dim)
    angles = torch.rand(2, 6, dim // 2, generator=gen) * 6
    angles = torch.cat((angles, angles), dim=-1)
    cos = angles.cos().to(device=ref.device, dtype=ref.dtype)
    sin = angles.sin().to(device=ref.device, dtype=ref.dtype)
    grads = rand(2, 4, 6, dim), rand(2, 2, 6, dim)
    results = []
    for fn in (original, fused):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        outs = fn(qq, kk, cos, sin)
        results.append([*outs, *torch.autograd.grad(outs, (qq, kk), grads)])
    return results


def fuse_rotary(model: Any) -> int:
    """Point each attention class's module at the fused apply_rotary_pos_emb, after a probe on
    the model's device and dtype. This changes the function for every model of that
    architecture in the process (the models call it as a module global). Returns how many
    modules now use it."""
    ref = next(p for p in model.parameters() if p.dtype.is_floating_point)
    ref = ref.new_empty(0, dtype=_compute_dtype(model))
    replaced = 0
    for name in sorted({type(m).__module__ for m in model.modules() if _is_attention(m)}):
        source = sys.modules[name]
        current = getattr(source, "apply_rotary_pos_emb", None)
        if current is None or not hasattr(source, "rotate_half"):
            continue
        original = getattr(current, "spotlora_original", current)
        fused = rotary_embedding(original)
        if not _probe(_probe_rotary, fused, original, ref):
            log.warning("rotary_not_fused", module=name)
            continue
        source.apply_rotary_pos_emb = fused  # type: ignore[attr-defined]
        replaced += 1
    return replaced


def _probe(run: Callable[..., list[list[Any]]], *args: Any) -> bool:
    """Whether the two result lists of a probe `run` (the original code's, the fused one's)
    match, one by one. A kernel that cannot be built here (no NVRTC, a torch without
    torch.cuda._compile_kernel, which came in 2.8) counts as a mismatch: the job runs on the
    models' own code instead of failing."""
    try:
        want, got = run(*args)
        return all(_matches(g, w) for w, g in zip(want, got, strict=True))
    except Exception as err:  # whatever the cause, the models' own code stays
        log.warning("fused_kernel_failed", error=f"{type(err).__name__}: {err}".splitlines()[0])
        return False


def _is_attention(module: Any) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(module, "q_proj")


def _compute_dtype(model: Any) -> Any:
    import torch

    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _fused_mlp(self: Any, x: Any) -> Any:
    return self.down_proj(elementwise.function("swiglu").apply(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu(model: Any) -> int:
    """Replace the forward of each known SiLU-gated MLP whose fused output and input gradient
    match the original's on a probe; returns how many were replaced."""
    import torch

    replaced = 0
    for module in model.modules():
        if type(module).__name__ not in SWIGLU_MLP_CLASSES:
            continue
        if not isinstance(getattr(module, "act_fn", None), torch.nn.SiLU) and (
            type(getattr(module, "act_fn", None)).__name__ != "SiLUActivation"
        ):
            continue
        if replaced == 0 and not _probe(_probe_mlp, module):
            log.warning("swiglu_not_fused", module=type(module).__name__)
            return 0
        module.forward = types.MethodType(_fused_mlp, module)
        replaced += 1
    return replaced


def _probe_mlp(module: Any) -> list[list[Any]]:
    import torch

    ref = module.down_proj.weight
    dtype = _compute_dtype(module)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, module.gate_proj.in_features, generator=gen).to(ref.device, dtype)
    results = []
    with torch.autocast(ref.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for forward in (module.forward, types.MethodType(_fused_mlp, module)):
            xx = x.clone().requires_grad_()
            out = forward(xx)
            (grad,) = torch.autograd.grad(out.float().square().mean(), xx)
            results.append([out, grad])
    return results


# --------------------------------------------------------------------------- attention


def fuse_grouped_attention(model: Any) -> int:
    """transformers' "sdpa" attention through grouped_query_attention, after a probe on the
    model's device and dtype; process-wide, as the models look it up at each call. Returns
    how many attention modules of this model have grouped-query heads (0 if not sdpa)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    grouped = sum(
        1 for m in model.modules() if _is_attention(m) and getattr(m, "num_key_value_groups", 1) > 1
    )
    if not grouped or getattr(config, "_attn_implementation", None) != "sdpa":
        return 0
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    original = getattr(current, "spotlora_original", current)
    fused = attention.grouped_query_attention(original)
    ref = next(p for p in model.parameters() if p.dtype.is_floating_point)
    if not _probe(attention.probe, fused, original, ref.new_empty(0, dtype=_compute_dtype(model))):
        log.warning("grouped_attention_not_fused")
        return 0
    ALL_ATTENTION_FUNCTIONS["sdpa"] = fused
    return grouped


# --------------------------------------------------------------------------- LM-head loss


def fuse_lm_head_loss(model: Any = None) -> int:
    """trl's PyTorch fold of its chunked LM-head loss (the path of a GPU without Triton)
    through service.logprob's kernels, after a probe; process-wide. 1 if done."""
    import torch

    try:
        from trl.kernels import chunked_logprob
    except ImportError:
        return 0
    if not torch.cuda.is_available():
        return 0
    folds = []
    for name, names, make in (
        ("_forward_tile", logprob.FORWARD_PARAMETERS, logprob.fold_forward),
        ("_backward_tile", logprob.BACKWARD_PARAMETERS, logprob.fold_backward),
    ):
        current = getattr(chunked_logprob, name, None)
        original = getattr(current, "spotlora_original", current)
        if original is None or not logprob.matches_trl(original, names):
            log.warning("lm_head_loss_not_fused", reason=f"trl's {name} is not the one known")
            return 0
        folds.append((name, original, make(original)))
    if not _probe(logprob.probe, folds):
        log.warning("lm_head_loss_not_fused", reason="probe")
        return 0
    for name, _, fold in folds:
        setattr(chunked_logprob, name, fold)
    return 1
