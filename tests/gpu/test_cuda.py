"""On a CUDA GPU, as a T4 runs it: fp16 compute, a preemption, and a resume that continues
the loss curve. Skipped where there is no GPU; run on the GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.jobs import (
    adapter_tensors,
    at_step,
    job_env,
    manifest,
    parse_events,
    run_in_process,
    run_job,
    step_losses,
)
from tests.jobs import write_manifest as write

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def t4_job(tiny_model: Path, tiny_data: Path, out: Path) -> dict:
    return manifest(
        "cuda",
        str(tiny_model),
        str(tiny_data),
        str(out),
        quantization={"compute_dtype": "fp16"},  # a T4 has no bf16
        training={"max_steps": 8, "gradient_accumulation": 2, "batch_size": 2},
    )


def test_fp16_preempt_and_resume_continue_the_same_run(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    ref = run_job(
        ["run", "-f", str(write(tmp_path / "ref.yaml", t4_job(tiny_model, tiny_data, ref_out)))],
        job_env(tmp_path / "cache-ref"),
    )
    assert ref.code == 0, ref.stderr[-3000:]
    device = json.loads((ref_out / "run.json").read_text())
    assert device["device"]["kind"] == "cuda" and device["compute_dtype"] == "fp16"

    path = write(tmp_path / "job.yaml", t4_job(tiny_model, tiny_data, out))
    env = job_env(tmp_path / "cache")
    first = run_job(["run", "-f", str(path)], env, interrupt=at_step(3))
    assert first.code == 75, first.stderr[-3000:]
    second = run_job(["run", "-f", str(path)], env)
    assert second.code == 0, second.stderr[-3000:]

    want = step_losses(json.loads((ref_out / "run.json").read_text()))
    got = step_losses(json.loads((out / "run.json").read_text()))
    assert got.keys() == want.keys()
    for step in want:  # GPU kernels need not be bitwise repeatable; the curve must match
        assert got[step] == pytest.approx(want[step], rel=2e-3), step
    a, b = adapter_tensors(out / "adapter"), adapter_tensors(ref_out / "adapter")
    for name in b:
        assert a[name].dtype == torch.float32  # adapters stay fp32 under fp16 compute
        torch.testing.assert_close(a[name], b[name], rtol=2e-2, atol=1e-4)


def test_torch_compile_trains_the_same_curve(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """training.torch_compile on a GPU that Triton supports (the H200: bf16)."""
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"out-{compiled}"
        job = manifest(
            "cuda",
            str(tiny_model),
            str(tiny_data),
            str(out),
            training={"max_steps": 6, "batch_size": 4, "torch_compile": compiled},
        )
        done = run_job(
            ["run", "-f", str(write(tmp_path / f"{compiled}.yaml", job))],
            job_env(tmp_path / f"cache-{compiled}"),
        )
        assert done.code == 0, done.stderr[-3000:]
        events = [e for e in parse_events(done.stderr) if e.get("event") == "torch_compile"]
        assert bool(events) is compiled
        losses[compiled] = step_losses(json.loads((out / "run.json").read_text()))
    assert losses[True].keys() == losses[False].keys() and len(losses[True]) == 6
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=2e-2), step


def test_the_t4_kernel_path_trains_the_same_curve(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below compute capability 8.0 trl's LM-head loss runs on its PyTorch path (through the
    compiled fold) instead of its Triton kernel. The H100/H200 runs both: the same job, in
    process, as each GPU would; trl's flag is its own again after each."""
    from trl.kernels import chunked_logprob

    from service.fast import policy

    triton = chunked_logprob._TRITON_AVAILABLE
    losses = {}
    for t4 in (False, True):
        with monkeypatch.context() as patch:
            if t4:
                patch.setattr(policy, "TRITON_MIN_CAPABILITY", (99, 0))
            out = tmp_path / f"out-{t4}"
            losses[t4] = run_in_process(
                t4_job(tiny_model, tiny_data, out), tmp_path, str(t4), patch
            )
        kernels = json.loads((out / "run.json").read_text())["kernels"]
        assert kernels["triton_loss"] is (triton and not t4 and policy.c_compiler() is not None)
        assert chunked_logprob._TRITON_AVAILABLE is triton
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=2e-3), step


