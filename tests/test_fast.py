"""The speed layer: the same numbers as the models' own code, none a T4 or the image cannot
run, and nothing left patched once the run's training is over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service import fast
from service.errors import ManifestError
from service.fast import elementwise, logprob, lora, rms_norm, rotary, swiglu
from service.fast.policy import Policy
from service.fast.probe import Fallback

CPU = Policy()  # fp32 on the CPU, as the CPU tests train
# The compiled kernels' arithmetic as PyTorch ops: a policy that lets them apply on the CPU.
AS_ON_CUDA = Policy(device="cuda", torch_version=(2, 13))


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
    assert rms_norm.install(model, CPU) == model.config.num_hidden_layers * 2 + 1
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


def test_a_norm_that_computes_otherwise_falls_back_and_keeps_its_forward() -> None:
    model = torch.nn.Sequential(LlamaRMSNorm())
    with pytest.raises(Fallback, match="output differs"):
        rms_norm.install(model, CPU)
    assert "forward" not in model[0].__dict__


def test_triton_only_from_compute_capability_8_with_a_compiler() -> None:
    gpu = Policy(device="cuda", c_compiler="/usr/bin/gcc")
    assert not Policy(device="cuda", capability=(7, 5), c_compiler="/usr/bin/gcc").triton(True)
    assert Policy(device="cuda", capability=(8, 0), c_compiler="/usr/bin/gcc").triton(True)
    h100 = Policy(device="cuda", capability=(9, 0), c_compiler="/usr/bin/gcc")
    assert h100.triton(True) and not h100.triton(False)  # no Triton installed
    assert not Policy(device="cuda", capability=(9, 0), c_compiler=None).triton(True)  # image
    assert not gpu.triton(True)  # no capability known


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
    assert rotary.install(model, AS_ON_CUDA) == 1
    assert swiglu.install(model, AS_ON_CUDA) == model.config.num_hidden_layers
    assert llama.apply_rotary_pos_emb.spotlora_original is not None
    fused_loss, fused_grads = _loss_and_grads(model)
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert rotary.install(model, AS_ON_CUDA) == 1  # again: wraps the original, not itself
    assert llama.apply_rotary_pos_emb.spotlora_original.__name__ == "apply_rotary_pos_emb"
    assert not hasattr(llama.apply_rotary_pos_emb.spotlora_original, "spotlora_original")
    rotary.uninstall(model)
    swiglu.uninstall(model)
    assert not hasattr(llama.apply_rotary_pos_emb, "spotlora_original")
    assert _loss_and_grads(model)[0] == loss


def test_a_kernel_that_cannot_be_built_leaves_the_models_code(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a torch older than 2.8, which has no torch.cuda._compile_kernel."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AutoModelForCausalLM

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("module 'torch.cuda' has no attribute '_compile_kernel'")

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", llama.apply_rotary_pos_emb)
    monkeypatch.setattr(elementwise.Elementwise, "rope", missing)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    original = llama.apply_rotary_pos_emb
    with pytest.raises(Fallback, match=r"AttributeError: module 'torch\.cuda'"):
        rotary.install(model, AS_ON_CUDA)
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
    assert swiglu.install(model, Policy(compute_dtype="bf16", residual_dtype="bf16")) == 1


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
    with pytest.raises(Fallback, match="output differs"):
        rotary.install(model, AS_ON_CUDA)
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
    layers = lora.install(peft_model, CPU)
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
    assert lora.install(model, CPU) == 7 * layers
    fused_loss, fused_grads, fused_calls = run()
    assert fused_calls["gate_proj"] == 2 * layers
    assert fused_calls["down_proj"] == layers  # the forward's only
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert fused_grads.keys() == grads.keys() and len(grads) == 2 * 7 * layers
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_trls_tile_functions_are_the_ones_the_loss_kernels_replace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The installed trl's PyTorch folds take the parameters the kernels were written for;
    wrapped, a CPU tile still goes through them, called as trl calls them."""
    from trl.kernels import chunked_logprob

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
    assert logprob.applies(None, CPU) == "no CUDA GPU: the models' own code runs on the CPU"


