"""Process settings: where the job comes from and how this process runs it.

These belong to the environment (the pod, the shell), not to the job, so they
are read from ``SPOTLORA_*`` variables and never written into run records.
Cloud credentials are not here at all: boto3 reads them from its own standard
chain (environment, profile, IRSA/Pod Identity, instance role), and the S3
endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``. The Pushgateway's
basic-auth credentials are, because nothing else would read them: a password in
the manifest's URL would be logged and copied into run.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.uris import check_key_segment

# A Kubernetes Secret file is a few bytes; more is a wrong mount, not a password.
MAX_PASSWORD_FILE_BYTES = 4096
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class RuntimeSettings(BaseSettings):
    # Errors never repeat the input: for a rule across fields that is every setting, secrets too.
    model_config = SettingsConfigDict(
        env_prefix="SPOTLORA_", extra="ignore", hide_input_in_errors=True
    )

    manifest: str | None = Field(default=None, description="Inline manifest (YAML or JSON).")
    manifest_uri: str | None = Field(default=None, description="Path or s3:// URI of a manifest.")
    run_id: str | None = Field(
        default=None,
        description="Run identity: stable across pod restarts of one Job (the Job's uid), new for "
        "a new Job. Defaults to the manifest's metadata.name, so rerunning it resumes.",
    )
    pod_name: str | None = Field(default=None, description="This attempt's pod, for logs.")
    node_name: str | None = Field(
        default=None, description="The node this attempt runs on (downward API spec.nodeName)."
    )
    instance_type: str | None = Field(
        default=None,
        description="The node's instance type, for the price table; default: asked of the "
        "cloud's metadata server when preemption.spot_notice names the cloud.",
    )
    price_table: Path | None = Field(
        default=None,
        description="YAML or JSON file of '<instance type>: {spot_hour_usd, on_demand_hour_usd, "
        "gpus}' (the k8s overlays mount one from a ConfigMap).",
    )
    gpu_hour_usd: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Price of a GPU-hour, when the manifest names none.",
    )
    on_demand_gpu_hour_usd: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="On-demand price of the same GPU-hour."
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "spotlora",
        description="Local cache for downloaded models and data, and the checkpoint staging area.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="json, console, or auto: console on a terminal, else json."
    )
    log_level: str = Field(
        default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."
    )
    hf_token: SecretStr | None = Field(
        default=None, alias="HF_TOKEN", description="Hub token for gated models."
    )
    pushgateway_username: str | None = Field(
        default=None, description="Basic-auth user for spec.metrics.pushgateway_url."
    )
    pushgateway_password: SecretStr | None = Field(
        default=None,
        description="Basic-auth password for the Pushgateway; or give pushgateway_password_file.",
    )
    pushgateway_password_file: Path | None = Field(
        default=None,
        description="File holding the Pushgateway password (a mounted Kubernetes Secret); one "
        "trailing newline is ignored. Read once, at start.",
    )

    @field_validator("run_id")
    @classmethod
    def run_id_is_one_path_segment(cls, value: str | None) -> str | None:
        """The run id names a storage prefix and a cache directory: '../x' would escape both."""
        if value is None:
            return None
        try:
            return check_key_segment(value)
        except ValueError as err:
            raise ValueError(f"SPOTLORA_RUN_ID {err}") from None

    @field_validator("log_level")
    @classmethod
    def log_level_is_a_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"SPOTLORA_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @model_validator(mode="after")
    def pushgateway_credentials_are_complete(self) -> RuntimeSettings:
        """A username with no password (or the reverse) is a half-mounted Secret: say so at
        start, rather than as a 401 on every push of the run."""
        if self.pushgateway_password is not None and self.pushgateway_password_file is not None:
            raise ValueError(
                "set SPOTLORA_PUSHGATEWAY_PASSWORD or SPOTLORA_PUSHGATEWAY_PASSWORD_FILE, not both"
            )
        if self.pushgateway_password_file is not None:
            self.pushgateway_password = SecretStr(_read_secret(self.pushgateway_password_file))
            self.pushgateway_password_file = None
        if (self.pushgateway_username is None) != (self.pushgateway_password is None):
            raise ValueError(
                "Pushgateway basic auth needs both SPOTLORA_PUSHGATEWAY_USERNAME and "
                "SPOTLORA_PUSHGATEWAY_PASSWORD (or SPOTLORA_PUSHGATEWAY_PASSWORD_FILE)"
            )
        return self

    @property
    def pushgateway_auth(self) -> tuple[str, str] | None:
        """(username, password) for JobMetrics, or None without credentials."""
        if self.pushgateway_username is None or self.pushgateway_password is None:
            return None
        return self.pushgateway_username, self.pushgateway_password.get_secret_value()


def _read_secret(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as err:
        raise ValueError(
            f"SPOTLORA_PUSHGATEWAY_PASSWORD_FILE {str(path)!r}: {err.strerror or err}"
        ) from None
    if len(data) > MAX_PASSWORD_FILE_BYTES:
        raise ValueError(
            f"SPOTLORA_PUSHGATEWAY_PASSWORD_FILE {str(path)!r}: larger than "
            f"{MAX_PASSWORD_FILE_BYTES} bytes; is it the right file?"
        )
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"SPOTLORA_PUSHGATEWAY_PASSWORD_FILE {str(path)!r}: not UTF-8") from None
    return text.removesuffix("\n").removesuffix("\r")


def describe(err: ValidationError) -> str:
    """One line a person reads: each problem with the variable it is about (pydantic's own
    text spans lines and names fields, not variables)."""
    problems = []
    for error in err.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        field = str(error["loc"][0]) if error["loc"] else ""
        name = field if field.isupper() else f"SPOTLORA_{field.upper()}"
        problems.append(message if not field or "SPOTLORA_" in message else f"{name}: {message}")
    return "; ".join(problems)
