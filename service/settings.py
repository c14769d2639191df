"""Process settings: where the job comes from and how this process runs it.

These belong to the environment (the pod, the shell), not to the job, so they
are read from ``SPOTLORA_*`` variables and never written into run records.
Cloud credentials are not here at all: boto3 reads them from its own standard
chain (environment, profile, IRSA/Pod Identity, instance role), and the S3
endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPOTLORA_", extra="ignore")

    manifest: str | None = Field(default=None, description="Inline manifest (YAML or JSON).")
    manifest_uri: str | None = Field(default=None, description="Path or s3:// URI of a manifest.")
    run_id: str | None = Field(
        default=None,
        description="Run identity: stable across pod restarts of one Job (the Job's uid), new for "
        "a new Job. Defaults to the manifest's metadata.name, so rerunning it resumes.",
    )
    pod_name: str | None = Field(default=None, description="This attempt's pod, for logs.")
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "spotlora",
        description="Local cache for downloaded models and data, and the checkpoint staging area.",
    )
    log_format: str = Field(default="auto", description="auto, json or console.")
    log_level: str = Field(default="INFO", description="Log level.")
    hf_token: SecretStr | None = Field(
        default=None, alias="HF_TOKEN", description="Hub token for gated models."
    )
