"""checkov over the rendered overlays and terraform/, offline (--skip-download).

checkov pins many libraries, so it lives in its own virtualenv, <repo>/.venv-tools
(`python3 -m venv .venv-tools && .venv-tools/bin/pip install checkov==3.3.30`). Every
suppression must carry its reason where it is made: a `checkov.io/skipN: ID=reason`
annotation in k8s/, a `#checkov:skip=ID:reason` comment in terraform/.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from deploy_support import (
    OVERLAYS,
    REPO,
    TERRAFORM,
    in_ci,
    rendered,
    rendered_text,
    tf_files,
)

CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"
MIN_REASON_CHARS = 20


def checkov() -> str:
    if CHECKOV.is_file():
        return str(CHECKOV)
    message = (
        f"{CHECKOV.relative_to(REPO)} not found; create it with: python3 -m venv .venv-tools "
        "&& .venv-tools/bin/pip install checkov==3.3.30"
    )
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def run_checkov(*args: str) -> list[dict]:
    result = subprocess.run(
        [checkov(), "--skip-download", "--quiet", "--compact", "-o", "json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.stdout.strip(), f"checkov printed nothing:\n{result.stderr[-3000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failures = [
        f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}"
        for report in reports
        for check in report.get("results", {}).get("failed_checks", [])
    ]
    assert not failures, "checkov failures:\n" + "\n".join(failures)
    assert result.returncode == 0, result.stderr[-3000:]
    return reports


def passed(reports: list[dict]) -> int:
    return sum(report.get("summary", {}).get("passed", 0) for report in reports)


def test_checkov_kubernetes(tmp_path: Path) -> None:
    for name in OVERLAYS:
        (tmp_path / f"{name}.yaml").write_text(rendered_text(name))
    reports = run_checkov("--framework", "kubernetes", "-d", str(tmp_path))
    assert passed(reports) > 100, "checkov ran too few checks: did it see the manifests?"


def test_checkov_terraform() -> None:
    reports = run_checkov("--framework", "terraform", "-d", str(TERRAFORM))
    assert passed(reports) > 50, "checkov ran too few checks: did it see the modules?"


@pytest.mark.parametrize("name", OVERLAYS)
def test_kubernetes_skips_carry_reasons(name: str) -> None:
    for doc in rendered(name):
        annotations = doc["metadata"].get("annotations", {})
        for key, value in annotations.items():
            if key.startswith("checkov.io/skip"):
                match = re.fullmatch(r"(CKV2?_K8S_\d+)=(.+)", value, re.S)
                assert match, f"{doc['kind']}: {key}: {value!r} is not ID=reason"
                assert len(match.group(2).strip()) >= MIN_REASON_CHARS, f"{key}: reason too short"


def test_terraform_skips_carry_reasons() -> None:
    skips = 0
    for path in tf_files():
        for line in path.read_text().splitlines():
            if "checkov:skip" not in line:
                continue
            skips += 1
            match = re.search(r"#checkov:skip=(CKV2?_[A-Z]+_\d+):(.+)$", line)
            assert match, f"{path}: {line.strip()!r} is not #checkov:skip=ID:reason"
            assert len(match.group(2).strip()) >= MIN_REASON_CHARS, f"{path}: reason too short"
    assert skips, "expected the documented skips (S3 replication/logging/events, IMDS hops)"
