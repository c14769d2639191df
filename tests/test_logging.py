"""Secrets never reach a log line, whatever the key or the library that logs them."""

from __future__ import annotations

import io
import json
import logging

import structlog

from service.logging import REDACTED, Redactor, configure_logging


def test_redactor_by_key_value_shape_and_known_value() -> None:
    redact = Redactor(secrets=("s3cr3t-value-123",))
    event = {
        "event": "x",
        "aws_secret_access_key": "anything",
        "nested": {"Authorization": "Bearer abc", "ok": 1},
        "message": "token hf_" + "a" * 30 + " and key AKIAABCDEFGHIJKLMNOP",
        "echo": "the store said s3cr3t-value-123 was wrong",
        "hf_token": "x",
        "num_tokens": 1234,
        "mean_token_accuracy": 0.5,
    }
    out = redact(None, "info", event)
    assert out["aws_secret_access_key"] == REDACTED
    assert out["nested"] == {"Authorization": REDACTED, "ok": 1}
    assert "hf_" not in out["message"] and "AKIA" not in out["message"]
    assert "s3cr3t-value-123" not in out["echo"]
    assert out["hf_token"] == REDACTED
    # Training figures that merely mention tokens stay readable.
    assert out["num_tokens"] == 1234 and out["mean_token_accuracy"] == 0.5


def test_library_records_go_through_the_same_chain(capsys) -> None:  # type: ignore[no-untyped-def]
    configure_logging("json", "INFO", secrets=("hunter2-hunter2",))
    structlog.contextvars.bind_contextvars(job="j1")
    try:
        logging.getLogger("botocore.credentials").warning("found key hunter2-hunter2")
        structlog.get_logger("spotlora").info("hello", password="pw")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    assert [entry["event"] for entry in lines] == [f"found key {REDACTED}", "hello"]
    assert all(entry["job"] == "j1" for entry in lines)
    assert lines[1]["password"] == REDACTED
    assert "hunter2" not in io.StringIO(str(lines)).getvalue()


def test_a_second_configuration_reaches_loggers_cached_under_the_first() -> None:
    """Loggers are cached on first use; a process that configures logging again (a program
    embedding the CLI, tests calling it in turn) must still reach them, and so must
    structlog's capture_logs, which edits the configured chain in place."""
    from structlog.testing import capture_logs

    configure_logging("json", "INFO")
    logger = structlog.get_logger("spotlora.cached")
    logger.info("first")  # cached from here on
    configure_logging("json", "INFO")
    with capture_logs() as logs:
        logger.info("second")
    assert [entry["event"] for entry in logs] == ["second"]
