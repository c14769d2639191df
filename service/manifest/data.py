"""The data section: where the rows are, their layout, and how they become sequences."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from service.chat_templates import TEMPLATES
from service.chat_templates import check as check_chat_template
from service.manifest.base import Strict
from service.uris import check_storage_uri

DataFormat = Literal["alpaca", "chat", "prompt_completion", "text"]


class DataSpec(Strict):
    train: str = Field(
        description="Training data: a local file or glob, an s3:// object or prefix/glob, or a "
        "directory written by datasets' save_to_disk. JSONL, JSON, Parquet or CSV."
    )
    eval: str | None = Field(default=None, description="Held-out data in the same forms as train.")
    format: DataFormat = Field(
        default="alpaca",
        description="Row layout: alpaca (instruction/input/output), chat (messages), "
        "prompt_completion (prompt/completion) or text (text).",
    )
    max_length: int = Field(
        default=512, ge=16, le=131072, description="Tokens per sequence; longer rows are truncated."
    )
    eval_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Share of train rows held out for evaluation, chosen by a hash of each row so "
        "the split does not drift as the data grows.",
    )
    packing: bool = Field(
        default=True,
        description="Pack several rows into each sequence of max_length tokens (best-fit "
        "decreasing), attention and positions kept within each row. No padding is computed, "
        "which is most of the speed on short rows.",
    )
    completion_only_loss: bool | None = Field(
        default=None,
        description="Train on the response only. Default: true for alpaca, chat and "
        "prompt_completion; not available for text.",
    )
    chat_template: str | None = Field(
        default=None,
        description="For format chat: the chat template to train with and save with the "
        "adapter, for a base model whose tokenizer has none (or to replace its own). A name "
        f"({', '.join(sorted(TEMPLATES))}) or a Jinja template.",
    )

    @field_validator("train", "eval")
    @classmethod
    def data_is_a_path_or_s3(cls, value: str | None) -> str | None:
        """Globs are fine (they are ordinary characters in an S3 key); '..' in a key is not."""
        return None if value is None else check_storage_uri(value)

    @model_validator(mode="after")
    def one_eval_source(self) -> DataSpec:
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("data.eval and data.eval_fraction are exclusive: give one of them")
        return self

    @model_validator(mode="after")
    def completion_loss_needs_a_prompt(self) -> DataSpec:
        if self.format == "text" and self.completion_only_loss:
            raise ValueError(
                "data.completion_only_loss needs a prompt/response split; format 'text' has none"
            )
        return self

    @field_validator("chat_template")
    @classmethod
    def chat_template_is_a_name_or_jinja(cls, value: str | None) -> str | None:
        return None if value is None else check_chat_template(value)

    @model_validator(mode="after")
    def chat_template_only_for_chat(self) -> DataSpec:
        if self.chat_template is not None and self.format != "chat":
            raise ValueError(
                f"data.chat_template applies to format 'chat' only, not {self.format!r}"
            )
        return self

    @property
    def loss_on_completion_only(self) -> bool:
        if self.completion_only_loss is None:
            return self.format != "text"
        return self.completion_only_loss
