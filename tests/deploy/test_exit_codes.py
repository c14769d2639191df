"""One exit-code table: service/errors.py's ExitCode and the README's table are the source; the
k8s README, docs/deploy.md and every Job file in k8s/ must say the same about each code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]
# A code no onExitCodes rule names is counted toward backoffLimit (Kubernetes' default).
COUNTED = "Count"


def table_rows(path: Path, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading``."""
    text = path.read_text()
    rows = []
    for line in text[text.index(heading) :].splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # past the header and the --- line


def codes_in(cell: str) -> list[int]:
    return [int(c) for c in re.findall(r"(?<![\w.])(\d+)(?![\w.])", cell)]


def job_policies() -> dict[str, dict[int, str]]:
    """Each Job file's exit code -> podFailurePolicy action, for every code ExitCode has."""
    found = {}
    for path in sorted((REPO / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = _job_spec(doc)
            if spec is None or "podFailurePolicy" not in spec:
                continue
            action = dict.fromkeys((int(c) for c in ExitCode if c != ExitCode.OK), COUNTED)
            for rule in spec["podFailurePolicy"]["rules"]:
                for code in rule.get("onExitCodes", {}).get("values", []):
                    action[code] = rule["action"]
            found[str(path.relative_to(REPO))] = action
    return found


def _job_spec(doc: Any) -> dict[str, Any] | None:
    if not isinstance(doc, dict):
        return None
    if doc.get("kind") == "Job":
        return doc.get("spec") or {}
    if doc.get("kind") == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]
    return None


TRAINER_POLICY = job_policies()["k8s/base/trainer-job.yaml"]


def test_the_readme_table_lists_every_exit_code_once() -> None:
    rows = table_rows(REPO / "README.md", "## Exit codes")
    listed = [code for row in rows for code in codes_in(row[0])]
    assert sorted(listed) == sorted(int(c) for c in ExitCode)


def test_the_k8s_readme_says_what_the_job_does_with_each_code() -> None:
    rows = table_rows(REPO / "k8s" / "README.md", "## How a run behaves")
    said = {}
    for row in rows:
        for code in codes_in(row[0]):
            policy = row[2].strip("`")
            said[code] = COUNTED if "count" in policy else policy
    assert said.pop(0) == "-"
    assert said == TRAINER_POLICY


def test_the_deploy_guide_says_what_the_job_does_with_each_code() -> None:
    rows = table_rows(REPO / "docs" / "deploy.md", "| Exit | Kubernetes")
    said = {}
    for row in rows:
        for code in codes_in(row[0]):
            named = re.search(r"\((`?)(FailJob|Ignore|Count)\1\)", row[1])
            counted = "counted" in row[1] or "retried" in row[1]
            said[code] = named[2] if named else (COUNTED if counted else "Ignore")
    assert said.pop(0) == "Ignore"  # "Job Complete": no rule
    assert said == TRAINER_POLICY


@pytest.mark.parametrize("path", sorted(job_policies()))
def test_every_training_job_file_maps_the_codes_alike(path: str) -> None:
    """Every Job (and CronJob) in k8s/ that has a podFailurePolicy; the export example is the
    one Job that runs no training: it can end neither preempted nor superseded."""
    policy = job_policies()[path]
    if path == "k8s/examples/export-job.yaml":
        assert {c for c, a in policy.items() if a == "FailJob"} == {2, 65}
        return
    assert policy == TRAINER_POLICY
