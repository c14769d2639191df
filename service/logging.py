"""Logging, configured once by the entrypoint; every other module just logs.

structlog renders JSON lines (with tracebacks as dicts) when stderr is not a
terminal, as in a pod, and a readable console format on a terminal. The
standard library's records (transformers, peft, accelerate, botocore) are
routed through the same processors, so one pod's log is one format.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

# Keys whose values are never logged, whatever their content.
SECRET_KEY_PATTERN = re.compile(
    r"(^|[_-])(token|secret|password|passwd|credentials?|api_key|access_key|secret_key"
    r"|session_key|authorization)$",
    re.IGNORECASE,
)
# Values that look like credentials even under an innocent key.
SECRET_VALUE_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{20,}"),
    re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
]
REDACTED = "**redacted**"
NOISY_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "fsspec", "httpx")


# C0 and C1 control characters and DEL; tab stays.
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Control characters as visible escapes (\\n, \\x1b): for every line a person reads,
    where a newline or an ANSI sequence in a value could forge a line or repaint a terminal."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def _escape_values(logger: Any, name: str, event_dict: EventDict) -> EventDict:
    return {
        k: escape_controls(v) if isinstance(v, str) and k != "exception" else v
        for k, v in event_dict.items()
    }


def _redact_text(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    for pattern in SECRET_VALUE_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


class Redactor:
    """Drop secrets from every event: by key name, by known shapes, and by the exact
    values of secrets this process was given (so a token echoed in an error message
    by a library is caught too)."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self.secrets = tuple(s for s in secrets if len(s) >= 8)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return _redact_text(value, self.secrets)
        if isinstance(value, dict):
            return {
                k: REDACTED if SECRET_KEY_PATTERN.search(str(k)) else self._clean(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return value

    def __call__(self, logger: Any, name: str, event_dict: EventDict) -> EventDict:
        cleaned: EventDict = self._clean(event_dict)
        return cleaned


def configure_logging(
    fmt: str = "auto", level: str = "INFO", secrets: tuple[str, ...] = ()
) -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    final: list[Processor]
    if as_json:
        final = [
            # Locals stay out: they hold manifests, tensors and, potentially, credentials.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            Redactor(secrets),
            structlog.processors.JSONRenderer(),
        ]
    else:
        final = [Redactor(secrets), _escape_values, structlog.dev.ConsoleRenderer()]

    # The chain is changed in place: a logger cached on its first use holds this very list,
    # so a second configuration in one process (a program embedding the CLI, the tests) and
    # structlog's own capture_logs reach it too.
    processors = structlog.get_config()["processors"]
    processors[:] = [*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Deprecations inside the libraries we call are theirs to fix, not the user's to read.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6")
    logging.captureWarnings(True)


def route_library_logging(*, progress_bars: bool) -> None:
    """Send transformers' and datasets' records through the same chain. Called by a command
    that is about to use them (importing them costs seconds; `validate` never does).
    Progress bars are carriage-return spam in a pod's log: on a terminal only."""
    import datasets
    import transformers.utils.logging as hf_logging

    # transformers keeps its own handler and stops propagation; route it to ours.
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(logging.WARNING)
    if not progress_bars:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