def test_offloaded_activations_come_back_bitwise_and_free_gpu_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.utils.checkpoint import checkpoint

    from service.fast import offload

    moved: list[bool] = []  # for each tensor moved, whether it is a weight or a view of one
    original = offload._pack

    def recording(tensor: torch.Tensor) -> object:
        packed = original(tensor)
        if isinstance(packed, tuple):  # no reference kept: the tensor must be free to go
            weights = (tensor, tensor._base)
            moved.append(any(isinstance(t, torch.nn.Parameter) for t in weights))
        return packed

    monkeypatch.setattr(offload, "_pack", recording)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(2048, 2048, device="cuda", dtype=torch.float16) for _ in range(9)]
    *stack, head = layers
    x0 = torch.randn(4096, 2048, device="cuda", dtype=torch.float16)

    def step(offloaded: bool) -> tuple[int, list[torch.Tensor]]:
        for layer in layers:
            layer.weight.grad = None
        x = x0.clone().requires_grad_()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with offload.activations_on_host(offloaded):
            h = x
            for layer in stack:
                h = checkpoint(lambda t, m=layer: torch.relu(m(t)), h, use_reentrant=False)
            loss = head(h).float().pow(2).mean()  # the head saves its weight: not moved
            del h
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before  # what waits for the backward
            loss.backward()
        torch.cuda.synchronize()
        return held, [m.weight.grad for m in layers]

    kept_held, kept_grads = step(False)
    moved_held, moved_grads = step(True)
    for a, b in zip(kept_grads, moved_grads, strict=True):
        assert torch.equal(a, b)
    # Seven layer inputs and the head's of 16 MiB each (x is the caller's) wait on the host.
    assert kept_held - moved_held >= 7 * 16 * 2**20, (kept_held, moved_held)
    assert len(moved) >= 8 and not any(moved)


