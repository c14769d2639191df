"""What a job will train, without loading its weights: the model's shape from config.json,
and its training sequences tokenized by the same trl code a run uses, from the tokenizer
files alone."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from service.errors import DataError, DependencyError, ManifestError
from service.estimate.throughput import Shape
from service.fetch import MODEL_FILE_SUFFIXES
from service.manifest.spec import JobSpec, ModelSpec
from service.model import load_tokenizer
from service.storage import S3Storage, split_s3_uri

log = structlog.get_logger(__name__)


def model_shape(config: Any) -> Shape:
    """Parameters counted on the meta device (no memory, no weights), as in
    service.memory.preflight_estimate."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        vocab=text.vocab_size,
    )


def fetch_tokenizer(spec: ModelSpec, hf_token: str | None, work_dir: Path) -> Any:
    """The tokenizer alone: a local model directory as it is; from S3 every file but the
    weights; from the Hub the tokenizer's own files."""
    if spec.source.startswith("s3://"):
        bucket, prefix = split_s3_uri(spec.source.rstrip("/") + "/")
        store = S3Storage(f"s3://{bucket}/{prefix}")
        wanted = [
            o.key
            for o in store.list_objects()
            if o.key.endswith(MODEL_FILE_SUFFIXES) and not o.key.endswith(".safetensors")
        ]
        if not wanted:
            raise ManifestError(f"spec.model.source: {spec.source}: no tokenizer files")
        for key in wanted:
            store.download_file(key, work_dir / key)
        return load_tokenizer(work_dir, spec.trust_remote_code)
    local = Path(spec.source).expanduser()
    if local.is_dir():
        return load_tokenizer(local, spec.trust_remote_code)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.source,
            revision=spec.revision,
            token=hf_token,
            trust_remote_code=spec.trust_remote_code,
        )
    except Exception as err:  # the hub client raises many types; all mean "not reachable"
        raise DependencyError(
            f"spec.model.source: {spec.source}: {type(err).__name__}: {err}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _Preparer:
    """What trl's SFTTrainer._prepare_dataset reads from its trainer, as SFTTrainer sets it
    for a run's arguments (no assistant-only loss, so no training chat template)."""

    def __init__(self, tokenizer: Any, completion_only_loss: bool | None, sample: dict[str, Any]):
        self._tokenizer = tokenizer
        self.chat_template = None
        if completion_only_loss is None:
            completion_only_loss = "prompt" in sample and "completion" in sample
        self.completion_only_loss = completion_only_loss


def sequence_lengths(spec: JobSpec, tokenizer: Any, rows: list[dict[str, Any]]) -> list[int]:
    """The length of every training sequence a run makes of these rows: trl's own
    tokenization and truncation (service.trainer passes the rows to SFTTrainer, which calls
    this same method), then the run's packing."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from service.trainer import pack_rows

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_length=spec.data.max_length,
            packing=False,
            completion_only_loss=spec.data.loss_on_completion_only,
            use_cpu=True,
            report_to="none",
            dataset_num_proc=None,
        )
    preparer = _Preparer(tokenizer, args.completion_only_loss, rows[0])
    dataset = datasets.Dataset.from_list(rows)
    prepare = SFTTrainer._prepare_dataset
    prepared = prepare(preparer, dataset, tokenizer, args, False, None, "train")  # type: ignore[arg-type]
    if len(prepared) == 0:
        raise DataError(
            f"{spec.data.train}: no row has any response token within data.max_length="
            f"{spec.data.max_length}; raise max_length or shorten the prompts"
        )
    if spec.data.packing:
        prepared = pack_rows(prepared, spec.data.max_length)
    return [len(ids) for ids in prepared["input_ids"]]


@dataclass(frozen=True)
class Tokens:
    """A job's training sequences, and what a run of it trains."""

    lengths: list[int]

    @property
    def per_epoch(self) -> int:
        return sum(self.lengths)

    @property
    def per_row(self) -> float:
        return self.per_epoch / max(len(self.lengths), 1)

    def trained(
        self, spec: JobSpec, micro_batch: int, accumulation: int, world_size: int = 1
    ) -> tuple[int, int]:
        """(tokens, optimizer steps) of a whole run. Exact for whole epochs; with max_steps
        or a fraction of an epoch, the steps beyond whole epochs count mean rows."""
        batches = math.ceil(len(self.lengths) / (micro_batch * world_size))
        steps_per_epoch = max(math.ceil(batches / accumulation), 1)
        t = spec.training
        steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
        whole, rest = divmod(steps, steps_per_epoch)
        rows = rest * micro_batch * accumulation * world_size
        partial = min(rows, len(self.lengths)) * self.per_row
        return int(whole * self.per_epoch + round(partial)), steps


def shape_and_tokens(spec: JobSpec, rows: list[dict[str, Any]], hf_token: str | None) -> Any:
    """The model's shape and the job's sequences, from config and tokenizer only."""
    from service.fetch import fetch_config

    config = fetch_config(spec.model, hf_token)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fetch_tokenizer(spec.model, hf_token, Path(tmp))
    return model_shape(config), Tokens(sequence_lengths(spec, tokenizer, rows)), config
