"""Fused kernels: the same numbers as the models' own code, and none a T4 cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service import attention, kernels


def _loss_and_grads(model: Any, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # the same dropout masks in both runs
    ids = torch.arange(48).reshape(2, 24) % 50
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(out.loss), grads


def test_fused_rms_norm_gives_the_same_loss_and_gradients(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    loss, grads = _loss_and_grads(model)
    assert kernels.fuse_rms_norms(model) == model.config.num_hidden_layers * 2 + 1
    fused_loss, fused_grads = _loss_and_grads(model)
    assert fused_loss == loss
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)


class LlamaRMSNorm(torch.nn.Module):
    """Named like Llama's, computed like Gemma's (1 + weight): must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(8))
        self.variance_epsilon = 1e-6

    def forward(self, x: Any) -> Any:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_norm_that_computes_otherwise_is_not_replaced() -> None:
    model = torch.nn.Sequential(LlamaRMSNorm())
    assert kernels.fuse_rms_norms(model) == 0


def test_triton_only_from_compute_capability_8() -> None:
    assert not kernels.triton_supported((7, 5))  # T4
    assert kernels.triton_supported((8, 0)) and kernels.triton_supported((9, 0))
    assert not kernels.triton_supported(None)


def test_fused_rotary_and_swiglu_give_the_same_loss_and_gradients(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels' arithmetic (here as PyTorch ops, which the CPU runs; the GPU tests run the
    jiterator kernels): every layer's rotary embedding and MLP through them."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    loss, grads = _loss_and_grads(model)
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", llama.apply_rotary_pos_emb)
    assert kernels.fuse_rotary(model) == 1
    assert kernels.fuse_swiglu(model) == model.config.num_hidden_layers
    assert llama.apply_rotary_pos_emb.spotlora_original is not None
    fused_loss, fused_grads = _loss_and_grads(model)
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert kernels.fuse_rotary(model) == 1  # again: wraps the original, not itself
    assert llama.apply_rotary_pos_emb.spotlora_original.__name__ == "apply_rotary_pos_emb"
    assert not hasattr(llama.apply_rotary_pos_emb.spotlora_original, "spotlora_original")


