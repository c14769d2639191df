"""What a run gives beyond the adapter: a merged model to serve, what the model now generates
and how it scores, and the experiment trackers it reports to."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from service.manifest.base import Strict, refuse_credentials
from service.uris import check_http_url, check_storage_uri


class ExportSpec(Strict):
    merged: bool = Field(
        default=False,
        description="Also publish the base model merged with the adapter under "
        "<output>/merged/ (safetensors shards, tokenizer, generation config; the layout "
        "AutoModelForCausalLM.from_pretrained and vLLM load), merged in 16-bit or fp32 (never "
        "into 4-bit weights) and checked against base + adapter before it is published. Host "
        "memory and disk for it are checked before training starts.",
    )
    base: Literal["trained", "original"] = Field(
        default="trained",
        description="The weights the adapter is merged into. 'trained': the base as training "
        "saw it, quantized as spec.quantization says and dequantized to the export dtype, so "
        "the merged model answers as base + adapter did in training. 'original': the base's "
        "original-precision weights, which the adapter was not trained on (SmolLM2-135M: 66% "
        "held-out exact match merged this way, against the adapter's 100%).",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="dtype of the merged weights. 'auto': the base model's own (config.json "
        "torch_dtype), else bf16.",
    )
    max_shard_size: str = Field(
        default="5GB", pattern=r"^\d+(KB|MB|GB)$", description="Largest safetensors shard."
    )
    verify_prompts: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Held-out prompts (from the eval split, else the training data) on which "
        "the merged model's logits are compared with base + adapter before publishing.",
    )


TaskMetric = Literal["exact_match", "contains", "regex"]


class EvaluationSpec(Strict):
    samples: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Held-out prompts to generate for, greedily, before and after training: "
        "taken from the eval split unless `prompts` names them. Recorded in run.json and shown "
        "side by side in the run report. 0: none.",
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts to generate for instead of eval rows (as the model sees them: "
        "for alpaca data, the instruction text; the row template is applied).",
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=4096, description="Token cap for each generated sample."
    )
    metrics: list[TaskMetric] = Field(
        default_factory=list,
        description="Task metrics on the eval split, after training (and before, with "
        "samples): exact_match (the generated response equals the reference, whitespace "
        "trimmed), contains (the reference appears in the response), regex (the response "
        "matches `pattern`). In run.json and as metrics.",
    )
    pattern: str | None = Field(
        default=None,
        description="Regular expression for the regex metric; `{reference}` in it stands for "
        "the reference response, escaped.",
    )
    max_rows: int = Field(
        default=64, ge=1, le=10_000, description="Eval rows the task metrics are computed on."
    )

    @field_validator("pattern")
    @classmethod
    def pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value.replace("{reference}", "reference"))
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return value

    @model_validator(mode="after")
    def regex_metric_needs_a_pattern(self) -> EvaluationSpec:
        if "regex" in self.metrics and not self.pattern:
            raise ValueError("evaluation.metrics 'regex' needs evaluation.pattern")
        return self


class TrackingSpec(Strict):
    tensorboard: bool = Field(
        default=False,
        description="Write TensorBoard event files under <output>/tensorboard/.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="Report to MLflow at this tracking URI (http(s):// or a local file store "
        "path). Credentials come from MLflow's own environment variables "
        "(MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN), never from the manifest.",
    )
    mlflow_experiment: str | None = Field(
        default=None, description="MLflow experiment; default: the job's metadata.name."
    )
    wandb_project: str | None = Field(
        default=None,
        description="Report to Weights & Biases in this project. WANDB_API_KEY comes from the "
        "environment; WANDB_MODE=offline writes runs locally for a later `wandb sync`.",
    )

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def mlflow_uri_is_http_or_a_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith(("http://", "https://")):
            refuse_credentials(value, "set MLFLOW_TRACKING_USERNAME/PASSWORD instead")
            return check_http_url(value)
        return check_storage_uri(value.removeprefix("file://"))
