"""Real Prometheus and Pushgateway servers for the integration tests.

Each starts on a free loopback port with its own temporary directory, is waited for on
`/-/ready`, and is stopped at the end. Missing binaries fail the run under CI (a skipped
integration test would pass silently) and skip it locally, naming the package to install.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus prometheus-pushgateway"
READY_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 5.0


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; install it with: {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout_seconds: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
        return response.read().decode()


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                http_get(f"{self.url}/-/ready", timeout_seconds=1.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"{self.name} not ready in {READY_TIMEOUT_SECONDS}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(name: str, argv: list[str], port: int, workdir: Path) -> Server:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            argv, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = Server(name, f"http://127.0.0.1:{port}", process, log_path)
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Pushgateway for the session; tests keep apart by using their own job names."""
    binary = require_binary("prometheus-pushgateway")
    workdir = tmp_path_factory.mktemp("pushgateway")
    port = free_port()
    server = start(
        "pushgateway",
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        port,
        workdir,
    )
    yield server.url
    server.stop()


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: spotlora
    static_configs:
      - targets: ["{target}"]
        labels:
          spotlora_job: "{spotlora_job}"
"""


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a Prometheus scraping `target` (host:port) every second; returns its base URL."""
    binary = require_binary("prometheus")
    servers: list[Server] = []

    def start_prometheus(target: str, spotlora_job: str = "test") -> str:
        workdir = tmp_path / f"prometheus-{len(servers)}"
        workdir.mkdir()
        config = workdir / "prometheus.yml"
        config.write_text(PROMETHEUS_CONFIG.format(target=target, spotlora_job=spotlora_job))
        port = free_port()
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        servers.append(start("prometheus", argv, port, workdir))
        return servers[-1].url

    yield start_prometheus
    for server in servers:
        server.stop()
