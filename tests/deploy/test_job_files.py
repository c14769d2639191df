"""Every FineTuneJob file shipped under k8s/ is valid for the service that will read it."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_support import K8S, REPO, in_ci

JOB_FILES = sorted(K8S.rglob("job.yaml"))


def test_every_kustomization_ships_a_job_file_we_check() -> None:
    assert K8S / "base" / "job.yaml" in JOB_FILES
    for path in JOB_FILES:
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "spotlora/v1" and doc["kind"] == "FineTuneJob", path


def validate_with_service(path: Path) -> None:
    """Through service.manifest when it exists, else the CLI's validate command."""
    try:
        manifest = importlib.import_module("service.manifest")
    except ModuleNotFoundError:
        manifest = None
    if manifest is not None and hasattr(manifest, "load_manifest"):
        load_manifest = manifest.load_manifest
        parameters = inspect.signature(load_manifest).parameters
        if "cli_manifest" in parameters:
            load_manifest(
                cli_manifest=str(path),
                env_inline=None,
                env_uri=None,
                read_uri=lambda uri: Path(uri).read_text(),
            )
        else:
            load_manifest(path)
        return
    entrypoint = REPO / "entrypoint.py"
    if entrypoint.is_file():
        result = subprocess.run(
            [sys.executable, str(entrypoint), "validate", "--manifest", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return
    message = "neither service.manifest nor entrypoint.py exists yet: nothing to validate with"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_job_file_is_valid(path: Path) -> None:
    validate_with_service(path)
