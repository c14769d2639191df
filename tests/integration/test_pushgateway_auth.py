"""Pushes to a Pushgateway that requires basic auth: the real binary with a bcrypt-hashed user
in its --web.config.file, and a stand-in that only records the Authorization header."""

from __future__ import annotations

import base64
import http.server
import subprocess
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from service.metrics.registry import JobMetrics, Phase
from tests.integration.conftest import READY_TIMEOUT_SECONDS, free_port, require_binary

USERNAME = "spotlora"
PASSWORD = "correct-horse-battery"
WRONG_PASSWORD = "wrong-password-value"


def bcrypt_hash(password: str) -> str:
    """The stdlib's crypt (libxcrypt) makes bcrypt hashes; cost 4 (16 rounds) keeps it quick."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        crypt = pytest.importorskip("crypt", reason="no crypt module: bcrypt hashes need it")
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not hashed or not hashed.startswith("$2"):
        pytest.skip("this libc's crypt() makes no bcrypt hashes")
    return str(hashed)


def authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def http_get(url: str, auth: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    with urllib.request.urlopen(request, timeout=2) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def auth_pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Debian prometheus-pushgateway, letting in only USERNAME with PASSWORD."""
    binary = require_binary("prometheus-pushgateway")
    workdir = tmp_path_factory.mktemp("auth-pushgateway")
    config = workdir / "web.yml"
    config.write_text(f"basic_auth_users:\n  {USERNAME}: '{bcrypt_hash(PASSWORD)}'\n")
    port = free_port()
    log_path = workdir / "pushgateway.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--web.listen-address=127.0.0.1:{port}",
                f"--web.config.file={config}",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=log_file,
            stderr=log_file,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=5)


def wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pushgateway exited:\n{log_path.read_text(errors='replace')}")
        try:
            http_get(f"{url}/-/ready", authorization(USERNAME, PASSWORD))
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    pytest.fail(f"pushgateway not ready:\n{log_path.read_text(errors='replace')}")


def test_gateway_refuses_pushes_without_credentials(auth_pushgateway: str) -> None:
    """The server really checks: otherwise the test below proves nothing."""
    with pytest.raises(urllib.error.HTTPError) as info:
        http_get(f"{auth_pushgateway}/metrics")
    assert info.value.code == 401


def test_push_with_basic_auth_reaches_a_gateway_that_requires_it(auth_pushgateway: str) -> None:
    metrics = JobMetrics(
        "auth-job",
        pushgateway_url=auth_pushgateway,
        pushgateway_username=USERNAME,
        pushgateway_password=PASSWORD,
    )
    with capture_logs() as logs:
        metrics.finish(Phase.DONE, wait_seconds=10)
        metrics.close()
    assert not [e for e in logs if e["event"].startswith("pushgateway_")], logs
    body = http_get(f"{auth_pushgateway}/metrics", authorization(USERNAME, PASSWORD))
    assert 'spotlora_job_phase{instance="",job="spotlora",spotlora_job="auth-job"' in body
    assert "spotlora_last_success_timestamp_seconds{" in body


def test_wrong_password_is_a_logged_push_failure_without_the_password(
    auth_pushgateway: str,
) -> None:
    metrics = JobMetrics(
        "wrong-password-job",
        pushgateway_url=auth_pushgateway,
        pushgateway_username=USERNAME,
        pushgateway_password=WRONG_PASSWORD,
    )
    with capture_logs() as logs:
        metrics.finish(Phase.DONE, wait_seconds=10)
        metrics.close()
    failures = [e for e in logs if e["event"] == "pushgateway_push_failed"]
    assert failures, logs
    assert "401" in failures[0]["error"]
    assert failures[0]["url"] == auth_pushgateway
    assert WRONG_PASSWORD not in repr(logs)
    assert base64.b64encode(f"{USERNAME}:{WRONG_PASSWORD}".encode()).decode() not in repr(logs)


class _RecordingGateway(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.headers.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recording_gateway() -> Iterator[tuple[str, list[str | None]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingGateway)
    server.headers = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", server.headers  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def test_credentials_travel_as_a_basic_auth_header(
    recording_gateway: tuple[str, list[str | None]],
) -> None:
    url, headers = recording_gateway
    with_auth = JobMetrics(
        "header-job", pushgateway_url=url, pushgateway_username="u", pushgateway_password="p w"
    )
    with_auth.finish(Phase.DONE, wait_seconds=10)
    with_auth.close()
    without = JobMetrics("header-job", pushgateway_url=url)
    without.finish(Phase.DONE, wait_seconds=10)
    without.close()
    assert headers == [authorization("u", "p w"), None]


def test_a_url_with_credentials_is_logged_without_them() -> None:
    """The manifest refuses such a URL; a caller that passes one anyway still leaks nothing."""
    url = f"http://{USERNAME}:{PASSWORD}@127.0.0.1:{free_port()}"
    metrics = JobMetrics("leak-job", pushgateway_url=url, push_timeout_seconds=0.5)
    with capture_logs() as logs:
        metrics.finish(Phase.FAILED, wait_seconds=5)
        metrics.close()
    failures = [e for e in logs if e["event"] == "pushgateway_push_failed"]
    assert failures and failures[0]["url"].startswith("http://127.0.0.1:")
    assert PASSWORD not in repr(logs)


def test_half_the_credentials_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="needs both a username and a password"):
        JobMetrics("x", pushgateway_url="http://127.0.0.1:9", pushgateway_username="u")