def test_a_kernel_that_cannot_be_built_leaves_the_models_code(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a torch older than 2.8, which has no torch.cuda._compile_kernel."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AutoModelForCausalLM

    from service import elementwise

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("module 'torch.cuda' has no attribute '_compile_kernel'")

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", llama.apply_rotary_pos_emb)
    monkeypatch.setattr(elementwise.Elementwise, "rope", missing)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    original = llama.apply_rotary_pos_emb
    assert kernels.fuse_rotary(model) == 0
    assert llama.apply_rotary_pos_emb is original
    _loss_and_grads(model)


def test_a_bf16_mlp_of_a_7b_width_takes_the_fused_swiglu() -> None:
    """In bf16 the kernel's one rounding and the original's two put the MLP's outputs up to
    ~0.06 apart after a 14,336-wide down projection (as far as each is from fp32): the probe
    allows for the dtype, or bf16 jobs never got the kernel."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=14336, dtype=torch.bfloat16)
    mlp = LlamaMLP(config)
    for weight in (mlp.gate_proj.weight, mlp.up_proj.weight):  # a 4,096-wide input's scale
        torch.nn.init.normal_(weight, std=0.08)
    torch.nn.init.normal_(mlp.down_proj.weight, std=0.02)
    model = torch.nn.Sequential(mlp.to(torch.bfloat16))
    model.config = config  # type: ignore[assignment]
    assert kernels.fuse_swiglu(model) == 1


def test_a_rotary_embedding_of_another_form_is_left_alone(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.models.llama.modeling_llama as llama
    from transformers import AutoModelForCausalLM

    def interleaved(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
        """GPT-J's layout: pairs (x0, x1), (x2, x3)... rotate, not halves."""

        def rotate(x: Any) -> Any:
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", interleaved)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert kernels.fuse_rotary(model) == 0
    assert llama.apply_rotary_pos_emb is interleaved


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "biased-attention"])
def test_lora_update_as_one_addmm_matches_peft(
    tiny_model: Path, tmp_path: Path, bias: bool
) -> None:
    """The real 4-bit base on the CPU, dropout on: the same loss and adapter gradients as
    peft's forward; a disabled adapter still gives the base model's output. With biases on
    the projections (as Qwen2's q/k/v) too: bitsandbytes returned a view of 3-D rows there,
    which autograd forbids changing in place; flat rows give a tensor of their own."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    if bias:
        config = AutoConfig.from_pretrained(tiny_model)
        config.attention_bias = True
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "biased")
        tiny_model = tmp_path / "biased"

    from service.manifest.spec import LoraSpec, QuantizationSpec
    from service.model import add_lora, disable_cpu_inference_repack

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        dtype=torch.float32,
    )
    disable_cpu_inference_repack(model)
    peft_model = add_lora(model, LoraSpec(r=4, dropout=0.1), QuantizationSpec())
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; the gradients of A would all be zero
            torch.nn.init.normal_(param, std=0.02)
    ids = torch.arange(12).reshape(1, 12)

    def logits(disabled: bool) -> torch.Tensor:
        peft_model.eval()
        with torch.no_grad():
            if disabled:
                with peft_model.disable_adapter():
                    return peft_model(input_ids=ids).logits
            return peft_model(input_ids=ids).logits

    base, adapted = logits(True), logits(False)
    peft_model.train()
    loss, grads = _loss_and_grads(peft_model, seed=5)
    layers = kernels.fuse_lora_updates(peft_model)
    assert layers == 4 * model.config.num_hidden_layers  # q, k, v, o
    peft_model.train()
    fused_loss, fused_grads = _loss_and_grads(peft_model, seed=5)
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert len(grads) == 2 * layers and fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert torch.equal(logits(True), base)
    torch.testing.assert_close(logits(False), adapted)
    assert not torch.allclose(base, adapted)
    # Updated in place on the 4-bit matmul's own output, not on a view of it: a view's
    # in-place update costs the backward a copy of the gradient (CopySlices) and a
    # zero-filled one (AsStridedBackward0) per projection.
    out = peft_model(input_ids=ids).logits
    assert not {"CopySlices", "AsStridedBackward0"} & _graph_nodes(out.grad_fn)


def _graph_nodes(fn: Any) -> set[str]:
    seen, names, todo = set(), set(), [fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def _quantized_lora(tiny_model: Path, targets: list[str], dropout: float = 0.1) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from service.manifest.spec import LoraSpec, QuantizationSpec
    from service.model import add_lora, disable_cpu_inference_repack

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        dtype=torch.float32,
    )
    disable_cpu_inference_repack(model)
    peft_model = add_lora(
        model, LoraSpec(r=4, dropout=dropout, target_modules=targets), QuantizationSpec()
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; the gradients of A would all be zero
            torch.nn.init.normal_(param, std=0.02)
    return peft_model


def test_checkpointing_does_not_recompute_the_last_projections_4bit_matmul(
    tiny_model: Path,
) -> None:
    """Adapters on every projection, non-reentrant checkpointing (as the trainer sets it):
    the backward recomputes each layer up to the down projection's adapter, not the 4-bit
    matmul after it; loss and gradients stay peft's."""
    import bitsandbytes as bnb

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = _quantized_lora(tiny_model, targets)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            projection = name.split(".")[-2]  # ...mlp.down_proj.base_layer

            def count(*_: Any, projection: str = projection) -> None:
                calls[projection] = calls.get(projection, 0) + 1

            module.register_forward_hook(count)

    def run() -> tuple[float, dict[str, torch.Tensor], dict[str, int]]:
        loss, grads = _loss_and_grads(model, seed=5)
        counted = dict(calls)
        calls.clear()
        return loss, grads, counted

    loss, grads, peft_calls = run()
    layers = model.config.num_hidden_layers
    assert peft_calls["down_proj"] == peft_calls["gate_proj"] == 2 * layers  # recomputed
    assert kernels.fuse_lora_updates(model) == 7 * layers
    fused_loss, fused_grads, fused_calls = run()
    assert fused_calls["gate_proj"] == 2 * layers
    assert fused_calls["down_proj"] == layers  # the forward's only
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert fused_grads.keys() == grads.keys() and len(grads) == 2 * 7 * layers
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def _packed_loss_and_grads(model: Any) -> tuple[float, dict[str, torch.Tensor]]:
    """Two rows, each two sequences packed (positions restart) and the second row padded."""
    ids = torch.arange(48).reshape(2, 24) % 50 + 3
    positions = torch.cat((torch.arange(10), torch.arange(14))).expand(2, 24)
    attention = torch.ones(2, 24, dtype=torch.long)
    attention[1, 20:] = 0
    out = model(input_ids=ids, labels=ids, attention_mask=attention, position_ids=positions)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(out.loss), grads


