"""A merged model to serve (spec.export, `spotlora export URI`). The adapter learned on the
4-bit base, so by default (spec.export.base "trained") it is merged into those weights
dequantized to the export dtype: the merged model answers as base + adapter did in training.
"original" merges into the base's original weights instead. Never into the 4-bit weights
themselves: that keeps their rounding of W + BA (transformers #31293, peft #2321), 190 times
further from base + adapter than bf16's rounding.

1. Whatever is under merged/ is withdrawn (``withdraw``): EXPORT.json first, then the files.
   A merged model belongs to one adapter; a merge that fails must not leave an older one
   there (vLLM loads every *.safetensors it finds, a stale shard of an earlier, larger export
   with the new ones too). Publishing a new adapter withdraws it the same way.
2. Merge, save to local staging, load the staged files as a user would and compare their
   logits with base + adapter's: a mismatch raises ExportMismatch, nothing uploaded.
3. The new files are uploaded, merged/EXPORT.json last, listing each with size and sha256.
"""

from __future__ import annotations

import gc
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from service.errors import ExitCode, ManifestError, SpotloraError
from service.export.preflight import (
    RUNTIME_BYTES,
    VERIFY_TOKENS_PER_PROMPT,
    MergeNeeds,
    available_memory,
    export_dtype,
    held_by_this_process,
    merge_needs,
    preflight,
    refuse_quantized,
)
from service.manifest.spec import JobSpec
from service.model import torch_dtype
from service.storage import Storage, record_bytes, sha256_file, uri_join
from service.versions import library_versions

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

__all__ = [
    "ADAPTER_WEIGHTS",
    "EXPORT_RECORD",
    "GENERIC_PROMPTS",
    "RUNTIME_BYTES",
    "TOLERANCES",
    "ExportMismatch",
    "MergeNeeds",
    "available_memory",
    "compare_logits",
    "export_dtype",
    "export_merged",
    "held_by_this_process",
    "merge_needs",
    "preflight",
    "refuse_quantized",
    "verification_prompts",
    "withdraw",
]

MERGED_DIR = "merged"
EXPORT_RECORD = f"{MERGED_DIR}/EXPORT.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GIB = 2**30
# When a run's own rows are out of reach: any text exercises every merged weight.
GENERIC_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nExplain what a checksum is.\n\n### Response:\n",
    "Question: Why does the sea taste salty?\nAnswer: Rivers carry dissolved minerals",
    'def fibonacci(n: int) -> int:\n    """The n-th Fibonacci number."""\n    if n < 2:\n',
    "The committee met on Tuesday to discuss the budget. After two hours, the chair",
)


@dataclass(frozen=True)
class Tolerance:
    mean_kl: float
    max_kl: float


# KL(base + adapter || merged), nats a token. Both compute in the export dtype, so what
# differs is the rounding of W + BA to it and the order of the same sums. Measured, r=8 on
# q/k/v/o: SmolLM2-135M fp32 mean 1e-11, max 5e-11; fp16 3.4e-5, 1.9e-4; bf16 1.9e-3, 1.1e-2,
# no worse than bf16 inference itself (bf16 base + adapter against fp32: 1.4e-3, 1.1e-2); a
# random Mistral-7B shape in bf16, 4.4e-3, 6.7e-3. The 16-bit limits sit 4 to 30 times
# above those, far below a broken merge: into the NF4 base, mean 0.32 and max 1.3 on
# SmolLM2; the 7B adapter's own effect (what a merge that lost it would show), 0.33, 0.51.
TOLERANCES = {
    "fp32": Tolerance(mean_kl=1e-6, max_kl=1e-4),  # near-exact: the same sums, reordered
    "fp16": Tolerance(mean_kl=1e-3, max_kl=5e-3),  # 3 mantissa bits more than bf16
    "bf16": Tolerance(mean_kl=2e-2, max_kl=1e-1),
}


