"""Shared fixtures: a real S3-compatible server (moto's standalone server, over HTTP on
loopback, started as its own process) and the small models and data the repo makes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_seconds}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3 server; boto3 in this process and in children finds it
    through the standard AWS_ENDPOINT_URL_S3 variable."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A fresh, empty bucket for one test."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.samples import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Alpaca rows of the synthetic task, short enough for max_length 96."""
    from examples.samples import write_synthetic_task

    return write_synthetic_task(tmp_path_factory.mktemp("data") / "train.jsonl", n=48, seed=3)


from tests.s3faults import FaultProxy  # noqa: E402 - appended with its fixture


@pytest.fixture
def s3_faults(s3_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's moto server (tests/s3faults.py).

    It starts clean (``p`` 0, no rules): a test adds rules or calls ``configure(p=...)``.
    Point a client at ``.endpoint``, e.g. ``job_env(..., AWS_ENDPOINT_URL_S3=proxy.endpoint)``;
    the session's own AWS_ENDPOINT_URL_S3 still names moto directly, for setup and checks."""
    with FaultProxy(s3_server, p=0.0, seed=0) as proxy:
        yield proxy
