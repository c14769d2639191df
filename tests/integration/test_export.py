"""The merged export end to end with real libraries: a real adapter on the tiny model and on
SmolLM2-135M, merged, published into a local output, loaded back as a user would; and
`spotlora export URI` as a process."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from examples.samples import export_smollm2, make_synthetic_rows
from service.data.shape import alpaca_prompt
from service.export import (
    EXPORT_RECORD,
    GENERIC_PROMPTS,
    TOLERANCES,
    ExportMismatch,
    compare_logits,
    export_merged,
)
from service.manifest import FineTuneJob, JobSpec
from service.storage import LocalStorage, sha256_file
from tests.conftest import REPO
from tests.jobs import job_env, manifest, run_in_process, run_job

PROMPTS = [alpaca_prompt(row) + row["output"] for row in make_synthetic_rows(4, seed=11)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapter(model_dir: Path, out: Path, *, b_std: float, seed: int = 0) -> Path:
    """A real peft adapter with non-zero lora_B (a fresh one is zero), so the merge changes
    the weights, saved as training saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=b_std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "adapter", b_std=1.0)


def job_spec(model: Path, output: Path, **export: Any) -> JobSpec:
    doc = manifest("export-test", str(model), "/data/train.jsonl", str(output))
    doc["spec"]["export"] = {"merged": True, **export}
    return FineTuneJob.model_validate(doc).spec


def base_plus_adapter_logits(
    model_dir: Path, adapter: Path, dtype: torch.dtype, *, trained: bool = True
) -> list[Any]:
    """The reference, computed here independently of service.export: the adapter on the base
    as training saw it (NF4, double quantization: the manifest's defaults), or on the original
    weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantization if trained else None
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return logits_of(PeftModel.from_pretrained(base, adapter).eval(), tokenizer)


def logits_of(model: Any, tokenizer: Any) -> list[Any]:
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


def reload_merged(merged: Path, dtype: torch.dtype | str = "auto") -> tuple[Any, list[Any]]:
    """As a user loads it: from the directory alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).eval()
    return model, logits_of(model, AutoTokenizer.from_pretrained(merged))