class ExportMismatch(SpotloraError):
    """The merged model does not compute what base + adapter computes; nothing was published.
    A retry cannot change that (exit 65, as unusable data)."""

    exit_code = ExitCode.DATA_UNUSABLE


@dataclass(frozen=True)
class Agreement:  # how far a model's next-token distributions are from a reference's
    positions: int
    mean_kl: float  # KL(reference || candidate), nats, averaged over positions
    max_kl: float
    top1_agreement: float  # share of positions where both rank the same token first
    max_top1_logprob_diff: float  # change of the log-prob of the reference's first token


def compare_logits(
    reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]
) -> Agreement:
    """Each element: one prompt's logits, positions x vocabulary. In float64, so an fp32
    merge's differences of 1e-9 are not lost in the arithmetic."""
    import torch

    kls, hits, top_diffs = [], [], []
    for ref, cand in zip(reference, candidate, strict=True):
        p = torch.log_softmax(ref.double(), dim=-1)
        q = torch.log_softmax(cand.double(), dim=-1)
        kls.append((p.exp() * (p - q)).sum(dim=-1))
        top = p.argmax(dim=-1, keepdim=True)
        hits.append(top[:, 0] == q.argmax(dim=-1))
        top_diffs.append((p.gather(-1, top) - q.gather(-1, top)).abs().max())
    kl, top1 = torch.cat(kls), float(torch.cat(hits).double().mean())  # a NaN carries through
    return Agreement(
        kl.numel(), float(kl.mean()), float(kl.max()), top1, float(torch.stack(top_diffs).max())
    )


def verification_prompts(rows: Sequence[dict[str, Any]], n: int) -> list[str]:
    """The first ``n`` rows shaped by service.data, as plain text with their responses, so the
    response tokens are compared too. Chat turns become "role: content" lines: any text
    exercises every merged weight, no chat template needed."""
    texts = []
    for row in rows:
        if "text" in row:
            text = row["text"]
        elif isinstance(row.get("prompt"), str):
            text = row["prompt"] + row["completion"]
        else:
            turns = row.get("messages") or [*row["prompt"], *row["completion"]]
            text = "\n".join(f"{m['role']}: {m['content']}" for m in turns)
        texts += [text] if text.strip() else []
        if len(texts) == n:
            break
    return texts


