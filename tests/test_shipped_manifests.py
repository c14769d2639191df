"""The manifests users copy run at the measured default: `batch_size: auto` (32 rows on a T4
for the Mistral job, about 3x the throughput of 4 x 4; docs/performance.md). Only the CPU
quickstart, named below, keeps a fixed micro-batch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import EXAMPLE_MANIFEST
from tests.conftest import REPO

# CPU jobs: no GPU memory to fill, and a fixed batch keeps their timings comparable.
CPU_MANIFESTS = {"k8s/overlays/cpu-quickstart/job.yaml", "examples/quickstart.py"}
FENCED_YAML = re.compile(r"^ *```yaml\n(.*?)^ *```", re.DOTALL | re.MULTILINE)


def shipped() -> dict[str, Any]:
    """Every FineTuneJob (or a job's training section) that ships, by where it is."""
    from examples.quickstart import job_manifest

    found: dict[str, Any] = {
        "spotlora example": yaml.safe_load(EXAMPLE_MANIFEST),
        "examples/quickstart.py": job_manifest(*(Path(x) for x in "mteo")),
    }
    for path in sorted((REPO / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                found[str(path.relative_to(REPO))] = doc
    for page in [REPO / "README.md", REPO / "k8s" / "README.md", *sorted(REPO.glob("docs/*.md"))]:
        for number, block in enumerate(FENCED_YAML.findall(page.read_text())):
            doc = yaml.safe_load(_dedent(block))
            if isinstance(doc, dict) and ("training" in doc or "training" in doc.get("spec", {})):
                found[f"{page.relative_to(REPO)} block {number}"] = doc
    return found


def _dedent(block: str) -> str:
    lines = block.splitlines()
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return "\n".join(x[indent:] for x in lines)


def training_of(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc.get("spec", doc).get("training") or {})


MANIFESTS = shipped()


def test_the_readme_example_and_the_job_files_are_all_found() -> None:
    names = set(MANIFESTS)
    assert {"spotlora example", "k8s/base/job.yaml", "k8s/overlays/eks-t4/job.yaml"} <= names
    assert any(name.startswith("README.md block") for name in names)
    assert names >= CPU_MANIFESTS, "a CPU exception names no shipped manifest"


@pytest.mark.parametrize("name", [n for n in MANIFESTS if n not in CPU_MANIFESTS])
def test_gpu_manifests_use_the_automatic_batch_size(name: str) -> None:
    training = training_of(MANIFESTS[name])
    assert training.get("batch_size", "auto") == "auto", f"{name}: {training}"
    assert training.get("gradient_accumulation", 1) == 1, f"{name}: {training}"
