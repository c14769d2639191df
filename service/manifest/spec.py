"""The FineTuneJob manifest: one typed tree, split by domain.

Every model forbids unknown keys, so a typo is an error instead of a silent
default, and every field carries a description so the exported JSON Schema
documents the format. Nothing here imports torch or touches the network:
validation must be cheap and must happen before any of that.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from service.manifest.base import SECRET_ERROR_TYPES, Strict
from service.manifest.data import DataSpec
from service.manifest.results import EvaluationSpec, ExportSpec, TrackingSpec
from service.manifest.running import CheckpointSpec, CostSpec, MetricsSpec, PreemptionSpec
from service.uris import check_model_source, check_storage_uri

__all__ = [
    "SECRET_ERROR_TYPES",
    "CheckpointSpec",
    "CostSpec",
    "DataSpec",
    "EvaluationSpec",
    "ExportSpec",
    "FineTuneJob",
    "JobSpec",
    "LoraSpec",
    "MetricsSpec",
    "ModelSpec",
    "PreemptionSpec",
    "QuantizationSpec",
    "TrackingSpec",
]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Metadata(Strict):
    name: str = Field(
        description="DNS-1123 label (lower-case letters, digits, '-', at most 63 characters). "
        "Names the run, its storage prefix and its metrics."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Free-form labels copied into run.json."
    )

    @field_validator("name")
    @classmethod
    def name_is_dns1123_label(cls, value: str) -> str:
        if len(value) > 63 or not DNS1123_LABEL.match(value):
            raise ValueError(
                f"{value!r} is not a DNS-1123 label: use at most 63 lower-case letters, "
                "digits and '-', starting and ending with a letter or digit"
            )
        return value


class ModelSpec(Strict):
    source: str = Field(
        description="Base model: a local directory, an s3://bucket/prefix/ holding a saved "
        "model (downloaded once to the local cache), or a Hugging Face Hub id."
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) to pin; only for Hub ids.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run Python code shipped with the model. Off unless you trust the source.",
    )

    @field_validator("source")
    @classmethod
    def source_is_a_directory_s3_or_hub_id(cls, value: str) -> str:
        return check_model_source(value)

    @model_validator(mode="after")
    def revision_only_for_hub_ids(self) -> ModelSpec:
        if self.revision is not None and (
            self.source.startswith("s3://") or self.source.startswith(("/", "./", "../", "~"))
        ):
            raise ValueError("model.revision applies to Hub ids only, not to paths or s3:// URIs")
        return self


ComputeDtype = Literal["auto", "bf16", "fp16", "fp32"]
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}


class QuantizationSpec(Strict):
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="4-bit data type of the frozen base weights."
    )
    double_quant: bool = Field(
        default=True, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: ComputeDtype = Field(
        default="auto",
        description="Matmul dtype. 'auto': bf16 on compute capability >= 8.0, fp16 on older GPUs "
        "such as the T4, fp32 on CPU. bf16 on a GPU without native bf16 is an error.",
    )
    frozen_dtype: Literal["compute", "fp32"] = Field(
        default="compute",
        description="dtype of the frozen weights that are not quantized (embeddings, norms, "
        "LM head), and so of the residual stream. 'compute': the compute dtype, as in fp16 "
        "inference. 'fp32': upcast them, as peft's prepare_model_for_kbit_training does; a "
        "slower step and more memory, for a model whose residual stream overflows fp16.",
    )

    @field_validator("compute_dtype", mode="before")
    @classmethod
    def accept_long_dtype_names(cls, value: object) -> object:
        return _DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


class LoraSpec(Strict):
    r: int = Field(default=8, gt=0, le=1024, description="LoRA rank.")
    alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale = alpha/r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        default="auto",
        description="Module names to adapt, 'all-linear', or 'auto': the attention projections "
        "the architecture has (q_proj, k_proj, v_proj, o_proj on Llama, Mistral, Qwen, Gemma; "
        "qkv_proj, o_proj on Phi-3). A name that matches no layer of the model is an error.",
    )

    @field_validator("target_modules")
    @classmethod
    def target_modules_not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("lora.target_modules must name at least one module")
        return value


# Only optimizers whose state restores exactly on resume: bitsandbytes' paged and 8-bit
# optimizers have crashed on resume (bitsandbytes#782, #1381), and resuming is the product.
Optimizer = Literal["adamw_torch", "adamw_torch_fused"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


class TrainingSpec(Strict):
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="Sequences per device per micro-batch (packed sequences of data.max_length "
        "tokens when packing). 'auto': the largest that fits the GPU's memory, from an estimate "
        "made before training; 4 on CPU.",
    )
    gradient_accumulation: int = Field(
        default=1, ge=1, description="Micro-batches per optimizer step."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Scheduler = Field(default="linear", description="Learning-rate schedule.")
    warmup_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="Share of steps spent warming up."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Optimizer = Field(default="adamw_torch", description="transformers' name.")
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations.")
    torch_compile: bool = Field(
        default=False,
        description="Compile each decoder layer with torch.compile, fusing the elementwise work "
        "around the 4-bit matmuls (+17% tokens/s on a 7B shape, docs/performance.md) for "
        "about 10 s of compiling at each start. Needs a GPU of compute capability >= 8.0 "
        "(Triton no longer supports a T4) and a C compiler, which the image does not ship.",
    )
    fused_kernels: Literal["auto", "off", "require"] = Field(
        default="auto",
        description="Fused kernels (docs/performance.md), each probed against the code it "
        "replaces, undone after training and listed in run.json's `kernels`. 'auto': those "
        "that pass; 'off': none; 'require': fail at load (exit 2) if any falls back.",
    )
    offload_activations: bool = Field(
        default=False,
        description="Hold the checkpointed layers' inputs in pinned host memory between the "
        "forward and the backward: a larger micro-batch in the same GPU memory (+10% tokens/s "
        "at 6.2 GiB on a 7B shape, docs/performance.md), for host memory of layers x hidden "
        "x 2 bytes per token of a micro-batch (0.125 GiB per 512-token row on a 7B). Needs "
        "gradient_checkpointing.",
    )
    logging_steps: int = Field(default=10, ge=1, description="Optimizer steps between log lines.")
    eval_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps (default: at the end only)."
    )
    seed: int = Field(default=42, ge=0, description="Seed for initialisation, dropout and order.")

    @model_validator(mode="after")
    def offload_needs_checkpointing(self) -> TrainingSpec:
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError(
                "training.offload_activations moves the checkpointed layers' inputs to host "
                "memory; without training.gradient_checkpointing every activation would cross "
                "PCIe twice a step: turn checkpointing on or offload off"
            )
        return self


class OutputSpec(Strict):
    uri: str = Field(description="Where the adapter and run.json go: a local dir or s3://.")
    per_run: bool = Field(
        default=False,
        description="Keep every run: outputs under runs/<run id>/, an append-only run index "
        "under index/, and a PUBLISHED pointer to the promoted run (for scheduled retraining). "
        "Off: adapter/ and run.json directly under the URI.",
    )

    @field_validator("uri")
    @classmethod
    def output_uri_is_a_path_or_s3(cls, value: str) -> str:
        return check_storage_uri(value)


class PromotionSpec(Strict):
    skip_if_unchanged: bool = Field(
        default=True,
        description="Exit 0 without loading the model when the data and the training-relevant "
        "manifest fields equal those of the last successful run.",
    )
    warm_start: bool = Field(
        default=False, description="Start from the published adapter instead of from scratch."
    )
    max_eval_loss_increase: float = Field(
        default=0.0,
        ge=0,
        description="Publish only if eval loss is at most this much above the published "
        "adapter's, both measured on this run's eval data.",
    )
    keep_runs: int | None = Field(
        default=None,
        ge=1,
        description="Delete outputs and checkpoints of all but the newest N runs (the published "
        "one is always kept). Null keeps everything.",
    )
    metric: Literal["eval_loss", "exact_match", "contains", "regex"] = Field(
        default="eval_loss",
        description="What the gate compares: eval loss (lower is better, within "
        "max_eval_loss_increase) or one of evaluation.metrics (higher is better, within "
        "max_metric_decrease), both measured on this run's eval data for this run and the "
        "published adapter.",
    )
    max_metric_decrease: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="With a task metric: publish only if it is at most this much below the "
        "published adapter's.",
    )


class JobSpec(Strict):
    model: ModelSpec = Field(description="The base model to adapt.")
    quantization: QuantizationSpec = Field(
        default_factory=QuantizationSpec, description="How the frozen base is quantized."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="The trained adapters.")
    data: DataSpec = Field(description="Training and evaluation data.")
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Optimization schedule."
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Preemption-safe checkpoints."
    )
    preemption: PreemptionSpec = Field(
        default_factory=PreemptionSpec, description="What else may stop the run early."
    )
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Prometheus metrics.")
    output: OutputSpec = Field(description="Where results are published.")
    promotion: PromotionSpec = Field(
        default_factory=PromotionSpec,
        description="Scheduled retraining: skipping, warm starts, gating and retention. "
        "Applies when output.per_run is on.",
    )
    cost: CostSpec = Field(
        default_factory=CostSpec, description="GPU prices for the run's cost ledger."
    )
    export: ExportSpec = Field(
        default_factory=ExportSpec, description="A merged model to serve, besides the adapter."
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec,
        description="Generation samples and task metrics, before and after training.",
    )
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment trackers to report to."
    )

    @model_validator(mode="after")
    def evaluation_needs_eval_rows(self) -> JobSpec:
        ev, data = self.evaluation, self.data
        wants_rows = bool(ev.metrics) or (ev.samples > 0 and not ev.prompts)
        if wants_rows and data.eval is None and data.eval_fraction == 0:
            raise ValueError(
                "evaluation.metrics and evaluation.samples (without evaluation.prompts) use "
                "held-out rows: set data.eval or data.eval_fraction"
            )
        if wants_rows and data.format == "text":
            raise ValueError(
                "evaluation needs a prompt and a reference response per row; format 'text' has "
                "none (give evaluation.prompts for samples)"
            )
        return self

    @model_validator(mode="after")
    def promotion_metric_is_computed(self) -> JobSpec:
        metric = self.promotion.metric
        if metric != "eval_loss" and metric not in self.evaluation.metrics:
            raise ValueError(
                f"promotion.metric {metric!r} must be one of evaluation.metrics, which is "
                f"{self.evaluation.metrics or 'empty'}"
            )
        return self

    @model_validator(mode="after")
    def warm_start_needs_per_run_outputs(self) -> JobSpec:
        if self.promotion.warm_start and not self.output.per_run:
            raise ValueError(
                "promotion.warm_start starts from the published adapter, which exists only "
                "with output.per_run: true"
            )
        return self

    @model_validator(mode="after")
    def eval_steps_need_eval_data(self) -> JobSpec:
        if (
            self.training.eval_steps is not None
            and self.data.eval is None
            and self.data.eval_fraction == 0
        ):
            raise ValueError(
                "training.eval_steps needs eval data: set data.eval or data.eval_fraction"
            )
        return self


class FineTuneJob(Strict):
    api_version: Annotated[Literal["spotlora/v1"], Field(alias="apiVersion")] = Field(
        description="Manifest format version."
    )
    kind: Literal["FineTuneJob"] = Field(description="Manifest kind.")
    metadata: Metadata = Field(description="Identity of the job.")
    spec: JobSpec = Field(description="What to train, on what, and where results go.")