def export_merged(
    spec: JobSpec,
    model_dir: Path,
    adapter_dir: Path,
    prompts: list[str],
    output: Storage,
    work_dir: Path,
    stop: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Merge, verify, publish under output's merged/ (the module's steps); returns what
    run.json records under "export". Raises ExportMismatch, with nothing uploaded, when the
    merged files do not compute what base + adapter computes. ``stop`` is called between
    stages and uploads, and raises to end the export there (a preempted pod's stop)."""
    with _MemoryPeaks() as peaks:
        return _export(
            spec, model_dir, adapter_dir, prompts, output, work_dir, peaks, stop or _go_on
        )


def _go_on() -> None:
    pass


def _export(
    spec: JobSpec,
    model_dir: Path,
    adapter_dir: Path,
    prompts: list[str],
    output: Storage,
    work_dir: Path,
    peaks: _MemoryPeaks,
    stop: Callable[[], None],
) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    started = time.monotonic()
    stop()
    withdraw(output)  # 1.
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ManifestError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (not a saved adapter)")
    trust = spec.model.trust_remote_code
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    refuse_quantized(config, spec.model.source)
    needs = merge_needs(spec, config)
    dtype, device = needs.dtype, _merge_device(needs)
    staging = work_dir / MERGED_DIR
    shutil.rmtree(staging, ignore_errors=True)
    seconds: dict[str, float] = {}
    # 2. base + adapter, unmerged: the reference, and how far the adapter moves the base.
    # The adapter's tokenizer when it saved one: it carries the chat template trained with.
    saved = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model_dir
    tokenizer = AutoTokenizer.from_pretrained(saved, trust_remote_code=trust)
    inputs = _tokenize(tokenizer, prompts, spec.export.verify_prompts)
    trained = spec.export.base == "trained"
    base = _load(model_dir, spec, dtype, device, quantized=trained)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    seconds["load"] = _lap(started, seconds)
    stop()
    reference = _logits(model, inputs)
    with model.disable_adapter():
        adapter_effect = compare_logits(reference, _logits(model, inputs))
    seconds["reference"] = _lap(started, seconds)
    stop()
    if trained:  # the same weights, dequantized: a merge never goes into 4-bit weights
        del model, base
        gc.collect()
        model = PeftModel.from_pretrained(_dequantized(model_dir, spec, dtype, device), adapter_dir)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # safe_merge found a non-finite merged weight
        raise ExportMismatch(f"merging the adapter into {spec.model.source}: {err}") from None
    merged.save_pretrained(staging, max_shard_size=spec.export.max_shard_size)
    tokenizer.save_pretrained(staging)  # the model's save wrote generation_config.json
    del merged, model
    gc.collect()
    seconds["merge_and_save"] = _lap(started, seconds)
    log.info("export_merged", dtype=dtype, device=device, seconds=seconds)
    stop()
    # The files as a user loads them, not the merged model in memory: what is compared is
    # what will be published.
    agreement = compare_logits(reference, _logits(_load(staging, spec, dtype, device), inputs))
    gc.collect()
    seconds["verify"] = _lap(started, seconds)
    stop()
    tolerance = TOLERANCES[dtype]
    verification = {
        "metric": "KL(base + adapter || merged), nats a token, over each prompt's first "
        f"{VERIFY_TOKENS_PER_PROMPT} tokens",
        "prompts": len(inputs),
        **asdict(agreement),
        "tolerance": asdict(tolerance),
        "adapter_effect_mean_kl": adapter_effect.mean_kl,
        "adapter_effect_max_kl": adapter_effect.max_kl,
        "passed": agreement.mean_kl <= tolerance.mean_kl and agreement.max_kl <= tolerance.max_kl,
        # The merge's rounding moves the model more than the adapter does: fp32 would keep it.
        "rounding_exceeds_adapter": adapter_effect.mean_kl < agreement.mean_kl,
    }
    if not verification["passed"]:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportMismatch(
            f"the merged {dtype} model does not match base + adapter on {len(inputs)} prompts: "
            f"mean KL {agreement.mean_kl:.3g} (tolerance {tolerance.mean_kl:g}), max KL "
            f"{agreement.max_kl:.3g} (tolerance {tolerance.max_kl:g}), top-1 agreement "
            f"{agreement.top1_agreement:.1%}; nothing was published under {MERGED_DIR}/"
        )
    staged = sorted(p for p in staging.rglob("*") if p.is_file())
    files: list[dict[str, Any]] = [
        {"key": p.relative_to(staging).as_posix(), "bytes": p.stat().st_size}
        | {"sha256": sha256_file(p)}
        for p in staged
    ]
    record = {
        "uri": uri_join(output.uri, MERGED_DIR),
        "dtype": dtype,
        "device": device,
        "base": {"source": spec.model.source, "revision": spec.model.revision},
        "adapter_sha256": sha256_file(adapter_dir / ADAPTER_WEIGHTS),
        "verification": verification,
        # What a cgroup's OOM killer counts: the base's safetensors mapped from the page
        # cache are in the resident peak too, and the kernel reclaims them under a limit.
        "peak_anonymous_memory_bytes": peaks.anonymous,
        "peak_host_memory_bytes": peaks.resident,
        "estimated_host_memory_bytes": needs.memory_bytes,
        "files": files,
        "versions": library_versions(),
        "seconds": seconds,
    }
    # 3. The new files, EXPORT.json last.
    for entry in files:
        stop()
        output.upload_file(staging / entry["key"], f"{MERGED_DIR}/{entry['key']}")
    seconds["upload"] = _lap(started, seconds)
    seconds["total"] = round(time.monotonic() - started, 3)
    output.write_bytes(EXPORT_RECORD, record_bytes(record))
    shutil.rmtree(staging, ignore_errors=True)
    log.info("export_published", uri=record["uri"], dtype=dtype, seconds=seconds, **verification)
    return record


def withdraw(output: Storage) -> None:
    """Take down merged/: EXPORT.json first (a reader trusts the files only while it vouches
    for them), then every file, so no model stays there that does not belong to the adapter
    beside it."""
    if output.head(EXPORT_RECORD) is not None:
        output.delete([EXPORT_RECORD])
    stale = [o.key for o in output.list_objects(f"{MERGED_DIR}/")]
    stale = [key for key in stale if key.startswith(f"{MERGED_DIR}/")]
    if stale:
        output.delete(stale)
        log.info("export_withdrawn", uri=uri_join(output.uri, MERGED_DIR), files=len(stale))


def _merge_device(needs: MergeNeeds) -> str:
    """A GPU with room now (a 7B forward takes minutes on CPU), else the pre-flight's CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what training freed, back from the allocator's cache
        free, _ = torch.cuda.mem_get_info()
        if free > needs.memory_bytes - RUNTIME_BYTES:
            return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _load(path: Path, spec: JobSpec, dtype: str, device: str, *, quantized: bool = False) -> Any:
    """The base as stored, or (``quantized``) as training saw it: spec.quantization's 4-bit
    weights computing in ``dtype``. transformers 5 loads without a second host copy."""
    from transformers import AutoModelForCausalLM

    if quantized:
        from service.model import Device, load_quantized_model

        kind = "cuda" if device.startswith("cuda") else "cpu"
        where = Device(kind, device)
        return load_quantized_model(path, spec.model, spec.quantization, dtype, where).eval()
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype(dtype),
        device_map={"": device},
        trust_remote_code=spec.model.trust_remote_code,
        use_safetensors=True,
    ).eval()


def _dequantized(path: Path, spec: JobSpec, dtype: str, device: str) -> Any:
    """The quantized base's weights in ``dtype``, as plain layers, saved without a trace of
    the quantization (a loader would otherwise quantize them again)."""
    model = _load(path, spec, dtype, device, quantized=True)
    model.dequantize(dtype=torch_dtype(dtype))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _tokenize(tokenizer: Any, prompts: list[str], n: int) -> list[torch.Tensor]:
    """One unpadded sequence a prompt: nothing for masks to differ on."""
    texts = [p for p in prompts if p.strip()][:n]
    if not texts:
        log.info("export_generic_prompts", reason="no prompts given")
        texts = list(GENERIC_PROMPTS[:n])
    encoded = [
        tokenizer(t, return_tensors="pt", truncation=True, max_length=VERIFY_TOKENS_PER_PROMPT)
        for t in texts
    ]
    return [e["input_ids"] for e in encoded if e["input_ids"].shape[1] > 0]


def _logits(model: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids.to(model.device)).logits[0].float().cpu() for ids in inputs]


class _MemoryPeaks:
    """The process's peak resident and anonymous memory while the export runs, read from
    /proc/self/status every 20 ms on a thread (0 where there is none). A 7B merged into the
    trained base on CPU: 32.1 GiB resident, 18.4 GiB of it anonymous, 13.9 the base's files
    mapped from the page cache."""

    def __init__(self) -> None:
        self.resident = self.anonymous = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="export-memory", daemon=True)

    def __enter__(self) -> _MemoryPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while True:
            try:
                status = Path("/proc/self/status").read_text().splitlines()
            except OSError:
                return
            kib = {x.split(":")[0]: int(x.split()[1]) for x in status if x.startswith("Rss")}
            self.resident = max(self.resident, 1024 * sum(kib.values()))  # anon, file, shmem
            self.anonymous = max(self.anonymous, 1024 * kib.get("RssAnon", 0))
            if self._done.wait(0.02):
                return


def _lap(started: float, seconds: dict[str, float]) -> float:  # less those counted already
    return round(time.monotonic() - started - sum(seconds.values()), 3)