def test_a_job_with_offloaded_activations_trains_the_same_curve(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 as on a T4; every saved CUDA tensor moved (the tiny model's are all small)."""
    from service.fast import offload

    moved: list[int] = []
    original = offload._pack

    def counting(tensor: object) -> object:
        packed = original(tensor)
        if isinstance(packed, tuple):
            moved.append(1)
        return packed

    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(offload, "_pack", counting)
    losses = {}
    for offloaded in (False, True):
        job = t4_job(tiny_model, tiny_data, tmp_path / f"out-{offloaded}")
        job["spec"]["training"].update(gradient_checkpointing=True, offload_activations=offloaded)
        losses[offloaded] = run_in_process(job, tmp_path, str(offloaded), monkeypatch)
    assert moved
    assert losses[True].keys() == losses[False].keys() and len(losses[True]) == 8
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=2e-3), step


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compiled_kernels_compute_what_their_pytorch_ops_compute(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled kernels against the same arithmetic as PyTorch ops (which the CPU tests
    hold to the models' own code), on a transposed view as the attention passes it; the
    rotary output is contiguous (the layout SDPA reads) and its gradient keeps the input's
    layout, so no copy follows."""
    from service.fast import elementwise

    half = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 8, 4, 32, device="cuda", dtype=half, generator=gen).transpose(1, 2)
    angles = torch.rand(2, 8, 16, device="cuda", generator=gen) * 6
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(half), angles.sin().to(half)
    grad = torch.randn(2, 8, 4, 32, device="cuda", dtype=half, generator=gen).transpose(1, 2)
    gate, up, dout = (torch.randn(3, 5, 64, device="cuda", dtype=half) * 4 for _ in range(3))

    def run() -> list[torch.Tensor]:
        xx = x.detach().requires_grad_()
        out = elementwise.function("rotary").apply(xx, cos, sin)
        (dx,) = torch.autograd.grad(out, xx, grad)
        assert out.is_contiguous() and dx.stride() == x.stride()
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        act = elementwise.function("swiglu").apply(g, u)
        return [out, dx, act, *torch.autograd.grad(act, (g, u), dout)]

    compiled = run()
    monkeypatch.setitem(elementwise._KERNELS, True, elementwise.Elementwise(cuda=False))
    for got, want in zip(compiled, run(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


def _patchable_globals() -> dict[str, object]:
    import transformers.models.llama.modeling_llama as llama
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from trl.kernels import chunked_logprob

    return {
        "rotary": llama.apply_rotary_pos_emb,
        "attention": dict(ALL_ATTENTION_FUNCTIONS._global_mapping),
        "tiles": (chunked_logprob._forward_tile, chunked_logprob._backward_tile),
        "triton": chunked_logprob._TRITON_AVAILABLE,
    }


def test_fused_kernels_train_the_same_curve_as_off(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The T4 job (trl's LM-head loss on its path without Triton) with every replacement
    required, then with fused_kernels off, in one process: fused first, which would leave
    the second run on fused code if anything stayed patched. The same curve (kernels need
    not be bitwise repeatable); off installs nothing."""
    from service.fast import policy

    monkeypatch.setattr(policy, "TRITON_MIN_CAPABILITY", (99, 0))  # as on a T4
    stock = _patchable_globals()
    losses, kernels = {}, {}
    for mode in ("require", "off"):
        job = t4_job(tiny_model, tiny_data, tmp_path / f"out-{mode}")
        job["spec"]["training"]["fused_kernels"] = mode
        losses[mode] = run_in_process(job, tmp_path, mode, monkeypatch)
        record = json.loads((tmp_path / f"out-{mode}" / "run.json").read_text())
        kernels[mode] = record["kernels"]
        assert _patchable_globals() == stock, mode
    assert set(kernels["require"]["installed"]) == set(EXPECTED_KERNELS)
    assert kernels["off"]["installed"] == {}
    for step, loss in losses["off"].items():
        assert losses["require"][step] == pytest.approx(loss, rel=2e-3), step


# What the tiny Llama takes on a GPU without Triton's compiler (a T4, or the image anywhere).
EXPECTED_KERNELS = ("rms_norm", "lora", "rotary", "swiglu", "lm_head_loss")
# The image's conditions: torch finds no CUDA toolkit (no CUDA_HOME, no nvcc, even where the
# test machine has /usr/local/cuda), and a PATH with no C compiler on it.
IMAGE_RUN = """
import sys
import torch.utils.cpp_extension as extension
extension.CUDA_HOME = None
try:
    extension.include_paths("cuda")
except OSError:
    pass
else:
    sys.exit("the CUDA toolkit's include paths are still found")
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"], ids=["t4-path", "bf16"])
def test_every_kernel_installs_in_the_images_conditions(
    dtype: str, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """No CUDA_HOME and no compiler, as in the spotlora image: with fused_kernels: require the
    job fails (exit 2) if anything falls back, so exit 0 means every replacement installed;
    Triton, which would need the compiler, is not used."""
    import shutil
    import subprocess
    import sys

    bare = tmp_path / "bin"
    bare.mkdir()
    path = f"{Path(sys.executable).parent}:{bare}"
    assert not any(shutil.which(cc, path=path) for cc in ("cc", "gcc", "clang"))
    env = job_env(tmp_path / "cache", PATH=path)
    for name in ("CUDA_HOME", "CUDA_PATH", "CC", "CXX"):
        env.pop(name, None)
    out = tmp_path / "out"
    job = t4_job(tiny_model, tiny_data, out)
    job["spec"]["quantization"]["compute_dtype"] = dtype
    job["spec"]["training"]["fused_kernels"] = "require"
    done = subprocess.run(
        [sys.executable, "-c", IMAGE_RUN, "run", "-f", str(write(tmp_path / "job.yaml", job))],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    kernels = record["kernels"]
    assert set(kernels["installed"]) == set(EXPECTED_KERNELS), kernels
    assert kernels["fallbacks"] == {} and kernels["triton_loss"] is False
    assert kernels["policy"]["c_compiler"] is None
    assert record["compute_dtype"] == dtype


def test_lm_head_loss_kernels_compute_what_trls_pytorch_folds_compute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """trl's chunked log-probabilities without Triton, through its PyTorch folds and through
    the kernels: two token blocks, a vocabulary in two tiles, entropy and top-1, fp16."""
    from trl.kernels import chunked_logprob

    from service.fast import logprob
    from service.fast.policy import Policy

    monkeypatch.setattr(chunked_logprob, "_TRITON_AVAILABLE", False)
    for name in ("_forward_tile", "_backward_tile"):
        monkeypatch.setattr(chunked_logprob, name, getattr(chunked_logprob, name))
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(5000, 256, device="cuda", dtype=torch.float16, generator=gen)
    weight = torch.randn(40000, 256, device="cuda", dtype=torch.float16, generator=gen) * 0.2
    targets = torch.randint(0, 40000, (5000,), device="cuda", generator=gen)
    targets[:100] = weight[:, :8].float().sum(-1).argmax()  # some targets are the top-1

    def run() -> list[torch.Tensor]:
        h = hidden.detach().requires_grad_()
        args = (h, weight, None, targets, 1.0, 32768, None, 1.0, ("entropy", "is_top1"))
        logprobs, entropy, _, _, top1 = chunked_logprob.ChunkedLogProbFunction.apply(*args)
        (grad,) = torch.autograd.grad(logprobs.sum(), h)
        return [logprobs, entropy, top1.float(), grad]

    forward_tile = chunked_logprob._forward_tile
    expected = run()
    assert logprob.applies(None, Policy(device="cuda", torch_version=(2, 13))) is None
    assert logprob.install(None, Policy(device="cuda", compute_dtype="fp16")) == 1
    launched = []
    compiled = logprob.compiled
    monkeypatch.setattr(
        logprob, "compiled", lambda *args: launched.append(args[1]) or compiled(*args)
    )
    got = run()
    # Two token blocks of two vocabulary tiles each way; trl gives no entropy gradient here,
    # only a placeholder for it, as in training.
    assert launched == ["spotlora_logprob_forward"] * 4 + ["spotlora_logprob_backward"] * 4
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-3)
    assert (got[2] != expected[2]).float().mean() < 1e-3  # ties may fall either way
    torch.testing.assert_close(got[3], expected[3], rtol=1e-2, atol=1e-3)
    logprob.uninstall(None)
    assert chunked_logprob._forward_tile is forward_tile
