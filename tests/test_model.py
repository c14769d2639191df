"""The frozen base under the adapters: what stays 4-bit, what stays in the compute dtype."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service import fetch
from service import model as product
from service.manifest.spec import LoraSpec, ModelSpec, QuantizationSpec
from service.memory import estimate_memory

torch = pytest.importorskip("torch")


def load(tiny_model: Path, frozen_dtype: str) -> object:
    quant = QuantizationSpec(compute_dtype="fp16", frozen_dtype=frozen_dtype)
    base = product.load_quantized_model(
        tiny_model, ModelSpec(source=str(tiny_model)), quant, "fp16", product.Device("cpu", "cpu")
    )
    torch.manual_seed(0)
    return product.add_lora(base, LoraSpec(), quant)


def unquantized_frozen(peft_model: object) -> dict[str, object]:
    return {
        name: param.dtype
        for name, param in peft_model.named_parameters()  # type: ignore[attr-defined]
        if not param.requires_grad and type(param).__name__ != "Params4bit"
    }


def test_by_default_the_unquantized_weights_stay_in_the_compute_dtype(tiny_model: Path) -> None:
    peft_model = load(tiny_model, "compute")
    frozen = unquantized_frozen(peft_model)
    assert any("embed_tokens" in name for name in frozen)
    assert any("norm" in name for name in frozen)
    assert set(frozen.values()) == {torch.float16}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]  # type: ignore[attr-defined]
    assert trainable and all("lora_" in name for name in trainable)


def test_frozen_dtype_fp32_upcasts_them_as_peft_does(tiny_model: Path) -> None:
    peft_model = load(tiny_model, "fp32")
    assert set(unquantized_frozen(peft_model).values()) == {torch.float32}
    quantized = [
        p
        for p in peft_model.parameters()  # type: ignore[attr-defined]
        if type(p).__name__ == "Params4bit"
    ]
    assert quantized and all(p.dtype == torch.uint8 for p in quantized)


def test_both_give_the_same_fp16_loss_and_gradients(tiny_model: Path) -> None:
    """An fp16 residual stream against an fp32 one, on the same weights and adapters."""
    input_ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(1))
    results = {}
    for frozen_dtype in ("compute", "fp32"):
        peft_model = load(tiny_model, frozen_dtype)
        product.upcast_trainable_to_fp32(peft_model)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = peft_model(input_ids=input_ids, labels=input_ids).loss  # type: ignore[operator]
        loss.backward()
        grads = torch.cat(
            [
                p.grad.flatten()
                for p in peft_model.parameters()  # type: ignore[attr-defined]
                if p.requires_grad and p.grad is not None
            ]
        )
        results[frozen_dtype] = (loss.item(), grads)
    (loss16, grad16), (loss32, grad32) = results["compute"], results["fp32"]
    assert torch.isfinite(grad16).all() and grad16.abs().sum() > 0
    assert loss16 == pytest.approx(loss32, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


def test_the_runtime_estimate_follows_the_frozen_dtype(tiny_model: Path) -> None:
    estimates = {}
    for frozen_dtype in ("compute", "fp32"):
        peft_model = load(tiny_model, frozen_dtype)
        estimates[frozen_dtype] = estimate_memory(
            peft_model, max_length=512, gradient_checkpointing=True, weight_bytes=0
        )
    assert estimates["fp32"].per_sequence_bytes > estimates["compute"].per_sequence_bytes
    # autocast's half-precision copies of an fp32 LM head
    assert estimates["fp32"].fixed_bytes > estimates["compute"].fixed_bytes


def test_compile_layers_wraps_each_decoder_layer(tiny_model: Path) -> None:
    peft_model = load(tiny_model, "compute")
    layers = peft_model.get_base_model().model.layers  # type: ignore[attr-defined]
    assert product.compile_layers(peft_model) == len(layers) > 0
    assert all(layer._compiled_call_impl is not None for layer in layers)


HUB_LOOKUPS = """
import sys
from pathlib import Path

from service import fetch
from service.errors import SpotloraError
from service.manifest.spec import ModelSpec

for status in (404, 401, 403):
    spec = ModelSpec(source=f"org/refused-{status}")
    for name, call in (
        ("config", lambda: fetch.fetch_config(spec)),
        ("snapshot", lambda: fetch.fetch_model(spec, Path(sys.argv[1]))),
    ):
        try:
            call()
        except SpotloraError as err:
            print(status, name, int(err.exit_code), str(err), flush=True)
"""
# What huggingface.co answers for a missing, a private (no token) and a gated model.
HUB_ERROR_CODES = {404: "RepoNotFound", 401: None, 403: "GatedRepo"}


def test_a_model_the_hub_refuses_is_an_input_error_not_a_retry(tmp_path: Path) -> None:
    """A stand-in Hub over HTTP refuses org/refused-<status> with that status, as
    huggingface.co does: a retry cannot help, so exit 2, with the status named. One process
    for all of them (importing transformers is most of the time)."""
    import http.server
    import os
    import subprocess
    import sys
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            found = re.search(r"refused-(\d+)", self.path)
            status = int(found[1]) if found else 404
            body = b'{"error": "refused"}'
            self.send_response(status)
            if HUB_ERROR_CODES.get(status):
                self.send_header("X-Error-Code", str(HUB_ERROR_CODES[status]))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    try:
        out = subprocess.run(
            [sys.executable, "-c", HUB_LOOKUPS, str(tmp_path / "cache")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    finally:
        server.shutdown()
    lines = [line.split(" ", 3) for line in out.splitlines()]
    assert [line[:3] for line in lines] == [
        [str(status), name, "2"] for status in (404, 401, 403) for name in ("config", "snapshot")
    ], out
    assert all(f"org/refused-{s}: " in text and f"({s})" in text for s, _, _, text in lines), out


def test_a_missing_local_model_directory_is_named_without_asking_the_hub(tmp_path: Path) -> None:
    """spec.export.merged reads config.json first: a path that is not there is the
    manifest's error (exit 2), not a Hub lookup of the path (exit 69)."""
    missing = str(tmp_path / "no-such-model")
    for call in (
        lambda: fetch.fetch_config(ModelSpec(source=missing)),
        lambda: fetch.fetch_model(ModelSpec(source=missing), tmp_path),
    ):
        with pytest.raises(product.ManifestError, match="no such directory"):
            call()