def test_grouped_query_attention_without_repeated_heads_matches(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny Llama has two query heads per key/value head. Under a mask (padding, packed
    sequences) the fused attention gives the same loss and gradients, through its own path."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    loss, grads = _packed_loss_and_grads(model)
    repeated = []
    repeat_rows = attention._repeat_rows
    monkeypatch.setattr(
        attention,
        "_repeat_rows",
        lambda mask, groups, dtype: repeated.append(groups) or repeat_rows(mask, groups, dtype),
    )
    assert kernels.fuse_grouped_attention(model) == model.config.num_hidden_layers
    repeated.clear()  # the probe's
    fused_loss, fused_grads = _packed_loss_and_grads(model)
    assert repeated == [2] * model.config.num_hidden_layers
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert kernels.fuse_grouped_attention(model) == model.config.num_hidden_layers  # again
    assert not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"].spotlora_original, "spotlora_original")
    # Process-wide, it must leave a torch.compile'd model (training.torch_compile) its own
    # attention: while Inductor traces, it hands every call to the original.
    repeated.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _packed_loss_and_grads(model)[0] == pytest.approx(loss, rel=1e-5)
    assert repeated == []


def test_trls_tile_functions_are_the_ones_the_loss_kernels_replace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The installed trl's PyTorch folds take the parameters the kernels were written for;
    wrapped, a CPU tile still goes through them, called as trl calls them."""
    from trl.kernels import chunked_logprob

    from service import logprob

    forward, backward = chunked_logprob._forward_tile, chunked_logprob._backward_tile
    assert logprob.matches_trl(forward, logprob.FORWARD_PARAMETERS)
    assert logprob.matches_trl(backward, logprob.BACKWARD_PARAMETERS)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen)
    targets = torch.tensor([0, 5, 17, 39, 20, 21, 3])

    def run() -> list[torch.Tensor]:
        args = (hidden, weight, None, targets, 1.0, 16, None, 1.0, ("entropy", "is_top1"))
        logprobs, entropy, _, _, top1 = chunked_logprob.ChunkedLogProbFunction.apply(*args)
        (grad,) = torch.autograd.grad(logprobs.sum(), hidden)
        return [logprobs, entropy, top1, grad]

    expected = run()
    monkeypatch.setattr(chunked_logprob, "_forward_tile", logprob.fold_forward(forward))
    monkeypatch.setattr(chunked_logprob, "_backward_tile", logprob.fold_backward(backward))
    for got, want in zip(run(), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert kernels.fuse_lm_head_loss() == 0  # no CUDA here


def test_a_t4_takes_trls_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "_TRITON_AVAILABLE", True)
    kernels.use_triton_kernels(False)
    assert chunked_logprob._TRITON_AVAILABLE is False
    assert not chunked_logprob._use_triton(torch.device("cuda"))
