"""Process settings from the environment: Pushgateway credentials and the run id."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import RuntimeSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "SPOTLORA_PUSHGATEWAY_USERNAME",
        "SPOTLORA_PUSHGATEWAY_PASSWORD",
        "SPOTLORA_PUSHGATEWAY_PASSWORD_FILE",
        "SPOTLORA_RUN_ID",
    ):
        monkeypatch.delenv(name, raising=False)


def test_no_pushgateway_credentials_by_default() -> None:
    assert RuntimeSettings().pushgateway_auth is None


def test_pushgateway_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTLORA_PUSHGATEWAY_USERNAME", "spotlora")
    monkeypatch.setenv("SPOTLORA_PUSHGATEWAY_PASSWORD", "hunter2")
    settings = RuntimeSettings()
    assert settings.pushgateway_auth == ("spotlora", "hunter2")
    assert "hunter2" not in repr(settings)


def test_pushgateway_password_from_a_mounted_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")  # `echo hunter2 > password`, as Secrets are often made
    monkeypatch.setenv("SPOTLORA_PUSHGATEWAY_USERNAME", "spotlora")
    monkeypatch.setenv("SPOTLORA_PUSHGATEWAY_PASSWORD_FILE", str(secret))
    assert RuntimeSettings().pushgateway_auth == ("spotlora", "hunter2")


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        RuntimeSettings()
    return str(info.value)


def test_pushgateway_credentials_are_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, SPOTLORA_PUSHGATEWAY_PASSWORD="hunter2")
    assert "Pushgateway basic auth needs both SPOTLORA_PUSHGATEWAY_USERNAME and" in message
    assert "hunter2" not in message  # a rule across fields would otherwise echo them all


def test_pushgateway_password_given_twice_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file")
    message = _error(
        monkeypatch,
        SPOTLORA_PUSHGATEWAY_USERNAME="spotlora",
        SPOTLORA_PUSHGATEWAY_PASSWORD="hunter2",
        SPOTLORA_PUSHGATEWAY_PASSWORD_FILE=str(secret),
    )
    assert "set SPOTLORA_PUSHGATEWAY_PASSWORD or SPOTLORA_PUSHGATEWAY_PASSWORD_FILE" in message
    assert "hunter2" not in message


def test_missing_password_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    message = _error(
        monkeypatch,
        SPOTLORA_PUSHGATEWAY_USERNAME="spotlora",
        SPOTLORA_PUSHGATEWAY_PASSWORD_FILE=str(missing),
    )
    assert f"SPOTLORA_PUSHGATEWAY_PASSWORD_FILE '{missing}': No such file or directory" in message


@pytest.mark.parametrize("run_id", ["../other-job", "a/b", ".."])
def test_run_id_is_one_path_segment(monkeypatch: pytest.MonkeyPatch, run_id: str) -> None:
    message = _error(monkeypatch, SPOTLORA_RUN_ID=run_id)
    assert "SPOTLORA_RUN_ID must be a single name: no '/', and not '.' or '..'" in message


@pytest.mark.parametrize(
    ("name", "says"),
    [
        (
            "SPOTLORA_LOG_LEVEL",
            "SPOTLORA_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        ("SPOTLORA_LOG_FORMAT", "SPOTLORA_LOG_FORMAT: Input should be 'auto', 'json' or 'console'"),
    ],
)
def test_a_bad_log_setting_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, says: str
) -> None:
    from service.cli import main

    monkeypatch.setenv(name, "bogus")
    assert main(["example"]) == 2
    err = capsys.readouterr().err
    assert err == f"spotlora: invalid environment: {says}\n"


def test_log_settings_accept_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTLORA_LOG_LEVEL", "debug")
    monkeypatch.setenv("SPOTLORA_LOG_FORMAT", "json")
    settings = RuntimeSettings()
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
