"""How a job runs, beside what it trains: checkpoints, what may stop it, metrics, costs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from service.manifest.base import Strict, refuse_credentials
from service.uris import check_http_url, check_storage_uri


class CheckpointSpec(Strict):
    uri: str | None = Field(
        default=None,
        description="Where checkpoints go (local dir or s3://); default <output.uri>/checkpoints/.",
    )
    every_steps: int | None = Field(
        default=50, ge=1, description="Commit a checkpoint every N optimizer steps."
    )
    every_seconds: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        default="auto",
        description="Commit a checkpoint at least this often (wall clock). 'auto': the interval "
        "that minimises expected lost work plus checkpoint time, sqrt(2 x blocking cost of a "
        "save x mean time between interruptions), from this run's measured saves and the "
        "interruptions in this job's ledger (a prior of one in six hours before any), within "
        "30 s and 1 h.",
    )
    keep: int = Field(default=2, ge=1, description="Committed checkpoints to keep per run.")
    grace_period_seconds: float = Field(
        default=15,
        gt=0,
        allow_inf_nan=False,
        le=3600,
        description="Seconds the platform allows between SIGTERM and SIGKILL; the final checkpoint "
        "must be committed within it. Keep terminationGracePeriodSeconds at least this.",
    )
    resume_from: str | None = Field(
        default=None,
        description="Start from another run's committed checkpoints: the URI of its checkpoint "
        "prefix (the folder holding LATEST), instead of this run's own.",
    )

    @field_validator("uri", "resume_from")
    @classmethod
    def checkpoint_uris_are_paths_or_s3(cls, value: str | None) -> str | None:
        return None if value is None else check_storage_uri(value)


class PreemptionSpec(Strict):
    spot_notice: Literal["none", "aws", "gce"] = Field(
        default="none", description="Poll this cloud's metadata server for a spot interruption."
    )
    poll_interval_seconds: float = Field(
        default=5, gt=0, description="How often to poll the metadata server."
    )
    aws_metadata_endpoint: str = Field(
        default="http://169.254.169.254", description="AWS IMDS base URL (IMDSv2)."
    )
    gce_metadata_endpoint: str = Field(
        default="http://metadata.google.internal", description="GCE metadata server base URL."
    )
    max_runtime_seconds: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Checkpoint and exit 75 after this long, leaving the rest to the next pod.",
    )

    @field_validator("aws_metadata_endpoint", "gce_metadata_endpoint")
    @classmethod
    def metadata_endpoints_are_http(cls, value: str) -> str:
        refuse_credentials(value, "a metadata server takes none")
        return check_http_url(value)


class MetricsSpec(Strict):
    port: int | None = Field(
        default=9090, ge=0, le=65535, description="Port for /metrics; null disables the server."
    )
    pushgateway_url: str | None = Field(
        default=None,
        description="Prometheus Pushgateway (http:// or https://) to push to at phase changes "
        "and the end. No credentials in the URL: basic auth comes from the environment "
        "(SPOTLORA_PUSHGATEWAY_USERNAME and SPOTLORA_PUSHGATEWAY_PASSWORD or "
        "SPOTLORA_PUSHGATEWAY_PASSWORD_FILE).",
    )

    @field_validator("pushgateway_url")
    @classmethod
    def pushgateway_url_is_http_without_credentials(cls, value: str | None) -> str | None:
        """A password in the manifest would be logged and copied into run.json, and urllib
        would take ``user:password@host`` for the host name. The error must not echo it."""
        if value is None:
            return None
        refuse_credentials(
            value,
            "remove 'user:password@' and set SPOTLORA_PUSHGATEWAY_USERNAME and "
            "SPOTLORA_PUSHGATEWAY_PASSWORD (or SPOTLORA_PUSHGATEWAY_PASSWORD_FILE) instead",
        )
        return check_http_url(value)


class CostSpec(Strict):
    gpu_hour_usd: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="What one GPU-hour costs this job (the spot price), for the cost ledger in "
        "run.json. Default: SPOTLORA_GPU_HOUR_USD, else the price table "
        "(SPOTLORA_PRICE_TABLE) entry for the instance type.",
    )
    on_demand_gpu_hour_usd: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="The on-demand price of the same GPU-hour: what the run would have cost "
        "without spot.",
    )

    @model_validator(mode="after")
    def on_demand_price_needs_a_price(self) -> CostSpec:
        if self.on_demand_gpu_hour_usd is not None and self.gpu_hour_usd is None:
            raise ValueError("cost.on_demand_gpu_hour_usd needs cost.gpu_hour_usd too")
        return self