def files_under(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def check_published(out: Path, record: dict[str, Any], adapter: Path) -> None:
    """Every file EXPORT.json lists is there, unchanged, and older than it."""
    merged = out / "merged"
    on_disk = files_under(merged)
    export_json = on_disk.pop("EXPORT.json")
    assert json.loads(export_json.read_text()) == json.loads(json.dumps(record))
    listed = {f["key"]: f for f in record["files"]}
    assert set(listed) == set(on_disk)
    for key, path in on_disk.items():
        assert path.stat().st_size == listed[key]["bytes"]
        assert sha256_file(path) == listed[key]["sha256"]
        assert export_json.stat().st_mtime_ns >= path.stat().st_mtime_ns, key
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(on_disk)
    assert any(k.endswith(".safetensors") for k in on_disk)
    assert record["adapter_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert record["verification"]["passed"] is True
    assert 0 < record["peak_anonymous_memory_bytes"] < record["peak_host_memory_bytes"]
    assert record["seconds"]["total"] > 0


@pytest.mark.parametrize(
    ("dtype", "base"), [("fp32", "trained"), ("bf16", "trained"), ("fp32", "original")]
)
def test_merged_model_reloads_and_matches_base_plus_adapter(
    tiny_model: Path, tiny_adapter: Path, tmp_path: Path, dtype: str, base: str
) -> None:
    out = tmp_path / "out"
    record = export_merged(
        job_spec(tiny_model, out, dtype=dtype, base=base),
        tiny_model,
        tiny_adapter,
        PROMPTS,
        LocalStorage(out),
        tmp_path / "work",
    )
    assert record["dtype"] == dtype and record["device"] == "cpu"
    assert record["uri"] == str(out / "merged")
    check_published(out, record, tiny_adapter)
    assert not (tmp_path / "work" / "merged").exists()  # staging cleaned up
    # Plain weights: nothing tells a loader to quantize them again.
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())

    model, merged = reload_merged(out / "merged")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert next(model.parameters()).dtype == torch_dtype  # config.json says the export dtype
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    trained = base == "trained"
    reference = base_plus_adapter_logits(tiny_model, tiny_adapter, torch_dtype, trained=trained)
    agreement = compare_logits(reference, merged)
    tolerance = TOLERANCES[dtype]
    assert agreement.mean_kl <= tolerance.mean_kl and agreement.max_kl <= tolerance.max_kl
    # ...and the merge changed the model far more than its rounding did: a merge that lost
    # the adapter would not have passed.
    verification = record["verification"]
    assert verification["adapter_effect_max_kl"] > 10 * verification["max_kl"]
    assert verification["adapter_effect_mean_kl"] > tolerance.mean_kl
    if dtype == "fp32":  # no rounding to hide in: what was merged into is the base asked for
        other = base_plus_adapter_logits(tiny_model, tiny_adapter, torch_dtype, trained=not trained)
        assert compare_logits(other, merged).mean_kl > 100 * max(agreement.mean_kl, 1e-12)


def test_a_rerun_leaves_no_stale_file_and_no_old_vouching(
    tiny_model: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stale = out / "merged" / "model-00009-of-00009.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older, larger export's last shard")
    (out / EXPORT_RECORD).write_text('{"old": true}')
    record = export_merged(
        job_spec(tiny_model, out), tiny_model, tiny_adapter, [], LocalStorage(out), tmp_path / "w"
    )
    assert not stale.exists()
    check_published(out, record, tiny_adapter)
    assert record["verification"]["prompts"] == len(GENERIC_PROMPTS)  # none given


@pytest.fixture
def corrupting_merge(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A merge that gets one weight wrong, as a broken merge would."""
    from peft.tuners.lora import LoraModel

    merge = LoraModel.merge_and_unload

    def corrupt(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = merge(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.mul_(3.0)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupt)
    yield


def test_a_failed_verification_publishes_nothing(
    tiny_model: Path, tiny_adapter: Path, tmp_path: Path, corrupting_merge: None
) -> None:
    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    (out / EXPORT_RECORD).write_text('{"old": true}')
    (out / "merged" / "model.safetensors").write_bytes(b"an older adapter's merged model")
    (out / "run.json").write_text("{}")
    with pytest.raises(ExportMismatch, match=r"mean KL .* \(tolerance 1e-06\).*nothing was"):
        export_merged(
            job_spec(tiny_model, out, dtype="fp32"),
            tiny_model,
            tiny_adapter,
            PROMPTS,
            LocalStorage(out),
            tmp_path / "work",
        )
    # The older merge is gone, its EXPORT.json and its model (neither belongs to this
    # adapter), and nothing new arrived.
    assert set(files_under(out)) == {"run.json"}
    assert not (tmp_path / "work" / "merged").exists()


def test_a_non_finite_adapter_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_model, tmp_path / "adapter", b_std=0.2)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("inf")
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ExportMismatch, match="merging the adapter into"):
        export_merged(
            job_spec(tiny_model, out), tiny_model, adapter, PROMPTS, LocalStorage(out), tmp_path
        )
    assert not (out / "merged").exists()


@pytest.fixture(scope="module")
def smollm2() -> Path:
    cache = Path(os.environ.get("SPOTLORA_TEST_CACHE", REPO / ".cache"))
    return export_smollm2(cache / "smollm2-135m")


def test_smollm2_merged_in_bf16_reloads_and_agrees(smollm2: Path, tmp_path: Path) -> None:
    adapter = make_adapter(smollm2, tmp_path / "adapter", b_std=0.02)
    out = tmp_path / "out"
    started = time.monotonic()
    record = export_merged(
        job_spec(smollm2, out, dtype="bf16"),
        smollm2,
        adapter,
        PROMPTS,
        LocalStorage(out),
        tmp_path / "work",
    )
    seconds = time.monotonic() - started
    check_published(out, record, adapter)
    verification = record["verification"]
    print(
        f"\nSmolLM2-135M bf16 merge: {seconds:.1f} s, peak host memory "
        f"{record['peak_host_memory_bytes'] / 2**30:.2f} GiB resident, "
        f"{record['peak_anonymous_memory_bytes'] / 2**30:.2f} GiB anonymous, estimated "
        f"{record['estimated_host_memory_bytes'] / 2**30:.2f} GiB; mean KL "
        f"{verification['mean_kl']:.2e}, max {verification['max_kl']:.2e}, top-1 "
        f"{verification['top1_agreement']:.3f}; adapter effect "
        f"{verification['adapter_effect_mean_kl']:.2e}"
    )
    assert record["peak_anonymous_memory_bytes"] < record["estimated_host_memory_bytes"]
    _, merged = reload_merged(out / "merged")
    reference = base_plus_adapter_logits(smollm2, adapter, torch.bfloat16)
    agreement = compare_logits(reference, merged)
    assert agreement.mean_kl <= TOLERANCES["bf16"].mean_kl
    assert agreement.max_kl <= TOLERANCES["bf16"].max_kl
    assert agreement.top1_agreement >= 0.9  # bf16 flips near-ties: 0.97 measured


# --------------------------------------------------------------------------- the command


def finished_run(out: Path, model: Path, data: Path, adapter: Path) -> Path:
    """What a finished run leaves: run.json with its manifest, and adapter/."""
    doc = manifest("export-cli", str(model), str(data), str(out))
    job = FineTuneJob.model_validate(doc)
    out.mkdir(parents=True)
    record = {
        "run_id": "export-cli",
        "status": "succeeded",
        "manifest": job.model_dump(mode="json", by_alias=True),
    }
    (out / "run.json").write_text(json.dumps(record))
    for name, path in files_under(adapter).items():
        (out / "adapter" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "adapter" / name).write_bytes(path.read_bytes())
    return out


def test_spotlora_export_as_a_process(
    tiny_model: Path, tiny_data: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    out = finished_run(tmp_path / "run", tiny_model, tiny_data, tiny_adapter)
    run_json = (out / "run.json").read_bytes()
    done = run_job(["export", str(out), "--dtype", "bf16"], job_env(tmp_path / "cache"))
    assert done.code == 0, done.stderr[-3000:]
    assert done.named("export_prompts")[0]["source"] == "train"  # the run held no eval rows out
    [published] = done.named("export_published")
    assert published["passed"] is True and published["dtype"] == "bf16"
    record = json.loads((out / EXPORT_RECORD).read_text())
    check_published(out, record, out / "adapter")
    assert (out / "run.json").read_bytes() == run_json  # the run's record stays as written
    assert not (tmp_path / "cache" / "export").exists() or not any(
        (tmp_path / "cache" / "export").iterdir()
    )


def test_spotlora_export_with_its_data_out_of_reach_uses_generic_prompts(
    tiny_model: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    out = finished_run(tmp_path / "run", tiny_model, tmp_path / "gone.jsonl", tiny_adapter)
    done = run_job(["export", str(out)], job_env(tmp_path / "cache"))
    assert done.code == 0, done.stderr[-3000:]
    assert done.named("export_prompts_generic")
    assert json.loads((out / EXPORT_RECORD).read_text())["dtype"] == "fp32"  # the base's own


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("{tmp}/nothing-here", "no run.json (not a finished run's output)"),
        ("ftp://host/run", "export: URI 'ftp://host/run'"),
        ("{tmp}/no-adapter", "no adapter/adapter_model.safetensors"),
        ("{tmp}/corrupt", "corrupt/run.json: not a run record"),
    ],
)
def test_spotlora_export_refuses_what_is_not_a_finished_run(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, uri: str, message: str
) -> None:
    no_adapter = tmp_path / "no-adapter"
    no_adapter.mkdir()
    job = FineTuneJob.model_validate(
        manifest("x", str(tiny_model), str(tiny_data), str(no_adapter))
    )
    record = {"status": "skipped", "manifest": job.model_dump(mode="json", by_alias=True)}
    (no_adapter / "run.json").write_text(json.dumps(record))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "run.json").write_bytes(b'{"status": "succ\xff')  # cut short
    done = run_job(["export", uri.format(tmp=tmp_path)], job_env(tmp_path / "cache"))
    assert done.code == 2, done.stderr[-3000:]
    assert message in done.stderr


def test_spotlora_export_of_a_broken_adapter_exits_65(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_model, tmp_path / "adapter", b_std=0.2)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights[next(k for k in weights if "lora_B" in k)][0, 0] = float("nan")
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    out = finished_run(tmp_path / "run", tiny_model, tiny_data, adapter)
    done = run_job(["export", str(out)], job_env(tmp_path / "cache"))
    assert done.code == 65, done.stderr[-3000:]
    assert not (out / "merged").exists() or not any((out / "merged").iterdir())


def test_spotlora_export_with_storage_unreachable_exits_69(tmp_path: Path) -> None:
    from tests.conftest import free_port

    env = job_env(
        tmp_path / "cache",
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_MAX_ATTEMPTS="2",
    )
    done = run_job(["export", "s3://bucket/jobs/x/runs/abc/"], env, timeout_seconds=300)
    assert done.code == 69, done.stderr[-3000:]


def test_the_trained_model_is_freed_before_the_merge(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge loads the base again: while Trainer, its callbacks or accelerate still hold
    the trained 4-bit model, a host sized by the pre-flight holds both. Weak references to
    the model training built must be dead when the export starts."""
    import gc
    import weakref

    from service import export, model

    prepare, export_merged = model.prepare, export.export_merged
    built: list[weakref.ref[Any]] = []
    alive_at_merge: list[bool] = []

    def prepare_and_watch(*args: Any, **kwargs: Any) -> Any:
        peft_model, tokenizer, path = prepare(*args, **kwargs)
        built.extend([weakref.ref(peft_model), weakref.ref(peft_model.get_base_model())])
        return peft_model, tokenizer, path

    def merge_and_check(*args: Any, **kwargs: Any) -> dict[str, Any]:
        gc.collect()
        alive_at_merge.extend(ref() is not None for ref in built)
        return export_merged(*args, **kwargs)

    monkeypatch.setattr(model, "prepare", prepare_and_watch)
    monkeypatch.setattr(export, "export_merged", merge_and_check)
    out = tmp_path / "out"
    job = manifest("freed", str(tiny_model), str(tiny_data), str(out), training={"max_steps": 2})
    job["spec"]["export"] = {"merged": True, "verify_prompts": 2}
    run_in_process(job, tmp_path, "freed", monkeypatch)
    assert alive_at_merge == [False, False]
    assert json.loads((out / EXPORT_RECORD).read_text())["verification"]["passed"] is True
