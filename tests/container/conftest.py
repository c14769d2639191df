"""The image, built from the repo's Dockerfile on a local Debian base and run like the pod.

A Docker daemon is started when none answers (docker/ensure-dockerd.sh), the CI base is
built or reused by the hash of its recipe (docker/build-base.sh), and the image is built
with torch's CPU wheel from the build context (docker/build-image.sh). Under CI a missing
daemon fails the run (a skipped container test would pass silently); locally it skips
with the reason. ``SPOTLORA_TEST_IMAGE=tag`` tests an image built elsewhere instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
UID = 10001
BUILD_TIMEOUT_SECONDS = 1500
RUN_TIMEOUT_SECONDS = 600

# The k8s cpu-quickstart init container's command, with fewer rows to stay fast.
SAMPLES_ARGS = [
    "/opt/spotlora/samples.py",
    "--tiny-model=/var/cache/spotlora/quickstart/model",
    "--task=/var/cache/spotlora/quickstart/train.jsonl",
    "--rows=128",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "container: builds and runs the Docker image")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Fail under CI, skip locally: CI must not go green without having run these."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args[:3])} ... exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    return done


def script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DOCKER_DIR / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "DOCKER": DOCKER},
    )


def writable_by_pod_user(path: Path) -> Path:
    """The container runs as 10001, as in the pod; the host dirs it writes must let it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        path.chmod(0o777)
    return path


@pytest.fixture(scope="session")
def docker_daemon() -> str:
    if not Path(DOCKER).is_file():
        unavailable(f"{DOCKER} not found: apt-get install -y docker.io debootstrap")
    done = script("ensure-dockerd.sh", timeout=120)
    if done.returncode != 0:
        unavailable(f"no Docker daemon: {done.stderr.strip()[-500:]}")
    return DOCKER


@pytest.fixture(scope="session")
def image(docker_daemon: str) -> str:
    tag = os.environ.get("SPOTLORA_TEST_IMAGE")
    if tag:
        docker("image", "inspect", tag)
        return tag
    tag = "spotlora:ci"
    started = time.monotonic()
    done = script("build-image.sh", tag, timeout=BUILD_TIMEOUT_SECONDS)
    assert done.returncode == 0, f"image build failed:\n{done.stderr[-5000:]}"
    print(f"image {tag} built in {time.monotonic() - started:.0f}s")
    return tag


@dataclass
class Container:
    """One `docker run` shaped like the pod: read-only root, no network, uid 10001,
    no capabilities, /tmp as tmpfs, the cache and the output as volumes."""

    image: str
    cache: Path
    name: str = ""

    def args(self, *, out: Path | None, env: dict[str, str], mounts: list[str]) -> list[str]:
        args = [
            "--name", self.name,
            "--read-only",
            "--network", "none",
            "--user", f"{UID}:{UID}",
            "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "--tmpfs", "/tmp:rw,exec,size=1g",
            "--volume", f"{self.cache}:/var/cache/spotlora",
            "--env", "HF_HUB_OFFLINE=1",
        ]  # fmt: skip
        if out is not None:
            args += ["--volume", f"{out}:/out"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for mount in mounts:
            args += ["--volume", mount]
        return args

    def run(
        self,
        cmd: list[str],
        *,
        out: Path | None = None,
        env: dict[str, str] | None = None,
        mounts: list[str] | None = None,
        entrypoint: str | None = None,
        timeout: float = RUN_TIMEOUT_SECONDS,
    ) -> subprocess.CompletedProcess[str]:
        self.name = f"spotlora-test-{uuid.uuid4().hex[:8]}"
        args = ["run", "--rm", *self.args(out=out, env=env or {}, mounts=mounts or [])]
        if entrypoint is not None:
            args += ["--entrypoint", entrypoint]
        try:
            return docker(*args, self.image, *cmd, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            docker("rm", "--force", self.name, check=False)
            raise

    def start(
        self,
        cmd: list[str],
        *,
        out: Path,
        env: dict[str, str] | None = None,
        mounts: list[str] | None = None,
    ) -> str:
        self.name = f"spotlora-test-{uuid.uuid4().hex[:8]}"
        args = ["run", "--detach", *self.args(out=out, env=env or {}, mounts=mounts or [])]
        docker(*args, self.image, *cmd)
        return self.name


@pytest.fixture(scope="session")
def samples_cache(image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model and data, written inside the container into the cache volume the
    way the cpu-quickstart overlay's init container does it."""
    cache = writable_by_pod_user(tmp_path_factory.mktemp("cache"))
    done = Container(image, cache).run(SAMPLES_ARGS, entrypoint="python")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cache / "quickstart" / "model" / "config.json").is_file()
    assert (cache / "quickstart" / "train.jsonl").is_file()
    return cache


@pytest.fixture
def container(image: str, samples_cache: Path, tmp_path: Path) -> Iterator[Container]:
    # Each test gets its own copy of the cache: runs leave staging and state behind.
    cache = tmp_path / "cache"
    shutil.copytree(samples_cache, cache)
    if os.geteuid() == 0:
        for path in [cache, *cache.rglob("*")]:
            os.chown(path, UID, UID, follow_symlinks=False)
    else:
        for path in [cache, *cache.rglob("*")]:
            path.chmod(0o777)
    box = Container(image, cache)
    yield box
    if box.name:
        docker("rm", "--force", box.name, check=False)