@pytest.mark.parametrize(
    "policy",
    [
        Policy(device="cuda", capability=(7, 5), c_compiler="/usr/bin/gcc"),  # a T4
        Policy(device="cuda", capability=(9, 0), c_compiler=None),  # the image on an H100
    ],
    ids=["t4", "no-compiler"],
)
def test_trls_triton_loss_is_off_for_the_run_where_triton_cannot_run(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a compiler Triton fails the first step building its launcher (exit 1): trl's
    PyTorch path instead, and trl's flag as it was once the run's training is over."""
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "_TRITON_AVAILABLE", True)
    assert logprob.use_triton(policy) is False
    assert chunked_logprob._TRITON_AVAILABLE is False
    assert not chunked_logprob._use_triton(torch.device("cuda"))
    logprob.uninstall(None)
    assert chunked_logprob._TRITON_AVAILABLE is True
    h100 = Policy(device="cuda", capability=(9, 0), c_compiler="/usr/bin/gcc")
    assert logprob.use_triton(h100) is True and chunked_logprob._TRITON_AVAILABLE is True


def test_a_compiler_that_cannot_build_an_extension_is_no_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.fast import policy

    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert policy.c_compiler() is None
    assert "does not build" in policy.c_compiler_missing()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC")
    assert policy.c_compiler() is None


def _globals() -> dict[str, Any]:
    """What a fused run may change outside its own model, by name."""
    import transformers.models.llama.modeling_llama as llama
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from trl.kernels import chunked_logprob

    return {
        "llama.apply_rotary_pos_emb": llama.apply_rotary_pos_emb,
        "attention": dict(ALL_ATTENTION_FUNCTIONS._global_mapping),
        "masks": dict(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping),
        "trl._forward_tile": chunked_logprob._forward_tile,
        "trl._backward_tile": chunked_logprob._backward_tile,
        "trl._TRITON_AVAILABLE": chunked_logprob._TRITON_AVAILABLE,
    }


def _own_forwards(model: Any) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("mode", ["auto", "require"])
def test_fuse_reports_and_uninstall_leaves_nothing_patched(
    tiny_model: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every replacement on the real 4-bit model with adapters, as a GPU without a compiler
    would take them (the compiled kernels' arithmetic as PyTorch ops on the CPU); the LM-head
    loss, probed on CUDA, falls back here. Once undone, no global is patched and every module
    runs its class's forward; with "require" the fallback fails the run (exit 2), naming it,
    and nothing stays installed either."""
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "_TRITON_AVAILABLE", True)  # as where Triton is
    model = _quantized_lora(tiny_model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    before, loss = _globals(), _loss_and_grads(model, seed=5)[0]
    assert not _own_forwards(model)
    policy = Policy(mode=mode, device="cuda", capability=(9, 0), torch_version=(2, 13))
    if mode == "require":
        with pytest.raises(ManifestError, match=r"require, but lm_head_loss: .*CUDA") as err:
            fast.fuse(model, policy)
        assert ManifestError.exit_code == 2 and "\n" not in str(err.value)
    else:
        report = fast.fuse(model, policy)
        layers = model.config.num_hidden_layers
        assert report.installed == {
            "rms_norm": 2 * layers + 1,
            "lora": 5 * layers,
            "rotary": 1,
            "swiglu": layers,
        }
        assert list(report.fallbacks) == ["lm_head_loss"] and not report.triton
        assert report.as_dict()["policy"]["c_compiler"] is None
        assert fast.report(model) is report
        assert _globals() != before and _own_forwards(model)
        assert _loss_and_grads(model, seed=5)[0] == pytest.approx(loss, rel=1e-5)
        fast.uninstall(model)
    assert _globals() == before
    assert not _own_forwards(model)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert _loss_and_grads(model, seed=5)[0] == loss
    fast.uninstall(model)  # twice is harmless


def test_off_installs_nothing_and_says_so(tiny_model: Path) -> None:
    model = _quantized_lora(tiny_model, ["q_proj"])
    report = fast.fuse(model, Policy(mode="off", device="cuda", torch_version=(2, 13)))
    assert report.installed == {} and report.fallbacks == {}
    assert set(report.not_applicable.values()) == {"training.fused_kernels: off"}
    assert set(report.not_applicable) == set(fast.NAMES)
    assert not _own_forwards(model)


def test_the_lora_probe_catches_an_update_that_differs(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe runs the update, forward and backward, on the model's own layer: a wrong
    scaling is caught before any layer is replaced."""
    model = _quantized_lora(tiny_model, ["q_proj"], dropout=0.0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    monkeypatch.setitem(layer.scaling, "default", layer.scaling["default"])
    real = lora.lora_update

    def doubled(self: Any, x: Any) -> Any:
        self.scaling["default"] *= 2
        try:
            return real(self, x)
        finally:
            self.scaling["default"] /= 2

    monkeypatch.setattr(lora, "lora_update", doubled)
    with pytest.raises(Fallback, match="differs"):
        lora.install(model, CPU)
    assert not _own_forwards(model)


def test_a_job_reports_its_kernels_and_off_trains_without_any(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the norms and the LoRA update apply; a norm kernel that computes otherwise
    falls back (auto: the run goes on, run.json says why; require: exit 2 at load, naming
    it); off installs nothing and says so. The metric carries the same counts."""
    import json

    from service.cli import main
    from service.metrics.registry import JobMetrics
    from tests.jobs import job_env, manifest, write_manifest

    def wrong(self: Any, hidden_states: Any) -> Any:
        return hidden_states * 2

    gauges: list[tuple[dict[str, int], int]] = []
    real_gauges = JobMetrics.fused_kernels
    monkeypatch.setattr(
        JobMetrics,
        "fused_kernels",
        lambda self, counts, fallbacks: (
            gauges.append((counts, fallbacks)) or real_gauges(self, counts, fallbacks)
        ),
    )
    monkeypatch.setattr(rms_norm, "fused_rms_norm", wrong)
    for key, value in job_env(tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    records = {}
    for mode in ("require", "auto", "off"):
        out = tmp_path / f"out-{mode}"
        job = manifest(mode, str(tiny_model), str(tiny_data), str(out))
        job["spec"]["training"].update(fused_kernels=mode, max_steps=2)
        code = main(["run", "-f", str(write_manifest(tmp_path / f"{mode}.yaml", job))])
        assert code == (2 if mode == "require" else 0), mode
        if code == 0:
            records[mode] = json.loads((out / "run.json").read_text())["kernels"]
    layers = 2
    auto = records["auto"]
    assert auto["mode"] == "auto" and auto["installed"] == {"lora": 4 * layers}
    assert auto["fallbacks"]["rms_norm"].startswith("probe: the output differs")
    assert auto["not_applicable"]["rotary"].startswith("no CUDA GPU")
    off = records["off"]
    assert off["installed"] == {} and off["fallbacks"] == {}
    assert set(off["not_applicable"].values()) == {"training.fused_kernels: off"}
    assert gauges[0] == ({**dict.fromkeys(fast.NAMES, 0), "lora": 4 * layers}, 1)
    assert gauges[1] == (dict.fromkeys(fast.NAMES, 0), 0)


def test_the_fused_kernel_gauges() -> None:
    from service.metrics.registry import JobMetrics

    metrics = JobMetrics("j")
    metrics.fused_kernels({"rotary": 1, "swiglu": 0}, 2)
    value = metrics.registry.get_sample_value
    assert value("spotlora_fused_kernels", {"kernel": "rotary"}) == 1
    assert value("spotlora_fused_kernels", {"kernel": "swiglu"}) == 0
    assert value("spotlora_fused_kernel_fallbacks") == 2
